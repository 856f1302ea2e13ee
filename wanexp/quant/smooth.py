"""Channel smoothing: ``X W = (X diag(s)⁻¹)(diag(s) W)`` moves activation outliers onto the weights.

Convention everywhere in wanexp: a layer with smoothing vector ``s`` (one entry per input channel)
runs ``(x · r) · (W · s)ᵀ`` where ``W [out, in]`` is scaled column-wise, ``s > 0`` and ``r`` is the fp32
reciprocal of ``s`` (:func:`reciprocal`, IEEE-rounded once): the smoothed input is ``bf16(x · r)``. A
multiplication, not a division, so the GPU quantizers smooth at copy speed (the correctly rounded
division cost the FP8 path's activation quantizer 0.5 ms of its 0.9 ms at K = 5120 on an H200), and
every path (reference, kernels, calibration) rounds the same product.
"""

from __future__ import annotations

import torch


def smoothquant_scales(act_stat: torch.Tensor, weight: torch.Tensor, alpha: float, eps: float = 1e-5) -> torch.Tensor:
    """SmoothQuant (Xiao et al. 2023, eq. 4): ``s_j = a_j^α / (max_o |W_oj|)^(1−α)``.

    ``act_stat`` is the per-channel activation magnitude (max |x|, or a high percentile for the
    tail-aware variant); channels that never fire (a_j = 0) keep s_j = 1.
    """
    a = act_stat.float().clamp_min(0)
    w = weight.detach().float().abs().amax(dim=0).clamp_min(eps)
    s = a.clamp_min(eps).pow(alpha) / w.pow(1.0 - alpha)
    return torch.where(a > 0, s, torch.ones_like(s)).clamp_min(eps)


def tail_aware_scales(act_stat: torch.Tensor, weight: torch.Tensor, alpha: float, eps: float = 1e-5) -> torch.Tensor:
    """The HiFloat4 paper's balancing: mask ``m_i = w_i^α / (a_i + eps)^(1−α)`` applied as ``x · m``,
    ``W · m⁻¹``; with our ``x / s`` convention that is ``s = 1 / m``. ``a_i`` is the p-th percentile
    of |x_i| (tail-aware) or the max (conservative)."""
    w = weight.detach().float().abs().amax(dim=0).clamp_min(eps)
    m = w.pow(alpha) / (act_stat.float().clamp_min(0) + eps).pow(1.0 - alpha)
    return (1.0 / m).clamp_min(eps)


def awq_scales(act_stat: torch.Tensor, weight: torch.Tensor, alpha: float, floor: float = 1e-4) -> torch.Tensor:
    """AWQ (Lin et al. 2024, eq. 5): ``s = a^α`` with ``a`` the mean |x| per input channel, α found by a
    grid search (the caller's), then normalised so that ``max(s) · min(s) = 1`` as the authors' code
    does (scaling s by a constant changes nothing but the quantization grid's offset; normalising keeps
    the weights in range). α = 0 gives s = 1: plain RTN is on every grid. ``weight`` is unused (the
    scale is activation-aware only); it is taken so every statistic-to-scale rule has one signature."""
    s = act_stat.float().clamp_min(0).pow(alpha).clamp_min(floor)
    return s / (s.max() * s.min()).sqrt()


def channel_mean_abs(tokens: torch.Tensor) -> torch.Tensor:
    """Mean |x| per channel over a token sample ``[n, in]`` (AWQ's activation statistic)."""
    return tokens.float().abs().mean(dim=0)


def channel_percentile(tokens: torch.Tensor, p: float) -> torch.Tensor:
    """The p-th percentile (0–100) of |x| per channel over a token sample ``[n, in]``."""
    return torch.quantile(tokens.float().abs(), p / 100.0, dim=0)


def reciprocal(s: torch.Tensor) -> torch.Tensor:
    """``r = 1 / s`` in fp32, correctly rounded (IEEE division): the multiplier a layer smooths with."""
    return torch.reciprocal(s.detach().float())


def smooth_input(x: torch.Tensor, r: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The smoothed input ``bf16(x · r)`` (``dtype``-rounded once from the fp32 product); ``x`` in ``dtype``
    when there is no smoothing."""
    x = x.to(dtype)
    return x if r is None else (x.float() * r).to(dtype)


def apply_to_weight(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``W · diag(s)``; with a per-bin table ``s [bins, in]`` one scaled weight per bin, ``[bins, out, in]``."""
    return weight.float() * s.float().unsqueeze(-2)


def smooth_hessian(hessian: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """H of the smoothed inputs ``x · s⁻¹``: ``diag(1/s) H diag(1/s)`` (GPTQ sees what the residual sees)."""
    inv = 1.0 / s.double()
    return (hessian.double() * inv[:, None] * inv[None, :]).float()
