"""Gradient evidence that a component needs more rank, gathered while it trains.

For a component with input rows ``x [N, in]`` and output gradients ``δ [N, out]`` (``N`` = batch ×
tokens), the gradient of the loss with respect to its ΔW is ``G = δᵀx`` (``out × in``). The existing
positions can follow, to first order, the part of ``G`` inside their spans: ``up`` (B) learns ``G``'s
projection on the rows of ``down`` (A), and A learns its projection on the columns of B. What no
existing position can follow is ``G⊥ = (I − P_B) G (I − P_A)``. If the *expected* ``G⊥`` has a direction
with a consistently non-zero component, the component needs another position, and the best first
direction for it is ``E[G⊥]``'s top singular pair (GradMax, Evci et al., ICLR 2022).

Why this and not ν's gradient (measured, see the README): ∂L/∂ν is a sum over positions that already carry
a direction, so it is zero at the start (B = 0) and again at equilibrium; a rank prior then wins and
every width falls. The top singular value of ``G⊥`` was 20-200× larger on under-ranked components than
on fitted ones in every case measured: the signal is there, it just has to be read.

How it is read, without ever forming ``G``: a block power (subspace) iteration across training steps
keeps ``k`` directions ``U [out, k]``, ``V [in, k]`` and exponential moving averages of ``G⊥V`` and
``G⊥ᵀU``, which need only ``xV`` and ``δU``: ``O(N·(in + out)·k)`` per step, a few per cent of the
layer's own matmul at ``k = 4``. The evidence that direction ``j`` is real and not noise is a
z-statistic of ``s_j = u_jᵀ G⊥_t v_j``, measured with directions chosen *before* step ``t`` saw its
batch: under pure noise ``E[s_j] = 0`` whatever ``u``, ``v`` are, so the test is unbiased. The statistic
is dimensionless, so one threshold holds for any loss scale, learning rate, layer width and model.
A second, relative test (``s_j`` against the largest ``s`` this component ever showed) stops growth
when the wish has faded to noise-free round-off, where a z-test alone would fire on anything.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .spectrum import orthonormal_basis


def _signed_orthonormal(matrix: torch.Tensor) -> torch.Tensor:
    """Gram–Schmidt of the columns (QR), each column signed to point along the column it came from."""
    q, r = torch.linalg.qr(matrix)
    return q * torch.sign(torch.sign(torch.diagonal(r)) + 0.5)  # sign, with +1 where the diagonal is 0


def _project_out(vectors: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """``(I − Q Qᵀ) vectors`` for an orthonormal ``Q`` (``vectors`` unchanged without one)."""
    if basis is None or basis.shape[1] == 0:
        return vectors
    return vectors - basis @ (basis.T @ vectors)


class GradientSketch:
    """Streaming estimate of the top-``k`` singular directions of ``E[G⊥]`` and their evidence.

    Args:
        in_features, out_features: the sides of ``G`` (for convolutions, ``in`` is the patch size).
        directions: ``k``, how many directions are tracked (and so, at most, grown at once).
        beta: EMA factor; the evidence averages over about ``(1 + β)/(1 − β)`` steps.
        generator: seeds the starting directions.
    """

    def __init__(
        self, in_features: int, out_features: int, directions: int, beta: float, generator: torch.Generator
    ) -> None:
        self.k = max(1, min(int(directions), in_features, out_features))
        self.beta = float(beta)
        self.u = _signed_orthonormal(torch.randn(out_features, self.k, generator=generator))
        self.v = _signed_orthonormal(torch.randn(in_features, self.k, generator=generator))
        self.a = torch.zeros(out_features, self.k)
        self.b = torch.zeros(in_features, self.k)
        self.b_energy = torch.zeros(self.k)
        self.basis_in: torch.Tensor | None = None
        self.basis_out: torch.Tensor | None = None
        self.peak = torch.zeros(())
        self.reset_evidence()

    def to(self, device: torch.device) -> GradientSketch:
        for name in self._STATE:
            setattr(self, name, getattr(self, name).to(device))
        for name in ("basis_in", "basis_out"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self

    _STATE = ("u", "v", "a", "b", "b_energy", "s_mean", "s_sum", "s_square_sum", "peak")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What continuing exactly needs (the spans are recomputed from the factors on load)."""
        state = {name: getattr(self, name).detach().clone() for name in self._STATE}
        state["count"] = torch.tensor(self.count, dtype=torch.int64)
        for name in ("basis_in", "basis_out"):  # as last set: a fresh span would steer the sketch elsewhere
            value = getattr(self, name)
            if value is not None:
                state[name] = value.detach().clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        device = self.u.device
        for name in self._STATE:
            setattr(self, name, state[name].to(device, torch.float32).clone())
        self.count = int(state["count"])
        self.k = self.u.shape[1]
        for name in ("basis_in", "basis_out"):
            setattr(self, name, state[name].to(device, torch.float32).clone() if name in state else None)

    # ----------------------------------------------------------------- spans of the current positions
    def set_spans(self, down: torch.Tensor, up: torch.Tensor) -> None:
        """Record what the active positions span: rows of ``down [D, in]``, columns of ``up [out, D]``.

        Called when the width changes and every few steps (spans move slowly; between refreshes the
        tracked directions are still projected, so a stale span only leaks a little of what the
        positions already follow into the estimate).
        """
        self.basis_in = orthonormal_basis(down.detach().float().T)
        self.basis_out = orthonormal_basis(up.detach().float())
        self.u = _signed_orthonormal(_project_out(self.u, self.basis_out))
        self.v = _signed_orthonormal(_project_out(self.v, self.basis_in))
        self.a = _project_out(self.a, self.basis_out)
        self.b = _project_out(self.b, self.basis_in)

    # ----------------------------------------------------------------- one training step's gradient
    @torch.no_grad()
    def observe(self, x: torch.Tensor, delta: torch.Tensor) -> None:
        """Fold one step's ``G = δᵀx`` (given as ``x [N, in]``, ``δ [N, out]``) into the estimate.

        ``u`` and ``v`` are already outside the spans (``set_spans`` projects them, and every update
        orthonormalises averages of projected products), so they are used as they are: re-projecting
        them here cost four small matmuls per component per step for a round-off difference.
        """
        x, delta = x.float(), delta.float()
        v, u = self.v, self.u
        self._fold(delta.T @ (x @ v), x.T @ (delta @ u), u)

    @torch.no_grad()
    def observe_conv(
        self,
        x: torch.Tensor,
        delta: torch.Tensor,
        kernel_size: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
    ) -> None:
        """:meth:`observe` for a convolution's input ``x [B, C, H, W]`` and output gradient ``δ``, not unfolded.

        ``G``'s rows are the unfolded patches (``in = C·kh·kw``), but ``patches @ v`` is a convolution with
        ``v`` as ``k`` filters, and ``patchesᵀ (δu)`` is that convolution's weight gradient: the same
        numbers as the unfolded matmuls (to round-off), without the ``im2col`` copy of the input
        (``kh·kw`` times its size). Measured on a 320-channel 3×3 layer at 32×32: 16 ms → 3 ms.
        ``x`` must already be padded for padding modes other than zeros (then ``padding`` is 0).
        """
        x, delta = x.float(), delta.float()
        v, u = self.v, self.u
        k = v.shape[1]
        filters = v.T.reshape(k, x.shape[1], *kernel_size)
        xv = F.conv2d(x, filters, stride=stride, padding=padding, dilation=dilation)  # [B, k, H', W']
        a = delta.transpose(0, 1).flatten(1) @ xv.transpose(0, 1).flatten(1).T  # δᵀ(xv), [out, k]
        du = torch.einsum("bohw,ok->bkhw", delta, u)  # δu per output pixel
        mask = (False, True, False)  # the weight gradient only
        weight_grad = torch.ops.aten.convolution_backward(
            du, x, filters, None, stride, padding, dilation, False, (0, 0), 1, mask
        )[1]
        self._fold(a, weight_grad.flatten(1).T, u)

    def _fold(self, xv_product: torch.Tensor, du_product: torch.Tensor, u: torch.Tensor) -> None:
        """The update from one step's ``Gv = δᵀ(xv)`` [out, k] and ``Gᵀu = xᵀ(δu)`` [in, k]."""
        a = _project_out(xv_product, self.basis_out)  # G⊥ v_j, [out, k]
        b = _project_out(du_product, self.basis_in)  # G⊥ᵀ u_j, [in, k]
        s = (u * a).sum(dim=0)  # u_jᵀ G⊥ v_j with directions fixed before this batch
        # β·old + (1 − β)·new for the four averages in one call (per-call overhead is most of the cost)
        torch._foreach_lerp_(
            [self.a, self.b, self.b_energy, self.s_mean], [a, b, b.pow(2).sum(dim=0), s], 1.0 - self.beta
        )
        self.s_sum.add_(s)
        self.s_square_sum.add_(s * s)
        self.count += 1
        self.peak = torch.maximum(self.peak, self.strength().max())
        self.u = _signed_orthonormal(self.a)
        self.v = _signed_orthonormal(self.b)

    def reset_evidence(self) -> None:
        """Forget the statistics (after the width changed, what they measured is in the span now)."""
        device = self.u.device
        self.s_mean = torch.zeros(self.k, device=device)
        self.s_sum = torch.zeros(self.k, device=device)
        self.s_square_sum = torch.zeros(self.k, device=device)
        self.count = 0

    # ----------------------------------------------------------------- the evidence
    def strength(self) -> torch.Tensor:
        """The bias-corrected mean of ``s_j`` per direction: how much the loss wants each one."""
        if self.count == 0:
            return torch.zeros(self.k, device=self.u.device)
        return self.s_mean / (1.0 - self.beta**self.count)

    def alignment(self) -> torch.Tensor:
        """How converged each direction pair is, in [0, 1]: ``u_jᵀ E[G⊥] v_j / ‖E[G⊥]ᵀ u_j‖``.

        1 exactly when ``v_j`` is a right singular vector of ``E[G⊥]`` (then ``G⊥ᵀu_j ∥ v_j``); growing
        along a direction that has not converged leaves part of the need outside the span, and the
        next decision grows again: over-growth that the shrink rule must then undo.

        ``‖E[G⊥]ᵀ u_j‖`` is estimated without the noise: an EMA ``b̄`` of noisy ``b_t`` carries
        ``c = (1−β)/(1+β)`` of their noise energy, so ``‖E b‖² ≈ (‖b̄‖² − c·E‖b_t‖²) / (1 − c)``. Measured on
        one-image diffusion batches, the raw ratio sat at 0.2-0.6 for directions that were real.
        """
        if self.count == 0:
            return torch.zeros(self.k, device=self.u.device)
        correction = 1.0 - self.beta**self.count
        c = (1.0 - self.beta) / (1.0 + self.beta)
        smoothed = (self.b.norm(dim=0) / correction).pow(2)
        signal = ((smoothed - c * self.b_energy / correction) / (1.0 - c)).clamp(min=1e-30)
        return ((self.s_mean / correction) / signal.sqrt()).clamp(max=1.0)

    def z_scores(self) -> torch.Tensor:
        """The z-statistic of ``s_j`` per direction: its mean since the last reset over its standard error.

        A plain mean over every step since the width last changed, not the EMA: diffusion gradients of
        one image are noisy (per-step signal-to-noise well below 1), and only a test whose sample grows
        with time can tell a small, persistent wish from noise. Pure noise keeps ``z ~ N(0, 1)``.
        """
        if self.count < 2:
            return torch.zeros(self.k, device=self.u.device)
        mean = self.s_sum / self.count
        variance = (self.s_square_sum / self.count - mean * mean).clamp(min=0.0)
        return mean / (variance / self.count).sqrt().clamp(min=1e-30)

    def new_directions(self, count: int) -> torch.Tensor:
        """The first ``count`` tracked input directions, orthonormal rows ``[count, in]`` outside the span."""
        v = _project_out(self.v[:, :count], self.basis_in)
        return _signed_orthonormal(v).T.contiguous()
