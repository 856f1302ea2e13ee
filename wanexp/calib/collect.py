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
``hessian_input`` (layer → function of x) accumulates the Hessian of a transform of the input instead
(the seed paper code's ``Q_A(x / s)``, recorded in a second pass once the smoothing s is known).

Everything accumulates on the device the activations are on (the GPU at A14B size: no per-call
copy to the host) and goes to the CPU only when saved. Layers that read the same input tensor
(``attn1.to_q/k/v``; ``attn2.to_k/v``, the text tokens) share one record, kept under the first
of them (:func:`input_groups`; verified at the first call). The Hessian is held as the row panels
of its upper triangle (:class:`PackedGram`: XᵀX is symmetric, so about half the memory and half
the FLOPs), summed in fp32 (bf16 inputs, fp32 accumulation on CUDA), optionally over a uniform
subsample of the tokens (``hessian_stride``: every s-th row, the offset rotating per call).

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
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from wanexp.errors import WanexpError
from wanexp.quant.context import TimestepContext
from wanexp.schema import CALIB_TOKENS, PERCENTILE

STATS = ("absmax", "sumsq", "hessian", "tokens")
ALL_BINS = -1  # the bin key of statistics pooled over every bin
TRACE_PREFIX = "trace"  # saved keys of the per-step traces: ``trace|<expert>|<layer>|<stat>``
GRAM_KEY = "hessian"      # packed panels are saved as ``hessian@<tile>#<panel>``
_SHARED = (("attn1.to_q", "attn1.to_k", "attn1.to_v"), ("attn2.to_k", "attn2.to_v"))
# rows of a layer input read at a time by the per-channel statistics: bounds their temporaries to
# CHUNK_ROWS x channels x 4 B (0.45 GB for ffn.net.2 at A14B size) instead of a whole fp32 copy of the
# input (57,600 x 13,824 x 4 B = 3.2 GB at 720p, twice over for Σx²)
CHUNK_ROWS = 8192


def absmax_rows(x: torch.Tensor, chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """Per-channel max |x| of ``x [n, k]`` in fp32, ``chunk`` rows at a time (a max: the same bits
    whatever the chunking)."""
    out = None
    for i in range(0, max(x.shape[0], 1), chunk):
        part = x[i:i + chunk].abs().amax(dim=0).float()
        out = part if out is None else torch.maximum(out, part)
    return out


def sumsq_rows(x: torch.Tensor, chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """Per-channel Σ x² of ``x [n, k]`` in fp64: fp32 sums of ``chunk`` rows (squares of bf16 values
    are exact in fp32), added in fp64. With ``chunk >= n`` this is exactly the unchunked
    ``x.float().square().sum(0).double()``; smaller chunks change only the fp32 summation order."""
    out = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for i in range(0, x.shape[0], chunk):
        out += x[i:i + chunk].to(torch.float32, copy=True).square_().sum(dim=0).double()  # a copy: never square the input
    return out


def observe_transient_bytes(rows: int, channels: int, chunk: int = CHUNK_ROWS, itemsize: int = 2) -> int:
    """The largest temporary one ``observe`` makes for an input of ``rows x channels`` (dtype of
    ``itemsize`` bytes): the fp32 chunk of Σx² (squared in place) or the |x| chunk, whichever is
    larger; plus the reservoir's per-row draws (int64 index, fp64 uniform, int64 slot, bool)."""
    per_chunk = min(rows, chunk) * channels * max(4, itemsize)
    return per_chunk + rows * (8 + 8 + 8 + 1)


def input_groups(layers: Iterable[str]) -> dict[str, str]:
    """``member → representative`` for layers that read the same input tensor in a Wan block:
    ``attn1.to_q/k/v`` (the hidden states) and ``attn2.to_k/v`` (the text tokens). Layers not in a
    group map to themselves."""
    layers = list(layers)
    present = set(layers)
    out = {n: n for n in layers}
    for n in layers:
        for group in _SHARED:
            for suffix in group[1:]:
                if n.endswith("." + suffix):
                    rep = n[: -len(suffix)] + group[0]
                    if rep in present:
                        out[n] = rep
    return out


class PackedGram:
    """XᵀX accumulated as the row panels of its upper triangle: panel i holds rows [iT, (i+1)T) and
    columns [iT, k). Sums in fp32; on CUDA the products take bf16 inputs with fp32 accumulation and
    fp32 output (exact products, fp32-grade sums)."""

    def __init__(self, k: int, device: torch.device, tile: int = 512, panels: list[torch.Tensor] | None = None):
        self.k, self.tile = int(k), int(min(tile, k))
        starts = range(0, self.k, self.tile)
        self.panels = panels if panels is not None else [
            torch.zeros(min(self.tile, self.k - i), self.k - i, dtype=torch.float32, device=device) for i in starts]

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Fold the rows of ``x [n, k]`` in."""
        fused = x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
        xf = x if fused else x.float()
        for p, i in zip(self.panels, range(0, self.k, self.tile)):
            a, b = xf[:, i:i + p.shape[0]], xf[:, i:]
            if fused:
                torch.addmm(p, a.T, b, out_dtype=torch.float32, out=p)
            else:
                p.addmm_(a.T, b)

    def full(self) -> torch.Tensor:
        """The symmetric [k, k] matrix."""
        h = torch.empty(self.k, self.k, dtype=torch.float32, device=self.panels[0].device)
        for p, i in zip(self.panels, range(0, self.k, self.tile)):
            h[i:i + p.shape[0], i:] = p
        upper = torch.triu(h)
        return upper + torch.triu(h, diagonal=1).T

    def __add__(self, other: "PackedGram") -> "PackedGram":
        assert (self.k, self.tile) == (other.k, other.tile)
        return PackedGram(self.k, self.panels[0].device, self.tile,
                          [a + b.to(a.device) for a, b in zip(self.panels, other.panels)])

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * 4 for p in self.panels)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}@{self.tile}#{n}": p for n, p in enumerate(self.panels)}


@dataclass
class CalibStats:
    """``data[(expert, layer, bin)][stat]`` → tensor; saved as one safetensors file."""

    data: dict[tuple[str, str, int], dict[str, torch.Tensor]] = field(default_factory=dict)
    # per-step traces of the traced layers: (expert, layer) → {timestep [S], absmax [S, C], pct [S, C],
    # count [S], percentile []} (a StepTrace while collecting)
    trace: dict[tuple[str, str], Any] = field(default_factory=dict)
    # (expert, layer) → the layer whose record it shares (same input tensor; see input_groups)
    aliases: dict[tuple[str, str], str] = field(default_factory=dict)

    def _key(self, expert: str, layer: str) -> str:
        return self.aliases.get((expert, layer), layer)

    def get(self, expert: str, layer: str, bin_: int) -> dict[str, torch.Tensor]:
        """The statistics of one layer in one bin (``ALL_BINS``: pooled), the Hessian as a full matrix."""
        d = self.data.get((expert, self._key(expert, layer), bin_), {})
        return {k: v.full() if isinstance(v, PackedGram) else v for k, v in d.items()}

    def bins_of(self, expert: str, layer: str) -> list[int]:
        layer = self._key(expert, layer)
        return sorted(b for (e, l, b) in self.data if e == expert and l == layer and b != ALL_BINS)

    def update(self, other: "CalibStats") -> None:
        self.data.update(other.data)
        self.trace.update(other.trace)
        self.aliases.update(other.aliases)

    def drop(self, stat: str) -> None:
        """Forget one statistic everywhere (a transient Hessian, once it has been used)."""
        for d in self.data.values():
            d.pop(stat, None)

    def nbytes(self, stat: str | None = None) -> int:
        total = 0
        for d in self.data.values():
            for k, v in d.items():
                if stat is None or k == stat:
                    total += v.nbytes if isinstance(v, PackedGram) else v.numel() * v.element_size()
        return total

    def save(self, path: str | Path) -> None:
        import json as _json
        from wanexp.integrity import save_tensors
        flat = {}
        for (e, l, b), d in self.data.items():
            for k, v in d.items():
                parts = v.tensors(k) if isinstance(v, PackedGram) else {k: v}
                flat.update({f"{e}|{l}|{b}|{name}": t.contiguous().cpu() for name, t in parts.items()})
        for (e, l), d in self.trace.items():
            d = d.tensors() if isinstance(d, StepTrace) else d
            flat.update({f"{TRACE_PREFIX}|{e}|{l}|{k}": v.contiguous().cpu() for k, v in d.items()})
        aliases = _json.dumps([[e, l, rep] for (e, l), rep in sorted(self.aliases.items())])
        # a SHA-256 per tensor, checked at load
        save_tensors(path, flat, metadata={"format": "wanexp-calib-v2", "aliases": aliases})

    @classmethod
    def load(cls, path: str | Path) -> "CalibStats":
        from wanexp.integrity import load_tensors
        if not Path(path).is_file():
            raise WanexpError(f"calibration statistics {path} do not exist (run the calibrate stage first)")
        import json as _json
        flat, meta, _ = load_tensors(path, "calibration statistics part", "delete it and re-run stage=calibrate")
        meta = meta or {}
        out = cls()
        panels: dict[tuple, dict[int, torch.Tensor]] = {}
        for key, v in flat.items():
            if key.startswith(TRACE_PREFIX + "|"):
                _, e, l, k = key.split("|")
                out.trace.setdefault((e, l), {})[k] = v
                continue
            e, l, b, k = key.split("|")
            if "@" in k:  # a packed Hessian panel: <stat>@<tile>#<n>
                stat, rest = k.split("@")
                tile, n = rest.split("#")
                panels.setdefault((e, l, int(b), stat, int(tile)), {})[int(n)] = v
                continue
            out.data.setdefault((e, l, int(b)), {})[k] = v
        for (e, l, b, stat, tile), parts in panels.items():
            ordered = [parts[n] for n in sorted(parts)]
            out.data.setdefault((e, l, b), {})[stat] = PackedGram(ordered[0].shape[1], ordered[0].device, tile, ordered)
        for e, l, rep in _json.loads(meta.get("aliases", "[]")):
            out.aliases[(e, l)] = rep
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

    def __init__(self, percentile: float = PERCENTILE, max_tokens: int = 16384, chunk: int = 2048):
        if not 0 < percentile <= 100:
            raise ValueError(f"trace percentile must be in (0, 100], got {percentile}")
        self.percentile, self.max_tokens, self.chunk = float(percentile), int(max_tokens), int(chunk)
        self.steps: dict[float, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def observe(self, t: float, x: torch.Tensor) -> None:
        """``x`` [tokens, channels] seen at timestep ``t``. Read in its own dtype (a max and an order
        statistic pick one of its values, so the float results are those of an fp32 copy, which at
        A14B size would be GBs)."""
        amax = torch.maximum(x.amax(dim=0), -x.amin(dim=0)).float().cpu()  # max |x| without an |x| copy
        stride = max(1, -(-x.shape[0] // self.max_tokens))
        sub = x[::stride]
        k = min(sub.shape[0], max(1, math.ceil(self.percentile / 100.0 * sub.shape[0])))
        pct = torch.cat([sub[:, c:c + self.chunk].abs().kthvalue(k, dim=0).values.float()
                         for c in range(0, sub.shape[1], self.chunk)]).cpu()
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
    """Attach to one expert's targeted linears; fold each input into the stats of the current bin.

    ``hessian_stride`` s > 1 accumulates the Hessian over every s-th token (a uniform subsample,
    the offset rotating with each call); ``share_inputs`` keeps one record for layers reading the
    same tensor. Non-finite inputs are flagged on the device and raised by :meth:`check` (called
    after each denoising step: one host sync a step, not one a layer), naming layer and timestep."""

    def __init__(self, expert: str, model: nn.Module, layers: Iterable[str], context: TimestepContext,
                 needs: Iterable[str], stats: CalibStats, max_tokens: int = CALIB_TOKENS, seed: int = 0,
                 trace_layers: Iterable[str] = (), trace_percentile: float = PERCENTILE, trace_tokens: int = 16384,
                 hessian_stride: int = 1, share_inputs: bool = True, gram_tile: int = 512,
                 hessian_input: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
                 chunk_rows: int = CHUNK_ROWS):
        unknown = set(needs) - set(STATS)
        if unknown:
            raise ValueError(f"unknown calibration statistics {sorted(unknown)}; known: {STATS}")
        if int(hessian_stride) < 1:
            raise ValueError(f"hessian_stride must be >= 1, got {hessian_stride}")
        self.expert, self.context, self.needs, self.stats = expert, context, set(needs), stats
        self.max_tokens, self.seed, self.hessian_stride, self.gram_tile = max_tokens, seed, int(hessian_stride), gram_tile
        if int(chunk_rows) < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.chunk_rows = int(chunk_rows)
        # per-layer transform of the input before its Hessian (the paper code's Q_A(x / s)): each layer
        # has its own, so layers then keep records of their own
        self.hessian_input = dict(hessian_input or {})
        share_inputs = share_inputs and not self.hessian_input
        self.generators: dict[torch.device, torch.Generator] = {}
        self.seen: dict[tuple[str, str, int], int] = {}
        self.calls: dict[str, int] = {}
        self.bad: dict[str, tuple[torch.Tensor, float | None]] = {}
        layers = list(layers)
        groups = input_groups(layers) if share_inputs else {n: n for n in layers}
        reps = [n for n in layers if groups[n] == n]
        for member, rep in groups.items():
            if member != rep:
                stats.aliases[(expert, member)] = rep
        # traced layers of this collector's share (a calibration pass may cover only some blocks)
        self.traces = {n: StepTrace(trace_percentile, trace_tokens) for n in trace_layers if n in set(layers)}
        self._last_input: dict[str, int] = {}
        self.handles = [model.get_submodule(n).register_forward_pre_hook(self._hook(n)) for n in reps]
        for n in self.traces:  # a traced member of a group is traced on its own
            if groups[n] != n:
                self.handles.append(model.get_submodule(n).register_forward_pre_hook(self._trace_hook(n)))
        # the first call checks that grouped layers really read their representative's tensor
        self._unchecked = {m: r for m, r in groups.items() if m != r}
        self.handles += [model.get_submodule(m).register_forward_pre_hook(self._check_hook(m, r))
                         for m, r in self._unchecked.items()]

    def _hook(self, layer: str):
        def hook(module, args):
            self._last_input[layer] = args[0].data_ptr()
            self.observe(layer, args[0])
        return hook

    def _trace_hook(self, layer: str):
        def hook(module, args):
            if self.context.timestep is not None:
                x = args[0].detach().reshape(-1, args[0].shape[-1])
                self.traces[layer].observe(float(self.context.timestep), x)
                self.stats.trace[(self.expert, layer)] = self.traces[layer]
        return hook

    def _check_hook(self, member: str, rep: str):
        def hook(module, args):
            if member not in self._unchecked:
                return
            if self._last_input.get(rep) != args[0].data_ptr():
                raise WanexpError(f"calibration: {self.expert}:{member} does not read the same input as {rep}, "
                                  "so they cannot share statistics (set quant.share_inputs=false)")
            del self._unchecked[member]
        return hook

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self.generators:
            self.generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self.generators[device]

    @torch.no_grad()
    def observe(self, layer: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        key = (self.expert, layer, self.context.bin)
        d = self.stats.data.setdefault(key, {})
        pooled = self.stats.data.setdefault((self.expert, layer, ALL_BINS), {})
        amax = absmax_rows(x, self.chunk_rows)  # max |x| per channel; NaN/Inf propagate into it
        finite = torch.isfinite(amax).all()
        prev = self.bad.get(layer)
        if prev is None or prev[1] is None:  # remember the first timestep a layer went non-finite
            self.bad[layer] = (~finite if prev is None else prev[0] | ~finite, self.context.timestep)
        else:
            self.bad[layer] = (prev[0] | ~finite, prev[1])
        if not x.is_cuda and not bool(finite):  # on the CPU a check costs nothing: fail at once
            self.check()
        if "absmax" in self.needs:
            d["absmax"] = amax if "absmax" not in d else torch.maximum(d["absmax"], amax)
        d["count"] = d.get("count", torch.zeros((), dtype=torch.float64)) + x.shape[0]
        if "sumsq" in self.needs:
            d["sumsq"] = d.get("sumsq", 0) + sumsq_rows(x, self.chunk_rows)
        if "hessian" in self.needs:  # pooled over bins: GPTQ uses one Hessian, and [in, in] per bin would not fit at A14B size
            h = self.hessian_input[layer](x) if layer in self.hessian_input else x
            gram = pooled.get("hessian")
            if gram is None:
                gram = pooled["hessian"] = PackedGram(h.shape[1], h.device, self.gram_tile)
            calls = self.calls[layer] = self.calls.get(layer, -1) + 1
            gram.add(h[calls % self.hessian_stride::self.hessian_stride] if self.hessian_stride > 1 else h)
        if "tokens" in self.needs:
            self._reservoir(key, d, x)
        if layer in self.traces and self.context.timestep is not None:
            trace = self.traces[layer]
            trace.observe(float(self.context.timestep), x)
            self.stats.trace[(self.expert, layer)] = trace  # turned into tensors when saved

    def check(self) -> None:
        """Raise if any layer saw a non-finite input since calibration began (one host sync)."""
        if not self.bad:
            return
        names = list(self.bad)
        flags = torch.stack([self.bad[n][0].to(torch.bool).reshape(()).cpu() for n in names])
        if bool(flags.any()):
            first = names[int(torch.nonzero(flags)[0])]
            raise WanexpError(f"non-finite activations entering {self.expert}:{first} at timestep "
                              f"{self.bad[first][1]} during calibration")

    def _reservoir(self, key, d: dict, x: torch.Tensor) -> None:
        """Algorithm R over rows: every row seen so far is in the sample with equal probability."""
        seen = self.seen.get(key, 0)
        k = self.max_tokens
        x = x.to(torch.bfloat16)
        if seen < k:
            take = x[: k - seen]
            d["tokens"] = take.clone() if "tokens" not in d else torch.cat([d["tokens"], take])
            x, seen = x[k - seen:], seen + take.shape[0]
        if x.shape[0]:
            dev = x.device
            idx = seen + torch.arange(x.shape[0], device=dev)
            u = torch.rand(x.shape[0], generator=self._generator(dev), dtype=torch.float64, device=dev)
            slot = (u * (idx + 1)).long()
            hit = slot < k
            # when rows share a slot the last one wins, as in sequential R
            slots, rows = slot[hit], torch.nonzero(hit).flatten()
            last = torch.full((k,), -1, dtype=torch.long, device=dev).scatter_reduce_(0, slots, rows, reduce="amax")
            filled = last >= 0
            d["tokens"][filled] = x[last[filled]]
            seen += x.shape[0]
        self.seen[key] = seen

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
