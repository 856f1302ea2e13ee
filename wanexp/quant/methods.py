"""The quantization methods, as one layer builder driven by a config.

For a linear layer ``Y = X Wᵀ`` with calibration statistics of its inputs, the methods of the two
papers are compositions of four steps:

    1. smoothing       s from an activation statistic (max or percentile) and the weight, α searched
    2. low-rank        D W = L1 L2 + R             (SVDQuant; L1 L2 kept 16-bit)
    3. residual        R → RTN or GPTQ             (GPTQ's Hessian from the smoothed inputs)
    4. clip table      ρ per timestep bin           (TS-clip: argmin of the layer output error per bin)

| method            | smoothing            | rank | residual | clip table            |
|-------------------|----------------------|------|----------|-----------------------|
| w4a16             | –                    | 0    | RTN      | – (activations 16-bit) |
| rtn               | –                    | 0    | RTN      | 1.0                   |
| svdquant_rtn      | max, α searched      | r    | RTN      | 1.0                   |
| svdquant_gptq     | max, α searched      | r    | GPTQ     | 1.0                   |
| tsclip            | max, α searched      | r    | GPTQ     | searched per bin      |
| hif4_tailaware    | percentile p, α fixed| 0    | RTN      | 1.0                   |

The field's recipes (``conf/quant/{smoothquant,fp8_dynamic,awq,viditq}.yaml``, README "The field's
recipes") are points of the same table, with their own formats:

| method            | smoothing                        | rank | residual | activations            |
|-------------------|----------------------------------|------|----------|------------------------|
| smoothquant       | max, α = 0.5                     | 0    | RTN      | INT8 per token         |
| fp8_dynamic       | –                                | 0    | RTN      | FP8 E4M3 per token     |
| awq               | mean abs, s = aᵅ, α searched     | 0    | RTN      | – (16-bit)             |
| viditq            | max per timestep bin, α = 0.5    | 0    | RTN      | the format's (MXFP4)   |

The seed paper's public code makes other choices at several of these steps; each is a knob here
(``conf/quant/*_paper_code.yaml`` set them all, README "The seed paper code's recipe"):

| knob               | wanexp (default)                           | the paper code                                   |
|--------------------|--------------------------------------------|--------------------------------------------------|
| ``alpha``, ``rank`` | α searched in a grid, r = the model's      | α = 0.5, r = 16                                  |
| ``hessian_input``  | ``smoothed``: diag(1/s) XᵀX diag(1/s)       | ``smoothed_act_quant``: Σ Q_A(x/s)ᵀ Q_A(x/s), clip 1 (a second calibration pass) |
| ``gptq.static_groups`` | false: scales as GPTQ reaches a block  | true: from the original residual                 |
| ``exp_shifts``     | [0]                                        | [-1, 0, 1]: 15 candidates with the 5 clip ratios |
| ``clip_search_data`` | ``calib_tokens``: the BF16 calibration token sample of each bin | ``w4a4_generation``: the inputs of one W4A4 CFG generation (:mod:`wanexp.quant.clip_search`) |
| ``clip_metric``    | ``bf16_output``: ‖x Wᵀ − Ŷ(x; ρ)‖²          | ``wq_output_rel``: relative to the weight-quantized layer |
| ``clip_exclude``   | []                                         | [blocks.*.attn2]: cross-attention keeps ρ = 1     |

Everything here is plain torch on tensors; the runner feeds the statistics per expert (or pooled
over both experts for the ``shared`` policy).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from wanexp.errors import WanexpError
from wanexp.formats import NumberFormat, get_format
from wanexp.quant.awq import AWQ_RATIOS
from wanexp.quant.api import build_timed
from wanexp.quant.clip_search import candidates, ratio, relative_errors, searched
from wanexp.quant.linear import QuantLinear
from wanexp.quant.lowrank import split_lowrank
from wanexp.quant.smooth import (apply_to_weight, awq_scales, channel_mean_abs, channel_percentile, reciprocal,
                                 smooth_hessian, smooth_input, smoothquant_scales, tail_aware_scales)
from wanexp.schema import CLIP_CANDIDATES, EXPERTS, PERCENTILE


@dataclass
class LayerStats:
    """Calibration statistics of one layer's inputs (one expert, or both pooled)."""

    absmax: torch.Tensor | None = None                       # [in], max over every bin
    hessian: torch.Tensor | None = None                      # [in, in], Σ xᵀx over every bin
    tokens: dict[int, torch.Tensor] = field(default_factory=dict)  # bin → [n, in] sample
    bin_absmax: dict[int, torch.Tensor] = field(default_factory=dict)  # bin → [in], max within the bin

    def all_tokens(self) -> torch.Tensor | None:
        return torch.cat([self.tokens[b] for b in sorted(self.tokens)]) if self.tokens else None

    def visited(self, bin_: int) -> bool:
        """Whether calibration saw this bin (a token sample or maxima of it)."""
        return bin_ in self.bin_absmax or (self.tokens.get(bin_) is not None and self.tokens[bin_].shape[0] > 0)

    def of_bin(self, bin_: int) -> "LayerStats":
        """The statistics of one timestep bin alone (its maxima as ``absmax``, its token sample)."""
        tokens = {bin_: self.tokens[bin_]} if bin_ in self.tokens else {}
        return LayerStats(absmax=self.bin_absmax.get(bin_), tokens=tokens)

    def to(self, device: torch.device) -> "LayerStats":
        """These statistics on ``device`` (where the layer they describe is built)."""
        move = (lambda t: None if t is None else t.to(device))
        return LayerStats(absmax=move(self.absmax), hessian=move(self.hessian),
                          tokens={b: move(t) for b, t in self.tokens.items()},
                          bin_absmax={b: move(t) for b, t in self.bin_absmax.items()})


