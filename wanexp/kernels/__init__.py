"""Fused GPU kernels (Triton) for QuantLinear, each with the plain-torch reference as its spec.

:class:`wanexp.quant.linear.QuantLinear` calls :func:`fused_forward` when :func:`can_fuse` says
yes: the input is on CUDA, Triton imports, weights and activations are both MXFP4, the compute
dtype is bf16, ``in_features`` is a multiple of 128 and the fused path is enabled; or both are
INT4, NVFP4 or HiF4 (:mod:`wanexp.kernels.upcast`: a fused activation quantizer, the reference
GEMMs; INT4 in groups of 128 on Hopper at video sizes: :mod:`wanexp.kernels.int4_fp8`, its codes on
FP8 tensor cores with the group scales in cuBLAS's block-scaled GEMM). Anything else (CPU, W4A16, other formats, odd shapes, activations rounded with ``ties="toward_zero"``, which the
kernel's RNE does not do, a per-timestep-bin smoothing table with its per-bin weights) runs the
reference forward, unchanged.

Switches, so one process can time both paths:

* ``with wanexp.kernels.fused(False): model(...)``  forces the reference path (``fused(True)``
  re-enables it); ``set_fused(bool)`` does the same without a context;
* ``WANEXP_FUSED=0`` in the environment starts with it off;
* ``layer.fused = False`` on one QuantLinear keeps that layer on the reference path;
* ``with gemm_backend("triton" | "cublas" | "fp8" | "fp8_rowwise" | "fp8_triton" | "auto")`` (env ``WANEXP_FUSED_GEMM``) picks the GEMM
  after the fused activation quantizer: the Triton GEMM that reads the packed weight, an exact
  upcast of the weight into a transient bf16 buffer + one cuBLAS GEMM, or the FP8 tensor cores
  (:mod:`wanexp.kernels.mxfp4_fp8`; ``fp8_triton``: its GEMM in Triton with the low-rank branch in the
  epilogue, :mod:`wanexp.kernels.fp8_gemm`). ``auto``: above :data:`UPCAST_MIN_TOKENS` tokens the FP8 path
  on Hopper and newer (:func:`fp8_preferred`; measured faster than the upcast at 720p and 480p on
  an H200) and the upcast elsewhere; the Triton GEMM at or below it.

The kernels and their math: :mod:`wanexp.kernels.mxfp4`; the FP8 fold: :mod:`wanexp.kernels.mxfp4_fp8`.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

_STATE = {"enabled": os.environ.get("WANEXP_FUSED", "1") != "0", "triton": None,
          "gemm": os.environ.get("WANEXP_FUSED_GEMM", "auto"), "check": "layer"}
# Above this many tokens, "auto" runs the GEMM on FP8 tensor cores (Hopper and newer) or as
# upcast-to-scratch + cuBLAS (wanexp.kernels.mxfp4.upcast_linear); at or below it, the Triton GEMM on
# the packed weight.
UPCAST_MIN_TOKENS = 4096


FP8_BACKENDS = ("fp8", "fp8_unchecked", "fp8_triton", "fp8_rowwise")
GEMM_BACKENDS = ("auto", "triton", "cublas", *FP8_BACKENDS)


def set_gemm_backend(backend: str) -> None:
    """"auto" (default: see the module docstring), "triton" (always the fused packed-weight GEMM),
    "cublas" (always upcast-to-scratch + cuBLAS) or "fp8" (block scales folded per row into E4M3
    operands, one row-wise-scaled FP8 GEMM: :mod:`wanexp.kernels.mxfp4_fp8`; where the device has no
    FP8 tensor cores, or a shape does not suit, the upcast or Triton GEMM as "auto" would pick without
    FP8). "fp8_unchecked" is a diagnostic for the bench only: the FP8 path without its exact-fallback
    check (one host sync a call), to measure what that sync costs; rows beyond the fold's bound would
    then be rounded, so it never serves a run. "fp8_triton": the FP8 path with its GEMM in Triton, bias and
    low-rank branch in the epilogue, one rounding (:mod:`wanexp.kernels.fp8_gemm`; measured slower than
    cuBLAS + the branch's pass on the H200, an option for numerics ablations). "fp8_rowwise": every
    layer on the row-wise-scaled FP8 GEMM ("fp8" gives the layers with a low-rank branch the tensor-wise
    GEMM and the scales in the branch's pass: :func:`~wanexp.kernels.mxfp4_fp8.fp8_linear`)."""
    if backend not in GEMM_BACKENDS:
        raise ValueError(f"gemm backend must be {' | '.join(GEMM_BACKENDS)}, got {backend!r}")
    _STATE["gemm"] = backend


@contextlib.contextmanager
def gemm_backend(backend: str) -> Iterator[None]:
    before = _STATE["gemm"]
    set_gemm_backend(backend)
    try:
        yield
    finally:
        _STATE["gemm"] = before


def triton_available() -> bool:
    if _STATE["triton"] is None:
        try:
            import triton  # noqa: F401
            _STATE["triton"] = True
        except Exception:  # pragma: no cover - triton missing or broken
            _STATE["triton"] = False
    return bool(_STATE["triton"])


def fused_enabled() -> bool:
    return bool(_STATE["enabled"])


def set_fused(enabled: bool) -> None:
    _STATE["enabled"] = bool(enabled)


@contextlib.contextmanager
def fused(enabled: bool = True) -> Iterator[None]:
    """Run the block with the fused path on (True) or forced off (False)."""
    before = _STATE["enabled"]
    _STATE["enabled"] = bool(enabled)
    try:
        yield
    finally:
        _STATE["enabled"] = before


def supports_layer(layer) -> bool:
    """Static part of the check: formats, dtype, shapes (see the module docstring)."""
    meta = layer.weight_meta
    act = layer.act_format_spec
    return (meta is not None and meta["format"] == "mxfp4" and act is not None and act.get("name") == "mxfp4"
            and layer.compute_dtype == torch.bfloat16 and layer.in_features % 128 == 0
            and list(meta["shape"]) == [layer.out_features, layer.in_features]
            and (layer.smooth is None or layer.smooth.dim() == 1)  # a per-bin smoothing table: reference path
            and getattr(layer.act_format, "scale_rule", None) in ("floor", "ceil")
            and getattr(layer.act_format, "ties", "even") == "even")  # ties toward zero: reference path


def supports_upcast(layer) -> bool:
    """INT4 and NVFP4 W4A4 layers the fused activation quantizers take (:mod:`wanexp.kernels.upcast`)."""
    if not triton_available():
        return False
    from wanexp.kernels.upcast import supports_layer as upcast_supports
    return upcast_supports(layer)


def can_fuse(layer, x: torch.Tensor) -> bool:
    return (x.is_cuda and _STATE["enabled"] and getattr(layer, "fused", True) and triton_available()
            and (supports_layer(layer) or supports_upcast(layer)))


def fp8_capable(device: torch.device) -> bool:
    """FP8 tensor cores (compute capability 8.9+), or the CPU, where ``torch._scaled_mm`` runs
    (Triton's interpreter tests the fold there)."""
    if device.type == "cpu":
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_preferred(device: torch.device) -> bool:
    """Whether ``auto`` takes the FP8 path on ``device``: a GPU of compute capability 9.0+ (Hopper;
    row-wise scaled ``torch._scaled_mm``), where it was measured faster than the bf16 upcast."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def fused_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """QuantLinear's forward through the fused kernels (same numerics as the reference, up to the
    final rounding; see :mod:`wanexp.kernels.mxfp4`), as one custom op (``wanexp::mxfp4_w4a4``)
    that ``torch.compile`` keeps whole: no graph break in the hot path."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, layer.in_features).to(torch.bfloat16)
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) != layer.in_features):
        x2 = x2.contiguous()
    if x2.shape[0] == 0:
        return x.new_empty(*lead, layer.out_features)
    if layer._pinned_bin is not None or layer.context is None:  # at_bin() (eager evaluation) or no context
        bin_index = torch.tensor(layer.current_bin(), dtype=torch.int64)
    else:
        bin_index = layer.context.bin_index
    backend = _STATE["gemm"]
    if layer.weight_meta["format"] != "mxfp4":  # INT4, NVFP4, HiF4: wanexp.kernels.upcast, INT4 also int4_fp8
        if _int4_on_fp8(layer, x2, backend):
            from wanexp.kernels.int4_fp8 import int4_fp8_forward
            return int4_fp8_forward(layer, x2, bin_index).reshape(*lead, layer.out_features).to(x.dtype)
        from wanexp.kernels.upcast import upcast_forward
        return upcast_forward(layer, x2, bin_index).reshape(*lead, layer.out_features).to(x.dtype)
    if backend == "auto" and x2.shape[0] > UPCAST_MIN_TOKENS and fp8_preferred(x2.device):
        backend = "fp8"
    fp8 = backend in FP8_BACKENDS
    if fp8 and not (fp8_capable(x2.device) and layer.out_features % 16 == 0):
        backend, fp8 = "auto", False
    rows = weight_rows(layer)
    has_lr = layer.lowrank_up is not None
    # inside block_checked(): the activation rows' spread goes to the layer's peak, checked once a block
    deferred = fp8 and _STATE["check"] == "block" and backend != "fp8_unchecked" and not rows["wide"]
    y = torch.ops.wanexp.mxfp4_w4a4(
        x2, layer.wq_codes, layer.wq_scales, layer.clip_table, bin_index, layer.smooth_recip, layer.bias,
        layer.lowrank_up if has_lr else None, layer.lowrank_down if has_lr else None,
        rows["exponent"] if fp8 else None, rows["spread"] if fp8 else None, layer.counters,
        layer.act_format.scale_rule, backend, rows["peak"], deferred)
    return y.reshape(*lead, layer.out_features).to(x.dtype)


