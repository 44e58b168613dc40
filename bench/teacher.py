"""The frozen teacher of the rank-recovery benchmark: a residual stack with planted low-rank updates.

The stack is ``n − 1`` pre-norm MLP blocks (``x + gelu(fc(norm(x)))``) with one attention block
(``x + attn(norm(x))``) in the middle. One layer per planted rank is adapted, in model order:
``blocks.0.fc, ..., blocks.m.attn.to_v, ..., blocks.n-1.fc``.

Only the value projection of the attention block carries a planted update: adapting a pair (v and
out, or q and k) would make the split between them unidentifiable (``W_o ΔV = ΔO' W_v`` for a ``ΔO'``
of the same rank), so no learned rank could be scored against a planted one. The attention is made
sharp (query/key weights scaled ×4): with the default initialisation its logits have a standard
deviation of ~0.3, every token sees the plain average of all values, and the value update is nearly
invisible. Its output projection is orthogonal, so that it passes every direction of a value update
on equally: a random one attenuates some directions ~100×, and a rank prior rightly ignores a planted
direction the block's output hardly shows (its score would then measure ``W_o``'s conditioning).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

QK_SCALE = 4.0


def _norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:])


class Attention(nn.Module):
    """Multi-head self-attention with diffusers-style projection names."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, tokens, self.heads, dim // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x)))
        return self.to_out(out.transpose(1, 2).reshape(batch, tokens, dim))


class MLPBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.gelu(self.fc(_norm(x)))


class AttentionBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = Attention(dim, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(_norm(x))


class Stack(nn.Module):
    """A residual stack of blocks; :meth:`block_io` exposes every block's input and output."""

    def __init__(self, blocks: list[nn.Module], dim: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def block_io(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        inputs, outputs = [], []
        for block in self.blocks:
            inputs.append(x)
            x = block(x)
            outputs.append(x)
        return inputs, outputs


def adapted_layer_names(n_ranks: int) -> list[str]:
    """The adapted layers in model order, one per planted rank."""
    if n_ranks < 2:
        return [f"blocks.{i}.fc" for i in range(n_ranks)]
    attention_at = (n_ranks - 1) // 2
    return [f"blocks.{i}.attn.to_v" if i == attention_at else f"blocks.{i}.fc" for i in range(n_ranks)]


def build_stack(dim: int, n_ranks: int, heads: int, seed: int) -> Stack:
    """The frozen base stack, seeded."""
    torch.manual_seed(seed)
    blocks: list[nn.Module] = []
    for name in adapted_layer_names(n_ranks):
        blocks.append(AttentionBlock(dim, heads) if ".attn." in name else MLPBlock(dim))
    if n_ranks < 2:
        blocks.append(AttentionBlock(dim, heads))
    stack = Stack(blocks, dim)
    with torch.no_grad():
        for module in stack.modules():
            if isinstance(module, Attention):
                module.to_q.weight.mul_(QK_SCALE)
                module.to_k.weight.mul_(QK_SCALE)
                nn.init.orthogonal_(module.to_out.weight)
    return stack.requires_grad_(False)


def planted_update(out_dim: int, in_dim: int, rank: int, generator: torch.Generator) -> torch.Tensor:
    """A rank-``rank`` matrix: orthonormal factors, singular values drawn from U(0.5, 1).

    Every direction carries a comparable share, so the rank is unambiguous: there is no long tail
    of tiny singular values for a method to argue about.
    """
    u, _ = torch.linalg.qr(torch.randn(out_dim, rank, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(in_dim, rank, generator=generator))
    singular = 0.5 + 0.5 * torch.rand(rank, generator=generator)
    return u @ torch.diag(singular) @ v.T


def make_teacher(base: Stack, ranks: list[int], seed: int) -> tuple[Stack, dict[str, torch.Tensor]]:
    """A copy of ``base`` with a planted update of each rank added to its adapted layer, in order."""
    teacher = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(seed + 1)
    modules = dict(teacher.named_modules())
    planted = {}
    with torch.no_grad():
        for name, rank in zip(adapted_layer_names(len(ranks)), ranks, strict=True):
            weight = modules[name].weight
            planted[name] = planted_update(weight.shape[0], weight.shape[1], rank, generator)
            weight.add_(planted[name])
    return teacher, planted
