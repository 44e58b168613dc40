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

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from .spectrum import orthonormal_basis


def _signed_orthonormal(matrix: torch.Tensor) -> torch.Tensor:
    """Gram–Schmidt of the columns (QR), each column signed to point along the column it came from.

    ``matrix`` is ``[n, k]`` or a stack ``[G, n, k]`` (one QR per member, in one call).
    """
    q, r = torch.linalg.qr(matrix)
    sign = torch.sign(torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)) + 0.5)  # +1 where the diagonal is 0
    return q * sign.unsqueeze(-2)


def _project_out(vectors: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """``(I − Q Qᵀ) vectors`` for an orthonormal ``Q`` (``vectors`` unchanged without one); stacks work too."""
    if basis is None or basis.shape[-1] == 0:
        return vectors
    return vectors - basis @ (basis.mT @ vectors)


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
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        """This step's ``(Gv, Gᵀu)``, not yet folded in: :func:`fold_pending` folds many sketches at once."""
        self.reset_evidence()

    def to(self, device: torch.device) -> GradientSketch:
        self.flush()
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
        self.flush()
        state = {name: getattr(self, name).detach().clone() for name in self._STATE}
        state["count"] = torch.tensor(self.count, dtype=torch.int64)
        for name in ("basis_in", "basis_out"):  # as last set: a fresh span would steer the sketch elsewhere
            value = getattr(self, name)
            if value is not None:
                state[name] = value.detach().clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.pending = None
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
        self.flush()
        self.basis_in = orthonormal_basis(down.detach().float().T)
        self.basis_out = orthonormal_basis(up.detach().float())
        self.u = _signed_orthonormal(_project_out(self.u, self.basis_out))
        self.v = _signed_orthonormal(_project_out(self.v, self.basis_in))
        self.a = _project_out(self.a, self.basis_out)
        self.b = _project_out(self.b, self.basis_in)

    def release_spans(self) -> None:
        """Forget the span bases until the next :meth:`set_spans`.

        For a sketch that is not being fed (its component is at ``max_rank``): nothing reads the bases
        then (they project new observations, and the directions handed to a growth, which needs room),
        and every decision sets them afresh before anything could. They are the size of the factors
        themselves: 11.6 MB between steps on the SD1.x-width model at rank 32, 8.5 MB off the step's
        peak (bench/NOTES.md §13).
        """
        self.flush()
        self.basis_in = None
        self.basis_out = None

    # ----------------------------------------------------------------- one training step's gradient
    @torch.no_grad()
    def observe(self, x: torch.Tensor, delta: torch.Tensor) -> None:
        """Take one step's ``G = δᵀx`` (given as ``x [N, in]``, ``δ [N, out]``): its products along ``v``, ``u``.

        Only the two products that need ``x`` and ``δ`` are computed here, in the backward pass; the
        rest of the update (projections, averages, two QRs: ~30 small kernels) waits in ``pending``
        until :func:`fold_pending` folds every sketch of one shape in one batched update, or until
        anything reads this sketch (every reader calls :meth:`flush`). Per component it was most of the
        sketch's cost on small layers (bench/NOTES.md §8); the numbers are the same either way.

        ``u`` and ``v`` are already outside the spans (``set_spans`` projects them, and every update
        orthonormalises averages of projected products), so they are used as they are: re-projecting
        them here cost four small matmuls per component per step for a round-off difference.
        """
        self.flush()  # the products below use the directions the previous observation left
        x, delta = x.float(), delta.float()
        self.pending = (delta.T @ (x @ self.v), x.T @ (delta @ self.u))

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
        self.flush()
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
        self.pending = (a, weight_grad.flatten(1).T)

    def flush(self) -> None:
        """Fold a pending observation now (a no-op without one)."""
        if self.pending is not None:
            fold_pending((self,))

    def reset_evidence(self) -> None:
        """Forget the statistics (after the width changed, what they measured is in the span now)."""
        self.flush()
        device = self.u.device
        self.s_mean = torch.zeros(self.k, device=device)
        self.s_sum = torch.zeros(self.k, device=device)
        self.s_square_sum = torch.zeros(self.k, device=device)
        self.count = 0

    # ----------------------------------------------------------------- the evidence
    def strength(self) -> torch.Tensor:
        """The bias-corrected mean of ``s_j`` per direction: how much the loss wants each one."""
        self.flush()
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
        self.flush()
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
        self.flush()
        if self.count < 2:
            return torch.zeros(self.k, device=self.u.device)
        mean = self.s_sum / self.count
        variance = (self.s_square_sum / self.count - mean * mean).clamp(min=0.0)
        return mean / (variance / self.count).sqrt().clamp(min=1e-30)

    def new_directions(self, count: int) -> torch.Tensor:
        """The first ``count`` tracked input directions, orthonormal rows ``[count, in]`` outside the span."""
        self.flush()
        v = _project_out(self.v[:, :count], self.basis_in)
        return _signed_orthonormal(v).T.contiguous()


# ----------------------------------------------------------------------------- the batched update
def _stacked_basis(bases: list[torch.Tensor | None], rows: int, like: torch.Tensor) -> torch.Tensor | None:
    """The members' span bases as one ``[G, rows, D]`` stack, narrower ones padded with zero columns.

    A zero column projects nothing out, so padding changes no number; it lets components of one shape
    but different widths share one batched projection.
    """
    width = max((b.shape[1] for b in bases if b is not None), default=0)
    if width == 0:
        return None
    padded = [
        like.new_zeros(rows, width) if b is None else (b if b.shape[1] == width else F.pad(b, (0, width - b.shape[1])))
        for b in bases
    ]
    return torch.stack(padded)


def fold_pending(sketches: Iterable[GradientSketch]) -> None:
    """Fold every pending observation, one batched update per group of sketches with equal shapes.

    The handle calls it once per step for all its components (a model has a few dozen distinct layer
    shapes and a hundred or more components), so the ~30 small kernels of an update run once per
    shape instead of once per component.
    """
    groups: dict[tuple, list[GradientSketch]] = {}
    for sketch in sketches:
        if sketch.pending is not None:
            key = (tuple(sketch.u.shape), tuple(sketch.v.shape), sketch.u.device, sketch.beta)
            groups.setdefault(key, []).append(sketch)
    for group in groups.values():
        _fold_group(group)


@torch.no_grad()
def _fold_group(group: list[GradientSketch]) -> None:
    """The update of :class:`GradientSketch` from one step's ``Gv`` [out, k] and ``Gᵀu`` [in, k], stacked."""
    beta = group[0].beta
    out_features, in_features = group[0].u.shape[0], group[0].v.shape[0]
    u = torch.stack([s.u for s in group])
    xv_product = torch.stack([s.pending[0] for s in group])
    du_product = torch.stack([s.pending[1] for s in group])
    a = _project_out(xv_product, _stacked_basis([s.basis_out for s in group], out_features, u))  # G⊥ v_j
    b = _project_out(du_product, _stacked_basis([s.basis_in for s in group], in_features, u))  # G⊥ᵀ u_j
    s_step = (u * a).sum(dim=1)  # u_jᵀ G⊥ v_j with directions fixed before this batch, [G, k]
    state = {name: torch.stack([getattr(s, name) for s in group]) for name in _FOLDED}
    # β·old + (1 − β)·new for the four averages in one call
    torch._foreach_lerp_(
        [state["a"], state["b"], state["b_energy"], state["s_mean"]],
        [a, b, b.pow(2).sum(dim=1), s_step],
        1.0 - beta,
    )
    state["s_sum"].add_(s_step)
    state["s_square_sum"].add_(s_step * s_step)
    counts = [s.count + 1 for s in group]
    correction = torch.tensor([1.0 - beta**c for c in counts], device=u.device)
    strength = state["s_mean"] / correction[:, None]
    state["peak"] = torch.maximum(state["peak"], strength.max(dim=1).values)
    state["u"] = _signed_orthonormal(state["a"])
    state["v"] = _signed_orthonormal(state["b"])
    members = {name: value.unbind(0) for name, value in state.items()}
    for i, sketch in enumerate(group):
        for name, values in members.items():
            setattr(sketch, name, values[i])
        sketch.count = counts[i]
        sketch.pending = None


_FOLDED = ("a", "b", "b_energy", "s_mean", "s_sum", "s_square_sum", "peak")
"""The sketch's state an update changes in place (``u``, ``v`` are rebuilt from ``a``, ``b``)."""