def _int4_on_fp8(layer, x2: torch.Tensor, backend: str) -> bool:
    """Whether an INT4 layer takes the block-scaled FP8 GEMM (:mod:`wanexp.kernels.int4_fp8`): "auto"
    above :data:`UPCAST_MIN_TOKENS` tokens on Hopper and newer, an FP8 backend wherever cuBLAS has
    the GEMM (compute capability 9.0+) or on the CPU (its torch reference, for the tests); "cublas"
    and "triton" keep the upcast."""
    if layer.weight_meta["format"] != "int4" or backend not in ("auto", *FP8_BACKENDS):
        return False
    from wanexp.kernels.int4_fp8 import supports
    if not supports(layer, x2):
        return False
    if backend == "auto":
        return x2.shape[0] > UPCAST_MIN_TOKENS and fp8_preferred(x2.device)
    return x2.device.type == "cpu" or fp8_preferred(x2.device)


def weight_rows(layer) -> dict[str, torch.Tensor]:
    """The FP8 fold's per-row exponents and spreads of the layer's weight, computed once per layer
    and device (``QuantLinear.kernel_cache``, dropped when the layer moves; :func:`prepare` fills it
    ahead of ``torch.compile``)."""
    cached = layer.kernel_cache.get("fp8_rows")
    if cached is None:
        from wanexp.kernels.mxfp4_fp8 import MAX_SPREAD, row_exponents
        S, spread = row_exponents(layer.wq_codes, layer.wq_scales)
        cached = layer.kernel_cache["fp8_rows"] = {
            "exponent": S.contiguous(), "spread": spread.contiguous(),
            # weight rows beyond the bound: this layer's check stays per call (block_checked)
            "wide": bool(spread.max() > MAX_SPREAD) if spread.numel() else False,
            # the largest activation-row spread since the block's last check (block_checked)
            "peak": torch.zeros(1, dtype=torch.int32, device=S.device)}
    return cached


