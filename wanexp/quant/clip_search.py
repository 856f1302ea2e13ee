"""TS-clip candidates and their output errors, shared by wanexp's search and the seed paper code's.

A candidate is a clip ratio ρ and a shift k of the shared exponent: the activation quantizer runs at
``clip_ratio = ρ · 2**k`` (for MXFP4 that is exactly the code's ``e + k``, see
:mod:`wanexp.formats.mx`). Candidates are ordered clip-major (ρ, then k), as the code loops over
them; the search keeps the first of equal errors.

The seed paper code's search (``quant.clip_search_data=w4a4_generation``, :class:`OutputErrorSearch`):
every searched QuantLinear gets a forward pre-hook while one W4A4 generation with CFG runs, with every
layer already quantized at clip 1 (the code searches all layers in the same pass, so the layers
upstream run unclipped while a layer is measured). At each call, up to ``max_rows`` rows of the
input, evenly spaced (the code's ``linspace(...).round()``), are smoothed as the layer smooths them,
and each candidate's residual GEMM is compared with the same layer without activation quantization,
the weight-quantized layer:

    err(ρ, k) = Σ_calls ‖Q_A(x_s; ρ 2**k) R̂ᵀ − x_s R̂ᵀ‖² / Σ_calls ‖x_s R̂ᵀ + b + x_s L2ᵀ L1ᵀ‖²

per (layer, the expert's timestep bin at the call). The low-rank branch sees the unquantized
input in both terms, so it cancels from the numerator and only scales the denominator, the same for
every candidate of a bin: the argmin is that of the numerator, the ratio is the code's ``search_err``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from wanexp.quant.linear import QuantLinear


def candidates(clips: Sequence[float], shifts: Sequence[int] = (0,)) -> list[tuple[float, int]]:
    """(ρ, k) pairs, clip-major."""
    return [(float(c), int(k)) for c in clips for k in shifts]


def ratio(candidate: tuple[float, int]) -> float:
    """The clip ratio the quantizer runs at: ρ · 2**k (exact in binary)."""
    clip, shift = candidate
    return clip * 2.0**shift


def evenly_spaced_rows(x: torch.Tensor, max_rows: int) -> torch.Tensor:
    """At most ``max_rows`` rows of ``x [..., in]`` as ``[n, in]``: all of them, or ``max_rows`` spread
    evenly from the first to the last (indices ``round(linspace(0, n - 1, max_rows))``, in fp32 like
    the code's; a duplicate index is kept, as there)."""
    rows = x.reshape(-1, x.shape[-1])
    if 0 < max_rows < rows.shape[0]:
        idx = torch.linspace(0, rows.shape[0] - 1, steps=max_rows, device=rows.device).round().long()
        rows = rows.index_select(0, idx)
    return rows


@torch.no_grad()
def candidate_errors(layer: QuantLinear, x: torch.Tensor, ratios: Sequence[float]) -> tuple[torch.Tensor, float]:
    """(Σ‖Q_A(x_s; r) R̂ᵀ − x_s R̂ᵀ‖² for each ratio r [float64, on the CPU], ‖the layer's output without
    activation quantization‖²) on the input rows ``x [n, in]``, computed as the reference forward does
    (bf16 smoothed input, bf16 GEMMs; differences and sums in fp32/fp64)."""
    xs = layer.smoothed(x)  # the current bin's smoothing, for a per-bin smoothing table
    w = layer.dequantized_weight()
    main = F.linear(xs, w, layer.bias).float()
    full = main
    if layer.lowrank_up is not None:
        full = main + F.linear(F.linear(xs, layer.lowrank_down), layer.lowrank_up).float()
    errors = []
    for r in ratios:
        xq = layer.act_format.quantize_dequantize(xs, clip_ratio=float(r), check_finite=False)
        errors.append((F.linear(xq, w, layer.bias).float() - main).square().sum(dtype=torch.float64))
    return torch.stack(errors).cpu(), float(full.square().sum(dtype=torch.float64))


def relative_errors(layer: QuantLinear, x: torch.Tensor, ratios: Sequence[float]) -> torch.Tensor:
    """:func:`candidate_errors` as ratios to the reference output's energy (the code's metric)."""
    num, den = candidate_errors(layer, x, ratios)
    return num / max(den, 1e-12)


class OutputErrorSearch:
    """The seed paper code's TS-clip search over ``layers`` (``{key: QuantLinear}``, any hashable key),
    fed by the layers' own calls; see the module docstring."""

    def __init__(self, layers: Mapping, clips: Sequence[float], shifts: Sequence[int] = (0,),
                 max_rows: int = 4096):
        self.layers = dict(layers)
        self.candidates = candidates(clips, shifts)
        self.ratios = [ratio(c) for c in self.candidates]
        self.max_rows = int(max_rows)
        self.num: dict = defaultdict(lambda: torch.zeros(len(self.candidates), dtype=torch.float64))
        self.den: dict = defaultdict(float)
        self.calls: dict = defaultdict(int)
        self.handles: list = []

    def attach(self) -> list:
        """Forward pre-hooks on every layer; returns the handles (``.remove()`` each when done)."""
        for key, layer in self.layers.items():
            self.handles.append(layer.register_forward_pre_hook(self._hook(key)))
        return self.handles

    def _hook(self, key):
        def hook(module, args):
            self.observe(key, module, args[0])
        return hook

    def observe(self, key, layer: QuantLinear, x: torch.Tensor) -> None:
        bin_ = 0 if layer.context is None else int(layer.context.bin)
        num, den = candidate_errors(layer, evenly_spaced_rows(x.detach(), self.max_rows), self.ratios)
        self.num[(key, bin_)] += num
        self.den[(key, bin_)] += den
        self.calls[(key, bin_)] += 1

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def errors(self, key, bin_: int) -> torch.Tensor:
        """Relative error of every candidate for one (layer, bin) seen at least once."""
        return self.num[(key, bin_)] / max(self.den[(key, bin_)], 1e-12)

    def choose(self) -> dict:
        """``{key: {bin: (ρ, k, relative error)}}`` for every (layer, bin) the generation visited."""
        out: dict = defaultdict(dict)
        for key, bin_ in list(self.calls):
            err = self.errors(key, bin_)
            best = int(torch.argmin(err))  # the first minimum, as the code's strict `<`
            out[key][bin_] = (*self.candidates[best], float(err[best]))
        return dict(out)

    def apply(self, num_bins: int | Mapping[str, int]) -> dict:
        """Write each searched layer's clip table (visited bins get their pick, the others 1) and return
        what was chosen per layer: ``clip`` (the table), ``clip_candidate`` ([ρ, k] per bin) and
        ``search_err`` (the relative error of the pick, None for unvisited bins)."""
        picks = self.choose()
        report = {}
        for key, layer in self.layers.items():
            n = num_bins[key[0]] if isinstance(num_bins, Mapping) else num_bins  # per expert, or one for all
            table = torch.ones(n)
            cand: list = [[1.0, 0]] * n
            err: list = [None] * n
            for b, (clip, shift, e) in picks.get(key, {}).items():
                if b < n:
                    table[b], cand[b], err[b] = ratio((clip, shift)), [clip, shift], round(e, 8)
            layer.clip_table = table.to(layer.clip_table.device)
            report[key] = {"clip": [round(float(r), 6) for r in table], "clip_candidate": cand, "search_err": err}
        return report


def searched(names: Iterable[str], exclude: Sequence[str] = ()) -> list[str]:
    """The layers a search covers: every name that neither matches an ``exclude`` pattern nor lies
    under a module that does (``blocks.*.attn2`` and ``blocks.*.attn2.*`` both exclude
    ``blocks.3.attn2.to_out.0``); patterns as in ``expert.keep_modules``."""
    from wanexp.quant.targets import pattern_regex
    patterns = [pattern_regex(p) for p in exclude]

    def excluded(name: str) -> bool:
        parts = name.split(".")
        return any(p.match(".".join(parts[:i])) for p in patterns for i in range(1, len(parts) + 1))
    return [n for n in names if not excluded(n)]
