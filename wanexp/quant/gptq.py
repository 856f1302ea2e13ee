"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers") for every wanexp number format, written from the paper's equations.

For each row w of W (all rows at once) GPTQ minimises ‖w X − q X‖² = (w − q) H (w − q)ᵀ, H = Xᵀ X,
quantizing one column j at a time and moving the not yet quantized columns to compensate
(OBS, eq. 2):

    q_j = quant(w_j),   δ_F = −(w_j − q_j) / [H_F⁻¹]_jj · (H_F⁻¹)_{j,F}

GPTQ's three changes to OBQ: a fixed column order for all rows; lazy batch updates (eqs. 4–5: the
update of the columns past the current block of ``block_size`` columns is applied once per block,
as a matrix product); and the rows of the upper Cholesky factor U of H⁻¹ (H⁻¹ = Uᵀ U) in place of
the successively downdated H_F⁻¹ of eq. 3: row j of U, divided by U_jj, is (H_F⁻¹)_{j,F} / [H_F⁻¹]_jj
(Algorithm 1), with U_jj² = [H_F⁻¹]_jj.

Number-format scales ("found as GPTQ reaches each block"). Formats keep one set of scales per
block of ``fmt.block_size`` consecutive input columns (a "group"). A group's scales are computed
(``fmt.block_state``) when the loop reaches the first of its columns, from the current,
error-compensated values of all of its columns, and then quantize its columns one at a time
(``fmt.quantize_dequantize_with_state``). The stored scales (``fmt.encode(Q, state=cat(states))``)
are exactly those, so ``fmt.decode(packed) == dequantized`` bit for bit.

* Without act-order a group lies inside one lazy block (``block_size`` must be a multiple of the
  format block), and its first column is reached first, so its scales come from the block's
  compensated weights.
* ``act_order=True`` (columns in order of decreasing H_jj): a group's columns are scattered in the
  processing order. Default (``static_groups=False``): its scales are computed when its first
  column *in the processing order* is reached, from the current values of all of its columns —
  columns of the current lazy block are up to date, columns of later lazy blocks get the pending
  update of the current block added (eq. 4 restricted to the columns quantized so far), so the
  values are exactly what the column-by-column algorithm would hold at that point.
  ``static_groups=True``: every group's scales are computed up front from the original W (the
  usual fix; also allowed without act-order).
* Per-row formats (``block_size == -1``, e.g. int4 group -1, int8, fp8): one group spans the row,
  so its scale is computed before any column is quantized, i.e. from the original W.
* NVFP4's per-tensor FP32 scale comes from the original W (dead columns zeroed) for the whole
  layer: GPTQ passes the format's ``shared_state_options(W)`` (NVFP4: ``tensor_amax=W.abs().amax()``) to
  every ``block_state``. Compensation can push
  a block's amax past it; that block's E4M3 scale then saturates at 448 (elements saturate at 6).