@contextlib.contextmanager
def deferred_checks() -> Iterator[None]:
    """FP8 layers record their activation rows' largest spread instead of searching for rows beyond
    the fold's bound (and syncing with the host) at every call: :func:`block_checked` runs a block so."""
    before = _STATE["check"]
    _STATE["check"] = "block"
    try:
        yield
    finally:
        _STATE["check"] = before


def block_checked(block: torch.nn.Module) -> torch.nn.Module:
    """Check the FP8 fold's bound once per call of ``block`` instead of once per layer (in place;
    idempotent). The block runs under :func:`deferred_checks`; then one host sync reads the peaks of
    its layers, and if an activation row anywhere in it spanned more than ``MAX_SPREAD`` octaves
    (none did in any bench or run so far), the block runs again with every layer's exact fallback, so
    the output is what per-layer checks give. The syncs of one 40-block forward fall from one per FP8
    layer (400, 0.05 s on the H200, round 18b) to 40. Wraps the compiled call when ``block`` is
    compiled (``nn.Module.compile``: call this after it), the plain one otherwise; a block that is
    compiled afresh (its ``_compiled_call_impl`` reset) drops the wrapper. Layers with weight rows
    beyond the bound keep their per-call check; a rerun counts its layers' calls twice
    (``QuantLinear.calls``)."""
    inner = block._compiled_call_impl or block._call_impl
    if getattr(inner, "_wanexp_block_checked", False):
        return block
    from wanexp.kernels.mxfp4_fp8 import MAX_SPREAD
    layers = [m for m in block.modules() if getattr(m, "weight_meta", None) is not None and hasattr(m, "kernel_cache")]

    def call(*args, **kwargs):
        with deferred_checks():
            out = inner(*args, **kwargs)
        peaks = [c["peak"] for c in (m.kernel_cache.get("fp8_rows") for m in layers) if c is not None]
        if peaks and int(torch.cat(peaks).max()) > MAX_SPREAD:   # the one host sync of the block
            for p in peaks:
                p.zero_()
            out = inner(*args, **kwargs)                         # per-layer checks: the exact fallback
        return out
    call._wanexp_block_checked = True
    block._compiled_call_impl = call
    return block


