"""Streamed activation statistics per (expert, layer, timestep bin).

While BF16 denoising runs on the calibration split, a forward pre-hook on every targeted linear
reads its input ``x [..., in]`` and folds it into running statistics; nothing grows with the number
of steps except the optional bounded token sample:

- ``absmax``  per-channel max |x|                                  (SmoothQuant's statistic)
- ``sumsq``   per-channel Σ x², with ``count`` tokens              (RMS, for diagnostics)
- ``hessian`` XᵀX, fp32, pooled over bins (key ``ALL_BINS``)       (GPTQ's H = 2XᵀX up to scale)
- ``tokens``  a uniform reservoir sample of at most k input rows   (clip search, percentiles)

Which statistics are kept is the method's choice (``needs``); the timestep bin comes from the
expert's TimestepContext, set by the runner's timestep hook before each expert forward.

For a few *traced* layers (``analysis.layers``; the seed paper's Fig. 1) the collector also keeps,
per denoising step (distinct timestep) of the same BF16 trajectories, a per-channel max |x| over
every token and a per-channel high percentile of |x| over an evenly strided subsample of at most
``trace_tokens`` tokens. Forwards sharing a timestep (the CFG passes, several calibration samples)
are folded: the max by max, the percentile by mean. Size: steps × channels × 2 floats per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from wanexp.errors import WanexpError
from wanexp.quant.context import TimestepContext

STATS = ("absmax", "sumsq", "hessian", "tokens")
ALL_BINS = -1  # the bin key of statistics pooled over every bin
TRACE_PREFIX = "trace"  # saved keys of the per-step traces: ``trace|<expert>|<layer>|<stat>``


@dataclass
class CalibStats:
    """``data[(expert, layer, bin)][stat]`` → tensor; saved as one safetensors file."""

    data: dict[tuple[str, str, int], dict[str, torch.Tensor]] = field(default_factory=dict)
    # per-step traces of the traced layers: (expert, layer) → {timestep [S], absmax [S, C], pct [S, C],
    # count [S], percentile []} (a StepTrace while collecting)
    trace: dict[tuple[str, str], Any] = field(default_factory=dict)

    def get(self, expert: str, layer: str, bin_: int) -> dict[str, torch.Tensor]:
        return self.data.get((expert, layer, bin_), {})

    def bins_of(self, expert: str, layer: str) -> list[int]:
        return sorted(b for (e, l, b) in self.data if e == expert and l == layer and b != ALL_BINS)

    def save(self, path: str | Path) -> None:
        from wanexp.integrity import save_tensors
        flat = {f"{e}|{l}|{b}|{k}": v.contiguous().cpu() for (e, l, b), d in self.data.items() for k, v in d.items()}
        for (e, l), d in self.trace.items():
            d = d.tensors() if isinstance(d, StepTrace) else d
            flat.update({f"{TRACE_PREFIX}|{e}|{l}|{k}": v.contiguous().cpu() for k, v in d.items()})
        save_tensors(path, flat, metadata={"format": "wanexp-calib-v1"})  # a SHA-256 per tensor, checked at load

    @classmethod
    def load(cls, path: str | Path) -> "CalibStats":
        from wanexp.integrity import load_tensors
        if not Path(path).is_file():
            raise WanexpError(f"calibration statistics {path} do not exist (run the calibrate stage first)")
        flat, _, _ = load_tensors(path, "calibration statistics part", "delete it and re-run stage=calibrate")
        out = cls()
        for key, v in flat.items():
            if key.startswith(TRACE_PREFIX + "|"):
                _, e, l, k = key.split("|")
                out.trace.setdefault((e, l), {})[k] = v
                continue
            e, l, b, k = key.split("|")
            out.data.setdefault((e, l, int(b)), {})[k] = v
        return out


def load_traces(paths: Iterable[str | Path]) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """The per-step traces stored in calibration part files, reading only those tensors (the
    Hessians next to them can be many GB at A14B size)."""
    from wanexp.integrity import load_tensors
    out: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for path in paths:
        traces, _, _ = load_tensors(path, "calibration statistics part", "delete it and re-run stage=calibrate",
                                    select=lambda key: key.startswith(TRACE_PREFIX + "|"))
        for key, t in traces.items():
            _, e, l, k = key.split("|")
            out.setdefault((e, l), {})[k] = t
    return out


class StepTrace:
    """Per-step, per-channel statistics of one layer's inputs, folded over forwards sharing a timestep."""

    def __init__(self, percentile: float = 99.9, max_tokens: int = 16384, chunk: int = 2048):
        if not 0 < percentile <= 100:
            raise ValueError(f"trace percentile must be in (0, 100], got {percentile}")
        self.percentile, self.max_tokens, self.chunk = float(percentile), int(max_tokens), int(chunk)
        self.steps: dict[float, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def observe(self, t: float, x: torch.Tensor) -> None:
        """``x`` [tokens, channels] (float) seen at timestep ``t``."""
        amax = torch.maximum(x.amax(dim=0), -x.amin(dim=0)).float().cpu()  # max |x| without an |x| copy
        stride = max(1, -(-x.shape[0] // self.max_tokens))
        sub = x[::stride]
        k = min(sub.shape[0], max(1, math.ceil(self.percentile / 100.0 * sub.shape[0])))
        pct = torch.cat([sub[:, c:c + self.chunk].abs().kthvalue(k, dim=0).values
                         for c in range(0, sub.shape[1], self.chunk)]).float().cpu()
        rec = self.steps.get(t)
        if rec is None:
            self.steps[t] = {"absmax": amax, "pct_sum": pct.double(), "count": 1}
        else:
            rec["absmax"] = torch.maximum(rec["absmax"], amax)
            rec["pct_sum"] += pct.double()
            rec["count"] += 1

    def tensors(self) -> dict[str, torch.Tensor]:
        """Steps from the noisiest (largest timestep) down, as denoising visits them."""
        ts = sorted(self.steps, reverse=True)
        recs = [self.steps[t] for t in ts]
        return {"timestep": torch.tensor(ts, dtype=torch.float64),
                "absmax": torch.stack([r["absmax"] for r in recs]),
                "pct": torch.stack([(r["pct_sum"] / r["count"]).float() for r in recs]),
                "count": torch.tensor([r["count"] for r in recs], dtype=torch.int64),
                "percentile": torch.tensor(self.percentile, dtype=torch.float64)}


class ActivationCollector:
    """Attach to one expert's targeted linears; fold each input into the stats of the current bin."""

    def __init__(self, expert: str, model: nn.Module, layers: Iterable[str], context: TimestepContext,
                 needs: Iterable[str], stats: CalibStats, max_tokens: int = 256, seed: int = 0,
                 trace_layers: Iterable[str] = (), trace_percentile: float = 99.9, trace_tokens: int = 16384):
        unknown = set(needs) - set(STATS)
        if unknown:
            raise ValueError(f"unknown calibration statistics {sorted(unknown)}; known: {STATS}")
        self.expert, self.context, self.needs, self.stats = expert, context, set(needs), stats
        self.max_tokens = max_tokens
        self.generator = torch.Generator().manual_seed(seed)
        self.seen: dict[tuple[str, str, int], int] = {}
        layers = list(layers)
        # traced layers of this collector's share (a calibration pass may cover only some blocks)
        self.traces = {n: StepTrace(trace_percentile, trace_tokens) for n in trace_layers if n in set(layers)}
        self.handles = [model.get_submodule(n).register_forward_pre_hook(self._hook(n)) for n in layers]

    def _hook(self, layer: str):
        def hook(module, args):
            self.observe(layer, args[0])
        return hook

    @torch.no_grad()
    def observe(self, layer: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if not torch.isfinite(x).all():
            raise WanexpError(f"non-finite activations entering {self.expert}:{layer} at timestep "
                              f"{self.context.timestep} during calibration")
        key = (self.expert, layer, self.context.bin)
        d = self.stats.data.setdefault(key, {})
        pooled = self.stats.data.setdefault((self.expert, layer, ALL_BINS), {})
        if "absmax" in self.needs:
            amax = x.abs().amax(dim=0).cpu()
            d["absmax"] = amax if "absmax" not in d else torch.maximum(d["absmax"], amax)
        d["count"] = d.get("count", torch.zeros((), dtype=torch.float64)) + x.shape[0]
        if "sumsq" in self.needs:
            d["sumsq"] = d.get("sumsq", 0) + x.square().sum(dim=0).double().cpu()
        if "hessian" in self.needs:  # pooled over bins: GPTQ uses one Hessian, and [in, in] per bin would not fit at A14B size
            pooled["hessian"] = pooled.get("hessian", 0) + (x.T @ x).cpu()
        if "tokens" in self.needs:
            self._reservoir(key, d, x)
        if layer in self.traces and self.context.timestep is not None:
            trace = self.traces[layer]
            trace.observe(float(self.context.timestep), x)
            self.stats.trace[(self.expert, layer)] = trace  # turned into tensors when saved

    def _reservoir(self, key, d: dict, x: torch.Tensor) -> None:
        """Algorithm R over rows: every row seen so far is in the sample with equal probability."""
        seen = self.seen.get(key, 0)
        k = self.max_tokens
        x = x.to(torch.bfloat16).cpu()
        if seen < k:
            take = x[: k - seen]
            d["tokens"] = take.clone() if "tokens" not in d else torch.cat([d["tokens"], take])
            x, seen = x[k - seen:], seen + take.shape[0]
        if x.shape[0]:
            idx = seen + torch.arange(x.shape[0])
            slot = (torch.rand(x.shape[0], generator=self.generator, dtype=torch.float64) * (idx + 1)).long()
            hit = slot < k
            if hit.any():  # when rows share a slot the last one wins, as in sequential R
                slots, rows = slot[hit], torch.nonzero(hit).flatten()
                last = torch.full((k,), -1, dtype=torch.long).scatter_reduce_(0, slots, rows, reduce="amax")
                filled = last >= 0
                d["tokens"][filled] = x[last[filled]]
            seen += x.shape[0]
        self.seen[key] = seen

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