@dataclass(frozen=True)
class QuantRecipe:
    """One method (``conf/quant/*.yaml``) with its formats, as pure parameters (frozen, as torchao's
    configs): ``build(name, linear, stats)`` makes one QuantLinear and says what it chose; nothing is
    kept between layers. :func:`wanexp.quant.api.quantize_` applies it to a model and returns the
    choices per layer, which the runner records (``choices.json``)."""

    name: str
    weight_format: dict
    act_format: dict | None
    smoothing: str | None = None                   # None | "max" | "percentile" | "awq" (mean |x|, s = a^α)
    smoothing_per_bin: bool = False                # one smoothing vector (and weight) per timestep bin (ViDiT-Q)
    alpha: float | Sequence[float] = 0.5           # one value, or a grid searched per layer
    percentile: float = PERCENTILE
    rank: int = 0
    lowrank_solver: str = "svd"                    # "svd" (exact, float64) | "randomized" (wanexp.quant.lowrank)
    residual: str = "rtn"                          # "rtn" | "gptq"
    gptq: dict = field(default_factory=dict)       # block_size, damp, act_order, static_groups
    clip_search: bool = False
    clip_candidates: Sequence[float] = CLIP_CANDIDATES
    exp_shifts: Sequence[int] = (0,)               # shared-exponent shifts tried with every clip ratio
    clip_search_data: str = "calib_tokens"         # "calib_tokens" | "w4a4_generation" (the run's W4A4 pass)
    clip_metric: str = "bf16_output"               # "bf16_output" | "wq_output_rel"
    clip_exclude: Sequence[str] = ()               # layers that keep ρ = 1 (module patterns)
    weight_clip_search: bool = False               # AWQ's per-(row, group) weight clipping (wanexp.quant.awq)
    weight_clip_ratios: Sequence[float] = AWQ_RATIOS
    weight_clip_exclude: Sequence[str] = ()        # layers whose weights are not clipped (AWQ: q and k)
    hessian_input: str = "smoothed"                # "smoothed" | "smoothed_act_quant"
    num_bins: int = 1
    compute_dtype: torch.dtype = torch.bfloat16

    # -- what calibration must record -----------------------------------------------------
    @staticmethod
    def needs(quant_cfg: Mapping[str, Any]) -> list[str]:
        need = set()
        if quant_cfg.get("smoothing"):
            need |= {"absmax", "tokens"}
        if quant_cfg.get("residual") == "gptq":
            need.add("hessian")
        if quant_cfg.get("clip_search") and quant_cfg.get("clip_search_data", "calib_tokens") == "calib_tokens":
            need.add("tokens")
        if quant_cfg.get("weight_clip_search"):
            need.add("tokens")
        return sorted(need)

    @staticmethod
    def second_pass(quant_cfg: Mapping[str, Any]) -> bool:
        """Whether the Hessian is of the smoothed, activation-quantized inputs, which needs the smoothing
        vector, i.e. a first calibration pass's maxima (the paper code's GPTQ input)."""
        return quant_cfg.get("residual") == "gptq" and quant_cfg.get("hessian_input", "smoothed") == "smoothed_act_quant"

    @torch.no_grad()
    def hessian_input_fn(self, linear: nn.Linear, stats: LayerStats):
        """``x ↦ Q_A(x / s; ρ = 1)`` for the second calibration pass: what the residual GEMM of this layer
        will see at clip 1, smoothed and rounded as :meth:`QuantLinear.reference_forward` does."""
        s, _ = self._smoothing(linear.weight.detach().float(), stats)
        fmt = get_format(self.act_format["name"], **self.act_format.get("opts", {}))
        r = reciprocal(s).to(linear.weight.device)

        def transform(x: torch.Tensor) -> torch.Tensor:
            return fmt.quantize_dequantize(smooth_input(x, r, self.compute_dtype), check_finite=False).float()
        return transform

    def search_candidates(self) -> list[tuple[float, int]]:
        return candidates(self.clip_candidates, self.exp_shifts)

    def searches(self, name: str) -> bool:
        """Whether TS-clip searches this layer (``clip_exclude`` aside, every quantized one)."""
        return self.clip_search and bool(searched([name], self.clip_exclude))

    # -- formats --------------------------------------------------------------------------
    def _wfmt(self) -> NumberFormat:
        return get_format(self.weight_format["name"], **self.weight_format.get("opts", {}))

    # -- the layer --------------------------------------------------------------------------
    def build(self, name: str, linear: nn.Linear, stats: LayerStats | None = None) -> tuple[QuantLinear, dict]:
        """The QuantLinear of ``linear`` (layer ``name``) from its calibration ``stats`` (None: none),
        and what was chosen for it (α, clip table, GPTQ loss, the sensitivity numbers)."""
        w = linear.weight.detach().float()
        stats = (stats or LayerStats()).to(w.device)  # the statistics come to the weight
        chosen: dict[str, Any] = {}
        s = None
        if self.smoothing and self.smoothing_per_bin:
            s, chosen["alpha"] = self._smoothing_per_bin(w, stats)
        elif self.smoothing:
            s, chosen["alpha"] = self._smoothing(w, stats)
        ws = w if s is None else apply_to_weight(w, s)  # [bins, out, in] with a per-bin table
        l1, l2, residual = self._lowrank(ws)
        packed = self._quantize_residual(residual, stats, s, chosen, name)
        layer = QuantLinear(linear.in_features, linear.out_features, weight=packed, bias=linear.bias,
                            act_format=self.act_format, smooth=s,
                            lowrank=None if l1 is None else (l1, l2), compute_dtype=self.compute_dtype)
        self._clip_table(name, layer, w, stats)
        chosen["clip"] = [round(r, 6) for r in layer.clip_table.tolist()]
        chosen.update(self.sensitivity(layer, w, stats))
        return layer, chosen

    @torch.no_grad()
    def sensitivity(self, layer: QuantLinear, w: torch.Tensor, stats: LayerStats) -> dict[str, Any]:
        """How far the quantized layer is from ``x Wᵀ`` (the seed paper's Fig. 4 numbers).

        ``w_cos_err``: 1 − cos(W, Ŵ) of the effective weight (every method, no data needed).
        With a calibration token sample: ``cos_err`` = 1 − the mean over tokens of cos(x Wᵀ, Ŷ(x)),
        ``rel_err`` = ‖x Wᵀ − Ŷ‖² / ‖x Wᵀ‖², and ``cos_err_bins`` per timestep bin, each bin's tokens
        run with that bin's clip ratio (as at inference)."""
        weight_bins = range(max(1, layer.smooth_bins))  # a per-bin table: the mean over its bins' weights
        errs = []
        for b in weight_bins:
            with layer.at_bin(b):
                errs.append(_cos_err(effective_weight(layer).reshape(1, -1), w.reshape(1, -1)))
        out: dict[str, Any] = {"w_cos_err": sum(errs) / len(errs)}
        if not stats.tokens:
            return out
        refs, outs, per_bin = [], [], [None] * self.num_bins
        for b in sorted(stats.tokens):
            tokens = stats.tokens[b]
            if tokens is None or tokens.shape[0] == 0:
                continue
            with layer.at_bin(max(b, 0)):  # each bin's tokens at that bin's clip ratio (and smoothing)
                ref, got = _outputs(layer, tokens, w)
            if 0 <= b < self.num_bins:
                per_bin[b] = _cos_err(got, ref)
            refs.append(ref)
            outs.append(got)
        if refs:
            ref, got = torch.cat(refs), torch.cat(outs)
            out.update(cos_err=_cos_err(got, ref), cos_err_bins=per_bin,
                       rel_err=float((got - ref).square().sum() / ref.square().sum().clamp_min(1e-30)))
        return out

    def _lowrank(self, ws: torch.Tensor):
        l1, l2, _ = split_lowrank(ws, self.rank, self.lowrank_solver)
        if l1 is None:
            return None, None, ws
        # the branch is stored in 16 bits: quantize the residual of what will actually be stored
        l1, l2 = l1.to(self.compute_dtype), l2.to(self.compute_dtype)
        return l1, l2, ws - l1.float() @ l2.float()

    def _smoothing(self, w: torch.Tensor, stats: LayerStats) -> tuple[torch.Tensor, float]:
        if self.smoothing == "percentile":
            tokens = stats.all_tokens()
            if tokens is None:
                raise ValueError("percentile smoothing needs a calibration token sample")
            a, scales = channel_percentile(tokens, self.percentile), tail_aware_scales
        elif self.smoothing == "max":
            if stats.absmax is None:
                raise ValueError("max smoothing needs per-channel activation maxima from calibration")
            a, scales = stats.absmax, smoothquant_scales
        elif self.smoothing == "awq":
            tokens = stats.all_tokens()
            if tokens is None:
                raise ValueError("AWQ scaling needs a calibration token sample (its mean |x| per channel)")
            a, scales = channel_mean_abs(tokens), awq_scales
        else:
            raise ValueError(f"unknown smoothing {self.smoothing!r} (max | percentile | awq)")
        grid = [float(self.alpha)] if isinstance(self.alpha, (int, float)) else [float(v) for v in self.alpha]
        if len(grid) == 1:
            return scales(a, w, grid[0]), grid[0]
        tokens = stats.all_tokens()
        if tokens is None:
            raise ValueError("searching the migration strength needs a calibration token sample")
        # α minimising this layer's output error with an RTN residual and no clipping (cheap, and
        # the ordering of α it gives is what matters; GPTQ and clipping only lower every error).
        # the errors stay on the device until all are in: one host sync for the whole grid
        errors = torch.stack([self._rtn_output_error(tokens, w, scales(a, w, alpha)) for alpha in grid])
        best = grid[int(torch.argmin(errors))]  # the first of equal errors, as min() over the grid
        return scales(a, w, best), best

    def _smoothing_per_bin(self, w: torch.Tensor, stats: LayerStats) -> tuple[torch.Tensor, list[float]]:
        """ViDiT-Q-style timestep-aware balancing: bin b's smoothing vector from bin b's statistics alone
        (its maxima, or its tokens for the percentile and AWQ statistics; α searched on its tokens when
        a grid is given), as a ``[bins, in]`` table. A bin calibration never visited gets the smoothing
        of all bins pooled."""
        if self.residual != "rtn" or self.rank:
            raise ValueError("per-bin smoothing stores one weight per bin: it takes an RTN residual and rank 0")
        rows, alphas, pooled = [], [], None
        for b in range(self.num_bins):
            if stats.visited(b):
                if self.smoothing == "max" and b not in stats.bin_absmax:
                    raise ValueError(f"per-bin max smoothing needs the activation maxima of bin {b} from calibration")
                s_b, alpha = self._smoothing(w, stats.of_bin(b))
            else:
                pooled = pooled or self._smoothing(w, stats)
                s_b, alpha = pooled
            rows.append(s_b)
            alphas.append(alpha)
        return torch.stack(rows), alphas

    def _quantize_residual(self, residual: torch.Tensor, stats: LayerStats, s, chosen: dict, name: str = ""):
        fmt = self._wfmt()
        if self.residual == "rtn" and self.weight_clip_search and searched([name], self.weight_clip_exclude):
            return self._clipped_rtn(fmt, residual, stats, s, chosen)
        if self.residual == "rtn":
            return fmt.encode(residual)
        if self.residual != "gptq":
            raise ValueError(f"unknown residual quantizer {self.residual!r} (rtn | gptq)")
        if stats.hessian is None:
            raise ValueError("GPTQ needs the Hessian of the layer inputs from calibration")
        from wanexp.quant.gptq import gptq
        # smoothed_act_quant: calibration already recorded Σ Q_A(x/s)ᵀ Q_A(x/s), the smoothed space
        h = stats.hessian if s is None or self.hessian_input == "smoothed_act_quant" else smooth_hessian(stats.hessian, s)
        options = dict(self.gptq)
        # a GPTQ block wider than the layer is just the layer (rounded up to whole format blocks)
        fb = max(1, int(fmt.block_size or 1))
        options["block_size"] = min(int(options.get("block_size", 128)), -(-residual.shape[1] // fb) * fb)
        result = gptq(residual, h, fmt, **options)
        chosen["gptq_loss"] = float(result.loss)
        return result.packed

    def _clipped_rtn(self, fmt: NumberFormat, residual: torch.Tensor, stats: LayerStats, s, chosen: dict):
        """RTN with AWQ's weight-clipping search on the smoothed calibration tokens (:mod:`wanexp.quant.awq`)."""
        from wanexp.quant.awq import clip_ratios, ratio_shape
        tokens = stats.all_tokens()
        if tokens is None:
            raise ValueError("the weight-clipping search needs a calibration token sample")
        xs = tokens.float() if s is None else tokens.float() * reciprocal(s)
        ratios, _ = clip_ratios(residual, xs, fmt, self.weight_clip_ratios)
        chosen["weight_clip_mean"] = round(float(ratios.mean()), 6)
        chosen["weight_clipped"] = round(float((ratios < 1).float().mean()), 6)  # share of groups clipped
        return fmt.encode(residual, clip_ratio=ratio_shape(fmt, ratios))

    def _rtn_output_error(self, tokens: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """‖X Wᵀ − Ŷ(X)‖² (fp32, 0-dim, on the weight's device) for a candidate smoothing, with an RTN
        residual and no clipping."""
        ws = w if s is None else apply_to_weight(w, s)
        l1, l2, r = self._lowrank(ws)
        packed = self._wfmt().encode(r)
        layer = QuantLinear(w.shape[1], w.shape[0], weight=packed, bias=None, act_format=self.act_format,
                            smooth=s, lowrank=None if l1 is None else (l1, l2), compute_dtype=self.compute_dtype,
                            clip_table=torch.ones(1, device=w.device))
        return layer_error(layer, tokens, w, sync=False)

    def _clip_table(self, name: str, layer: QuantLinear, w: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        """TS-clip (paper A, step 4): per bin, the candidate ρ · 2**k with the least output error on that
        bin's calibration tokens. With ``clip_search_data=w4a4_generation`` the table stays 1 here: the
        run fills it from its W4A4 pass once every layer is quantized (:mod:`wanexp.quant.clip_search`)."""
        table = [1.0] * self.num_bins
        if self.clip_search and layer.act_format is not None:
            layer.set_clip_table(table)  # one entry per bin, also where ρ stays 1
        if not self.searches(name) or layer.act_format is None or self.clip_search_data != "calib_tokens":
            return torch.tensor(table, device="cpu")
        ratios = [ratio(c) for c in self.search_candidates()]
        errors = {}
        for b in range(self.num_bins):
            tokens = stats.tokens.get(b)
            if tokens is None or tokens.shape[0] == 0:
                continue  # a bin calibration never visited keeps ρ = 1 (no clipping)
            with layer.at_bin(b):  # the bin's own smoothing, where the layer has one per bin
                if self.clip_metric == "wq_output_rel":
                    errors[b] = relative_errors(layer, tokens, ratios)
                else:
                    errors[b] = clip_output_errors(layer, tokens, w, ratios)
        if errors:  # every bin's pick in one host sync; argmin keeps the first of equal errors
            picks = torch.stack([torch.argmin(e) for e in errors.values()]).tolist()
            for b, i in zip(errors, picks):
                table[b] = float(ratios[i])
        layer.set_clip_table(table)
        return torch.tensor(table, device="cpu")


@torch.no_grad()
def layer_error(layer: QuantLinear, tokens: torch.Tensor, w: torch.Tensor, sync: bool = True) -> float | torch.Tensor:
    """Σ‖x Wᵀ − layer(x)‖² over a token sample (bias cancels, so both sides omit it); ``sync=False``:
    as a 0-dim fp32 tensor on the layer's device (no host sync)."""
    ref, out = _outputs(layer, tokens, w)
    err = (out - ref).square().sum()
    return float(err) if sync else err


@torch.no_grad()
def clip_output_errors(layer: QuantLinear, tokens: torch.Tensor, w: torch.Tensor, ratios) -> torch.Tensor:
    """:func:`layer_error` at each clip ratio of ``ratios`` (in the layer's current bin), as one fp32
    tensor on the layer's device: the same numbers as setting the clip table to each ratio and
    calling the layer, with what does not depend on the ratio (the reference output, the smoothed
    input, the dequantized weight, the low-rank branch) computed once, and no host sync (nor the
    forward's finiteness check: the build's sensitivity pass runs the layer on the same tokens and
    refuses non-finite inputs there)."""
    ref = tokens.float() @ w.float().T
    x = tokens.to(layer.compute_dtype)
    xs = layer.smoothed(x)
    weight = layer.dequantized_weight()
    branch = None
    if layer.lowrank_up is not None:
        branch = F.linear(F.linear(xs, layer.lowrank_down), layer.lowrank_up)
    # each ratio as the layer's fp32 clip table holds it
    table = torch.tensor([float(r) for r in ratios], dtype=torch.float32, device="cpu")  # host values: no sync
    errors = []
    for rho in table.tolist():
        xq = layer.act_format.quantize_dequantize(xs, clip_ratio=rho, check_finite=False)
        y = F.linear(xq, weight)
        if branch is not None:
            y = y + branch
        errors.append((y.to(x.dtype).float() - ref).square().sum())
    return torch.stack(errors)


def _outputs(layer: QuantLinear, tokens: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x Wᵀ, the layer's output) on a token sample, both without bias."""
    ref = tokens.float() @ w.float().T
    saved_bias, layer.bias = layer.bias, None
    try:
        out = layer(tokens.to(layer.compute_dtype)).float()
    finally:
        layer.bias = saved_bias
    return ref, out


def _cos_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """1 − the mean over rows of cos(a_i, b_i), sums in float64 (a row zero on both sides is exact,
    zero on one side only is orthogonal)."""
    a, b = a.float(), b.float()
    num = (a * b).sum(dim=1, dtype=torch.float64)
    na, nb = a.square().sum(dim=1, dtype=torch.float64).sqrt(), b.square().sum(dim=1, dtype=torch.float64).sqrt()
    den = na * nb
    cos = torch.where(den > 0, num / den.clamp_min(1e-300), ((na == 0) & (nb == 0)).double())
    return float(1.0 - cos.mean())


@torch.no_grad()
def effective_weight(layer: QuantLinear) -> torch.Tensor:
    """The dense weight the layer applies to unsmoothed inputs (activation quantization aside):
    ``(dequant(W_q) + L1 L2) · diag(r)``, r = 1 / s (in the layer's current bin, for per-bin smoothing)."""
    wq = layer.dequantized_weight().float()
    if layer.lowrank_up is not None:
        wq = wq + layer.lowrank_up.float() @ layer.lowrank_down.float()
    r = layer.smoothing_reciprocal()
    if r is not None:
        wq = wq * r
    return wq


class MethodConfig:
    """A :class:`QuantRecipe` with the statistics of its layers and what it chose for them, for callers
    of the builder protocol ``build(name, linear) -> QuantLinear`` (set ``stats`` first, read ``report``
    and ``seconds`` after). The runner uses the recipe itself: ``quantize_(model, recipe, names,
    stats=...)`` returns the choices. Parameters read and set as the recipe's (``m.num_bins = 3``)."""

    needs = staticmethod(QuantRecipe.needs)
    second_pass = staticmethod(QuantRecipe.second_pass)

    def __init__(self, *args: Any, stats: Mapping[str, LayerStats] | None = None, **params: Any) -> None:
        object.__setattr__(self, "recipe", QuantRecipe(*args, **params))
        self.stats: Mapping[str, LayerStats] = dict(stats or {})   # layer name → statistics
        self.report: dict[str, dict] = {}                          # layer name → what was chosen
        self.seconds: dict[str, float] = {}                        # layer name → seconds its build took

    def __getattr__(self, key: str):  # only for what the instance itself lacks: the recipe's parameters
        if key == "recipe":
            raise AttributeError(key)
        return getattr(self.recipe, key)

    def __setattr__(self, key: str, value: Any) -> None:
        if key in _RECIPE_FIELDS:
            object.__setattr__(self, "recipe", replace(self.recipe, **{key: value}))
        else:
            object.__setattr__(self, key, value)

    @classmethod
    def of(cls, recipe: QuantRecipe) -> "MethodConfig":
        return cls(**{f.name: getattr(recipe, f.name) for f in fields(QuantRecipe)})

    def build(self, name: str, linear: nn.Linear) -> QuantLinear:
        layer, self.report[name], self.seconds[name] = build_timed(self.recipe, name, linear, self.stats)
        return layer


_RECIPE_FIELDS = frozenset(f.name for f in fields(QuantRecipe))


def method_config(quant_cfg: Mapping[str, Any], fmt_cfg: Mapping[str, Any], num_bins: int,
                  compute_dtype: torch.dtype = torch.bfloat16) -> MethodConfig:
    """MethodConfig from the ``quant`` and ``format`` config groups (:func:`recipe_of` for the recipe alone)."""
    return MethodConfig(**_recipe_params(quant_cfg, fmt_cfg, num_bins, compute_dtype))


def recipe_of(quant_cfg: Mapping[str, Any], fmt_cfg: Mapping[str, Any], num_bins: int,
              compute_dtype: torch.dtype = torch.bfloat16) -> QuantRecipe:
    """The frozen recipe of the ``quant`` and ``format`` config groups."""
    return QuantRecipe(**_recipe_params(quant_cfg, fmt_cfg, num_bins, compute_dtype))


def _recipe_params(quant_cfg: Mapping[str, Any], fmt_cfg: Mapping[str, Any], num_bins: int,
                   compute_dtype: torch.dtype) -> dict[str, Any]:
    wfmt = {"name": fmt_cfg["name"], "opts": dict(fmt_cfg.get("weight") or {})}
    afmt = {"name": fmt_cfg["name"], "opts": dict(fmt_cfg.get("act") or {})} if quant_cfg.get("activations") else None
    alpha = quant_cfg.get("alpha", 0.5)
    return dict(
        name=quant_cfg["name"], weight_format=wfmt, act_format=afmt, smoothing=quant_cfg.get("smoothing"),
        smoothing_per_bin=bool(quant_cfg.get("smoothing_per_bin", False)),
        alpha=alpha if isinstance(alpha, (int, float)) else list(alpha), percentile=float(quant_cfg.get("percentile", PERCENTILE)),
        rank=int(quant_cfg.get("rank", 0) or 0), residual=str(quant_cfg.get("residual", "rtn")),
        lowrank_solver=str(quant_cfg.get("lowrank_solver") or "svd"),
        gptq=dict(quant_cfg.get("gptq") or {}), clip_search=bool(quant_cfg.get("clip_search", False)),
        clip_candidates=[float(c) for c in quant_cfg.get("clip_candidates", (1.0,))],
        exp_shifts=[int(k) for k in quant_cfg.get("exp_shifts") or (0,)],
        clip_search_data=str(quant_cfg.get("clip_search_data", "calib_tokens")),
        clip_metric=str(quant_cfg.get("clip_metric", "bf16_output")),
        clip_exclude=list(quant_cfg.get("clip_exclude") or ()),
        weight_clip_search=bool(quant_cfg.get("weight_clip_search", False)),
        weight_clip_ratios=[float(r) for r in quant_cfg.get("weight_clip_ratios") or AWQ_RATIOS],
        weight_clip_exclude=list(quant_cfg.get("weight_clip_exclude") or ()),
        hessian_input=str(quant_cfg.get("hessian_input", "smoothed")), num_bins=num_bins,
        compute_dtype=compute_dtype)


CHOICES = {"clip_search_data": ("calib_tokens", "w4a4_generation"), "clip_metric": ("bf16_output", "wq_output_rel"),
           "hessian_input": ("smoothed", "smoothed_act_quant"), "bin_rule": ("equal_width", "step_fraction")}


def validate_quant_cfg(quant_cfg: Mapping[str, Any], generation_keys: Sequence[str] = ()) -> None:
    """Refuse inconsistent recipe knobs before anything loads (one message naming the key)."""
    q = quant_cfg
    for key, allowed in CHOICES.items():
        if key in q and q[key] is not None and q[key] not in allowed:
            raise WanexpError(f"quant.{key}={q[key]} is not one of {', '.join(allowed)}")
    shifts = q.get("exp_shifts") or [0]
    if not all(isinstance(k, int) and not isinstance(k, bool) and -8 <= k <= 8 for k in shifts):
        raise WanexpError(f"quant.exp_shifts={list(shifts)} must be small integers (shared-exponent shifts, e.g. [-1, 0, 1])")
    if q.get("clip_search_data") == "w4a4_generation" and q.get("clip_metric", "bf16_output") != "wq_output_rel":
        raise WanexpError("quant.clip_search_data=w4a4_generation measures against the weight-quantized layer "
                          "(the BF16 weights are gone by then): set quant.clip_metric=wq_output_rel")
    if q.get("hessian_input") == "smoothed_act_quant" and q.get("residual") == "gptq" and \
            not (q.get("smoothing") and q.get("activations")):
        raise WanexpError("quant.hessian_input=smoothed_act_quant needs smoothing and quantized activations "
                          "(it is the Hessian of Q_A(x / s))")
    if q.get("smoothing_per_bin"):
        if not q.get("smoothing"):
            raise WanexpError("quant.smoothing_per_bin=true needs a smoothing statistic (quant.smoothing=max, "
                              "percentile or awq)")
        if q.get("residual", "rtn") != "rtn" or int(q.get("rank", 0) or 0):
            raise WanexpError("quant.smoothing_per_bin=true keeps one weight per timestep bin: it takes "
                              f"quant.residual=rtn and quant.rank=0 (got residual={q.get('residual', 'rtn')}, "
                              f"rank={q.get('rank', 0)})")
    if q.get("weight_clip_search"):
        if q.get("residual", "rtn") != "rtn" or q.get("smoothing_per_bin"):
            raise WanexpError("quant.weight_clip_search=true clips an RTN weight with one smoothing vector: set "
                              "quant.residual=rtn and leave quant.smoothing_per_bin off")
        ratios = list(q.get("weight_clip_ratios") or [1.0])
        if not all(isinstance(r, (int, float)) and 0 < r <= 1 for r in ratios):
            raise WanexpError(f"quant.weight_clip_ratios={ratios} must be ratios in (0, 1]")
    if q.get("bin_rule") == "step_fraction":
        cuts = q.get("bin_fractions") or {}
        for expert in EXPERTS:
            f = list(cuts.get(expert) or [])
            if len(f) + 1 != int(q.get("bins", 1)) or sorted(f) != f or not all(0 < c < 1 for c in f):
                raise WanexpError(f"quant.bin_fractions.{expert}={f}: bin_rule=step_fraction needs bins - 1 = "
                                  f"{int(q.get('bins', 1)) - 1} ascending cut fractions inside (0, 1)")
        if q.get("bin_edges"):
            raise WanexpError("quant.bin_edges and quant.bin_rule=step_fraction both place the bins: set one")
    for key in ("calib_generation", "search_generation"):
        unknown = sorted(set(q.get(key) or {}) - set(generation_keys)) if generation_keys else []
        if unknown:
            raise WanexpError(f"quant.{key} overrides {', '.join(unknown)}, which model.generation does not have "
                              f"(known: {', '.join(generation_keys)})")
    if int(q.get("search_samples", 1)) < 1 or int(q.get("search_rows", 4096)) < 1:
        raise WanexpError("quant.search_samples and quant.search_rows must be at least 1")