def prepare(model: torch.nn.Module) -> int:
    """Fill the kernel caches of every fusable QuantLinear of ``model`` (before compiling it, so the
    compiled graph finds them); returns how many layers."""
    triton_available()  # resolved now: a first call inside a compiled graph would be a guard that fails once
    # QuantLinear layers, told by their packed weight (the kernels sit below wanexp.quant.linear)
    layers = [m for m in model.modules() if getattr(m, "weight_meta", None) is not None and hasattr(m, "kernel_cache")
              and supports_layer(m)]
    for layer in layers:
        weight_rows(layer)
    return len(layers)


@torch.library.custom_op("wanexp::mxfp4_w4a4", mutates_args=("counters", "spread_peak"))
def _mxfp4_w4a4(x2: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, clip_table: torch.Tensor,
                bin_index: torch.Tensor, smooth_recip: torch.Tensor | None, bias: torch.Tensor | None,
                up: torch.Tensor | None, down: torch.Tensor | None, w_exponent: torch.Tensor | None,
                w_spread: torch.Tensor | None, counters: torch.Tensor, scale_rule: str,
                backend: str, spread_peak: torch.Tensor, defer_check: bool) -> torch.Tensor:
    """The fused W4A4 MXFP4 linear on explicit tensors (``x2 [M, K]`` bf16 -> ``[M, N]`` bf16); with
    ``defer_check`` (FP8 backends, :func:`deferred_checks`) the bound is not checked here: the largest
    activation-row spread goes into ``spread_peak`` instead. (``spread_peak`` is always a tensor: torch
    2.11's custom ops fail on a mutated optional argument given as None.)"""
    from wanexp.kernels.mxfp4 import act_quant, lowrank_down, mxfp4_linear, upcast_linear
    bin_ = min(int(bin_index), clip_table.numel() - 1)   # a CPU tensor: no device sync
    if backend in FP8_BACKENDS:
        from wanexp.kernels.mxfp4_fp8 import fp8_linear
        return fp8_linear(x2, codes, scales, clip_table, bin_, smooth_recip, bias, up, down, w_exponent, w_spread,
                          scale_rule, counters, check=backend != "fp8_unchecked", triton_gemm=backend == "fp8_triton",
                          rowwise=backend == "fp8_rowwise",
                          spread_peak=spread_peak if defer_check else None)
    if backend == "cublas" or (backend == "auto" and x2.shape[0] > UPCAST_MIN_TOKENS):
        return upcast_linear(x2, codes, scales, clip_table, bin_, smooth_recip, scale_rule, bias, up, down)
    q = act_quant(x2, clip_table, bin_, smooth_recip, scale_rule=scale_rule)
    t = None
    if up is not None:  # the 16-bit branch sees the smoothed, unquantized input (x itself without smoothing)
        t = lowrank_down(x2, smooth_recip, down)
    return mxfp4_linear(q["xq"], codes, scales, bias, t, up)


@_mxfp4_w4a4.register_fake
def _(x2, codes, scales, clip_table, bin_index, smooth_recip, bias, up, down, w_exponent, w_spread, counters,
      scale_rule, backend, spread_peak, defer_check):
    return x2.new_empty(x2.shape[0], codes.shape[0])


__all__ = ["GEMM_BACKENDS", "UPCAST_MIN_TOKENS", "block_checked", "deferred_checks", "fp8_capable", "prepare", "supports_upcast", "weight_rows", "can_fuse", "fused", "gemm_backend", "set_gemm_backend", "fused_enabled", "fused_forward", "set_fused", "supports_layer",
           "triton_available"]