Preprocessing (the paper's reference practice): dead inputs (H_jj == 0) get H_jj = 1 and W[:, j] = 0;
damping λ = ``damp`` · mean(diag H) is added to the diagonal. If H + λI (or its inverse) is not
positive definite, λ is multiplied by 10 (logged) up to 6 times, then a ValueError. The
factorisation runs in float64 (cheap next to the column loop, and robust for raw XᵀX sums);
everything else in float32 on W's device.

Reported loss: ``loss = Σ_j ‖w_j − q_j‖² / (2 U_jj²)`` with w_j the compensated column when it is
quantized, i.e. the sum of the OBS error increases of eq. 2. Because every step is the exact
optimum over the remaining columns, this equals ½ tr((W₀ − Q) H_λ (W₀ − Q)ᵀ), with W₀ the input W
(dead columns zeroed) and H_λ the damped H as passed (raw scale, not normalised).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

from wanexp.formats import BlockState, NumberFormat, PackedTensor

log = logging.getLogger(__name__)

MAX_DAMP_RETRIES = 6


@dataclass
class GPTQResult:
    packed: PackedTensor  # the quantized weight in real storage, with the GPTQ-time scales
    dequantized: torch.Tensor  # == fmt.decode(packed), float32 [out, in]
    loss: float  # Σ_j ‖w_j − q_j‖² / (2 [H_F⁻¹]_jj) = ½ tr((W₀ − Q) H_λ (W₀ − Q)ᵀ): module doc
    damp: float = 0.0  # the relative damping finally used (> the requested one after retries)
    dead_columns: int = 0  # inputs with H_jj == 0, whose weights were zeroed

    def output_error(self, W: torch.Tensor, H: torch.Tensor) -> float:
        """tr((W − Q) H (W − Q)ᵀ) = ‖X Wᵀ − X Qᵀ‖² for H = Xᵀ X."""
        D = W.detach().to(self.dequantized.device, torch.float64) - self.dequantized.double()
        return float(((D @ H.to(D.device, torch.float64)) * D).sum())


# ----------------------------------------------------------------------------- checks & setup


def _check_inputs(W: torch.Tensor, H: torch.Tensor, fmt: NumberFormat, block_size: int, damp: float) -> None:
    if not isinstance(fmt, NumberFormat):
        raise TypeError("gptq_quantize: fmt must be a NumberFormat (wanexp.formats.get_format), "
                        f"got {type(fmt)}")
    for name, t in (("W", W), ("H", H)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2:
            raise ValueError(f"gptq_quantize: {name} must be a 2-D floating-point tensor, got "
                             f"{getattr(t, 'dtype', type(t))} of shape {tuple(getattr(t, 'shape', ()))}")
    if H.shape[0] != H.shape[1]:
        raise ValueError(f"gptq_quantize: H must be square [in, in], got shape {tuple(H.shape)}")
    if H.shape[0] != W.shape[1]:
        raise ValueError(f"gptq_quantize: H is {tuple(H.shape)} but W is {tuple(W.shape)} [out, in]; "
                         f"H must be [in, in] = [{W.shape[1]}, {W.shape[1]}]")
    if W.numel() == 0:
        raise ValueError(f"gptq_quantize: W is empty, shape {tuple(W.shape)}")
    for name, t in (("W", W), ("H", H)):
        if not bool(torch.isfinite(t).all()):
            n_nan = int(torch.isnan(t).sum())
            n_inf = int(torch.isinf(t).sum())
            raise ValueError(f"gptq_quantize: {name} has non-finite values ({n_nan} NaN, {n_inf} Inf)")
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"gptq_quantize: block_size must be a positive int, got {block_size!r}")
    if fmt.block_size > 0 and block_size % fmt.block_size:
        raise ValueError(f"gptq_quantize: block_size {block_size} is not a multiple of the {fmt.name} "
                         f"block of {fmt.block_size} columns (a format block must lie inside one lazy block)")
    if not (math.isfinite(damp) and damp >= 0):
        raise ValueError(f"gptq_quantize: damp must be a finite number >= 0, got {damp}")


def _drop_dead_inputs(W: torch.Tensor, H: torch.Tensor) -> int:
    """Inputs that calibration never excited (H_jj == 0): H_jj = 1, W[:, j] = 0 (in place)."""
    diag = torch.diagonal(H)
    if bool((diag < 0).any()):
        raise ValueError("gptq_quantize: H has negative diagonal entries; it must be a sum of xᵀx")
    dead = diag == 0
    n_dead = int(dead.sum())
    if n_dead:
        diag[dead] = 1.0
        W[:, dead] = 0.0
    return n_dead


def _inverse_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper U with Uᵀ U = (H + λI)⁻¹, λ = damp · mean(diag H) (Algorithm 1's Cholesky(H⁻¹)ᵀ), in
    float64; λ grows tenfold (logged) while H + λI or its inverse is not positive definite."""
    H64 = H.double()
    mean_diag = float(torch.diagonal(H64).mean())
    eye = torch.eye(H.shape[0], dtype=torch.float64, device=H.device)
    rel = damp
    for attempt in range(MAX_DAMP_RETRIES + 1):
        L, info = torch.linalg.cholesky_ex(H64 + rel * mean_diag * eye)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                return U.float(), rel
        if attempt < MAX_DAMP_RETRIES:
            new = max(rel * 10, 1e-6)
            log.warning("gptq: H + %.3g·mean(diag H)·I is not positive definite; retrying with damp %.3g",
                        rel, new)
            rel = new
    raise ValueError(f"gptq_quantize: H is not positive definite even with damp {rel:.3g} "
                     f"(requested {damp}); check the calibration Hessian")


def _format_kwargs(fmt: NumberFormat, W0: torch.Tensor) -> dict:
    """Per-layer settings every block_state call must share (the format says: NVFP4's per-tensor scale)."""
    return fmt.shared_state_options(W0)


# ----------------------------------------------------------------------------- format scales


class _GroupScales:
    """The BlockState of each format group, computed when the loop first reaches one of its columns
    (or all up front when static); columns are in original order, ``perm[p]`` is the original
    column processed at position p."""

    def __init__(self, fmt: NumberFormat, n: int, perm: torch.Tensor, clip_ratio, kw: dict) -> None:
        self.fmt, self.n, self.clip_ratio, self.kw = fmt, n, clip_ratio, kw
        self.width = n if fmt.block_size < 0 else fmt.block_size
        self.perm = perm.tolist()
        self.inv = torch.argsort(perm).to(torch.long)  # original column -> position
        self.states: list[BlockState | None] = [None] * (-(-n // self.width))
        self.columns: list[dict | None] = [None] * len(self.states)  # a state's scales, one per column

    def columns_of(self, g: int) -> slice:
        return slice(g * self.width, min((g + 1) * self.width, self.n))

    def compute(self, g: int, values: torch.Tensor) -> None:
        # no finiteness check (a host sync per group): W and H were checked, and the final encode
        # checks Q, so a value that compensation made non-finite is still refused, once
        self.states[g] = self.fmt.block_state(values, self.clip_ratio, name=f"W[:, group {g}]",
                                              check_finite=False, **self.kw)
        # each scale tensor split into its columns once (views), so a column's scales are a list lookup
        self.columns[g] = {k: v if v.dim() == 0 else v.unbind(-1) for k, v in self.states[g].columns().items()}

    def compute_all(self, W0: torch.Tensor) -> None:
        for g in range(len(self.states)):
            self.compute(g, W0[:, self.columns_of(g)])

    def quantize(self, p: int, w: torch.Tensor, current: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """q for column position p (values w, ``[out]``); ``current(positions)`` gives the present values
        of columns at those positions, for a group reached for the first time.

        The format's element hooks on the column and its scales, as ``quantize_dequantize_with_state``
        computes them (the same values), without its per-call checks and shape plumbing: this runs
        once per column, where every kernel launch counts on a GPU. W and H were checked finite, so
        the output clamp of ``cast_out`` (which only changes ±inf) is left out too."""
        c = self.perm[p]
        g = c // self.width
        if self.states[g] is None:
            self.compute(g, current(self.inv[self.columns_of(g)]))
        j = c - g * self.width
        s = {k: v if isinstance(v, torch.Tensor) else v[j] for k, v in self.columns[g].items()}
        return self.fmt._dequantize(self.fmt._quantize(w, s), s)

    def joined(self) -> BlockState:
        return BlockState.cat(self.states)


# ----------------------------------------------------------------------------- the column loop


def _pending_values(W: torch.Tensor, E: torch.Tensor, U: torch.Tensor, i1: int, i2: int, p: int,
                    pos: torch.Tensor) -> torch.Tensor:
    """Present values of the columns at positions ``pos`` (all >= p) while column p of lazy block
    [i1, i2) is next: columns inside the block are current; later ones still lack the block's
    update from columns i1..p-1 (eq. 4 restricted to them)."""
    pos = pos.to(W.device)
    later = (pos >= i2).to(U.dtype)
    return W[:, pos] - E[:, : p - i1] @ (U[i1:p][:, pos] * later)


def _gptq_loop(W: torch.Tensor, U: torch.Tensor, block_size: int, groups: _GroupScales) -> torch.Tensor:
    """Algorithm 1 on W (processing order, float32, modified in place); returns the per-column loss.

    On return column p of W holds the value it had when it was quantized (later steps only update
    the columns after it), so Q is the format's rounding of W with the joined group scales (the
    caller's one batched call, equal to the q of each step). Per column: the format's element
    kernels, ``err = (w − q) / U_pp`` written straight into E, and eq. 2's rank-1 update of the rest
    of the block, in place; the loss of a block comes from E once the block is done."""
    out, n = W.shape
    losses = torch.empty(n, dtype=torch.float32, device=W.device)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        E = torch.empty(out, i2 - i1, dtype=W.dtype, device=W.device)  # (w_j − q_j) / U_jj per column
        Ublock = U[i1:i2, i1:i2]
        # the block's columns, E's columns, U's rows and diagonal as views, made once per block
        w_cols, e_cols, u_rows, u_diag = W[:, i1:i2].unbind(1), E.unbind(1), Ublock.unbind(0), Ublock.diagonal().unbind(0)
        for k in range(i2 - i1):
            p = i1 + k
            q = groups.quantize(p, w_cols[k], lambda pos: _pending_values(W, E, U, i1, i2, p, pos))
            err = torch.div(w_cols[k] - q, u_diag[k], out=e_cols[k])
            if k + 1 < i2 - i1:
                W[:, p + 1: i2].sub_(torch.outer(err, u_rows[k][k + 1:]))  # eq. 2 inside the block
        # ‖w − q‖² / (2 [H_F⁻¹]_jj) per column, eq. 2's error (each column's sum over contiguous rows)
        losses[i1:i2] = E.T.contiguous().square().sum(dim=1) / 2
        if i2 < n:
            W[:, i2:] -= E @ U[i1:i2, i2:]  # eq. 4: the block's batched update of later columns
    return losses


# ----------------------------------------------------------------------------- entry point


def gptq(W: torch.Tensor, H: torch.Tensor, fmt: NumberFormat, *, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = False, clip_ratio: float = 1.0,
                  static_groups: bool = False) -> GPTQResult:
    """Quantize ``W [out, in]`` to ``fmt`` with GPTQ, given ``H [in, in] = Σ xᵀx`` of the layer
    inputs (raw sum; any positive scale gives the same Q). See the module docstring for how format
    scales, act-order, dead inputs, damping and the reported loss are handled."""
    _check_inputs(W, H, fmt, block_size, damp)
    W0 = W.detach().to(torch.float32).clone()
    Hf = H.detach().to(device=W0.device, dtype=torch.float32)
    Hf = (Hf + Hf.T) / 2  # only symmetric H makes sense; exact for a symmetric input
    n_dead = _drop_dead_inputs(W0, Hf)
    n = W0.shape[1]

    if act_order:
        perm = torch.sort(torch.diagonal(Hf).cpu(), descending=True, stable=True).indices
    else:
        perm = torch.arange(n, device="cpu")  # host-side order; moved to W's device below
    groups = _GroupScales(fmt, n, perm, clip_ratio, _format_kwargs(fmt, W0))
    if static_groups:
        groups.compute_all(W0)

    p_dev = perm.to(W0.device)
    U, rel_damp = _inverse_cholesky(Hf[p_dev][:, p_dev], damp)
    Wp = W0[:, p_dev]  # indexing copies: W0 stays
    losses = _gptq_loop(Wp, U, block_size, groups)
    state = groups.joined()
    Q = fmt.quantize_dequantize(Wp[:, torch.argsort(p_dev)], state=state, check_finite=False)

    packed = fmt.encode(Q, state=state, name="GPTQ result")
    deq = fmt.decode(packed).float()
    if not torch.equal(deq, Q):
        bad = int((deq != Q).sum())
        raise RuntimeError(f"gptq: {fmt!r} does not reproduce {bad} GPTQ-quantized values when "
                           "encoding them with their own scales (a formats bug: encode must be idempotent)")
    return GPTQResult(packed=packed, dequantized=deq, loss=float(losses.double().sum()), damp=rel_damp,
                      dead_columns=n_dead)


__all__ = ["GPTQResult", "gptq", "gptq_quantize"]


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, fmt: NumberFormat, **options) -> torch.Tensor:
    """The fixed API: GPTQ-quantize ``weight [out, in]`` given ``hessian = Σ xᵀx``; returns the
    dequantized weight (float32). ``gptq`` gives the packed storage and the loss as well."""
    return gptq(weight, hessian, fmt, **options).dequantized
