"""Calibration statistics of several ranks, reduced to what one process would have recorded.

Data-parallel calibration: every rank denoises its share of the calibration samples and records
its own :class:`~wanexp.calib.collect.CalibStats`; :func:`reduce_stats` combines them on rank 0:

- counts, Σx² and the Hessians' packed panels: summed (equal to one process up to the order of
  float additions);
- per-channel maxima: max (bit for bit);
- token reservoirs: merged into a uniform sample of the union. Rank r holds a uniform sample of
  size min(k, n_r) of its n_r rows; drawing how many of the k merged rows come from each rank from
  the multivariate hypergeometric distribution (k draws without replacement from N = Σ n_r rows,
  n_r of them rank r's), then that many rows uniformly from rank r's sample, gives a uniform
  sample of size min(k, N) of the union: the distribution a single process's reservoir has. Seeded,
  so the merge is deterministic. Percentile statistics (the tail-aware HiF4 smoothing) are taken
  from this sample at quantize time, as in one process;
- per-step traces: per timestep, max by max, the percentile sums and their counts summed (the
  per-forward percentiles are averaged, as one process folds them).

The collectives go through ``torch.distributed`` (gloo for CPU tensors; NCCL for CUDA tensors
when the process group has it), in one order every rank derives from the union of the keys.
"""

from __future__ import annotations

import torch

from wanexp.calib.collect import CalibStats, PackedGram, StepTrace


def hypergeometric_counts(sizes: list[int], k: int, generator: torch.Generator) -> list[int]:
    """How many of ``min(k, Σ sizes)`` draws without replacement fall in each group of ``sizes``."""
    remaining = list(sizes)
    total = sum(remaining)
    out = [0] * len(sizes)
    for _ in range(min(k, total)):
        u = float(torch.rand((), generator=generator, dtype=torch.float64)) * total
        acc = 0
        for i, n in enumerate(remaining):
            acc += n
            if u < acc:
                out[i] += 1
                remaining[i] -= 1
                total -= 1
                break
    return out


def merge_reservoirs(samples: list[torch.Tensor], seen: list[int], k: int, seed: int) -> torch.Tensor:
    """One uniform sample of size min(k, Σ seen) of the union of the ranks' streams (module docstring)."""
    g = torch.Generator().manual_seed(seed)
    take = hypergeometric_counts(list(seen), k, g)
    parts = []
    for rows, m in zip(samples, take):
        if m:
            idx = torch.randperm(rows.shape[0], generator=g)[:m]
            parts.append(rows[idx.to(rows.device)])
    return torch.cat(parts) if parts else samples[0][:0]


def _fold_traces(traces: list[dict]) -> StepTrace | dict:
    """Per-step traces of several ranks (StepTrace.steps dicts) folded into one StepTrace."""
    merged = None
    for t in traces:
        if t is None:
            continue
        if merged is None:
            merged = StepTrace(t["percentile"], t["max_tokens"], t["chunk"])
        for step, rec in t["steps"].items():
            mine = merged.steps.get(step)
            if mine is None:
                merged.steps[step] = {"absmax": rec["absmax"].clone(), "pct_sum": rec["pct_sum"].clone(),
                                      "count": rec["count"]}
            else:
                mine["absmax"] = torch.maximum(mine["absmax"], rec["absmax"])
                mine["pct_sum"] = mine["pct_sum"] + rec["pct_sum"]
                mine["count"] += rec["count"]
    return merged


def _trace_state(t) -> dict | None:
    if isinstance(t, dict) and "timestep" in t:  # a trace as saved (a rank's share read back from disk)
        counts = t["count"].tolist()
        return {"percentile": float(t["percentile"]), "max_tokens": 16384, "chunk": 2048,
                "steps": {float(ts): {"absmax": t["absmax"][i].clone(), "pct_sum": t["pct"][i].double() * counts[i],
                                      "count": int(counts[i])} for i, ts in enumerate(t["timestep"].tolist())}}
    if not isinstance(t, StepTrace):
        return None
    return {"percentile": t.percentile, "max_tokens": t.max_tokens, "chunk": t.chunk,
            "steps": {s: {"absmax": r["absmax"].cpu(), "pct_sum": r["pct_sum"].cpu(), "count": r["count"]}
                      for s, r in t.steps.items()}}


def reduce_stats(stats: CalibStats, world, max_tokens: int, seed: int) -> CalibStats | None:
    """Every rank's ``stats`` combined; returned on rank 0, None elsewhere. Collective: every rank calls it."""
    import torch.distributed as dist

    if world.size == 1:
        return stats
    # the union of what the ranks recorded, in one order: (expert, layer, bin, stat) → kind and shape
    mine = {}
    for (e, layer, b), d in stats.data.items():
        for name, v in d.items():
            if isinstance(v, PackedGram):
                mine[(e, layer, b, name)] = ("gram", v.k, v.tile)
            else:
                mine[(e, layer, b, name)] = ("tensor", tuple(v.shape), str(v.dtype).removeprefix("torch."))
    everyone: list = [None] * world.size
    dist.all_gather_object(everyone, {"keys": mine, "aliases": stats.aliases,
                                      "traces": {k: _trace_state(t) for k, t in stats.trace.items()}})
    keys: dict = {}
    for other in everyone:
        keys.update(other["keys"])
    device = _device_of(stats)
    out = CalibStats() if world.main else None
    for key in sorted(keys, key=str):
        e, layer, b, name = key
        kind = keys[key]
        d = stats.data.get((e, layer, b), {})
        if kind[0] == "gram":
            gram = d.get(name) or PackedGram(kind[1], device, kind[2])
            for p in gram.panels:
                dist.reduce(p, dst=0, op=dist.ReduceOp.SUM)
            if world.main:
                out.data.setdefault((e, layer, b), {})[name] = gram
        elif name == "tokens":
            continue  # after the counts (below)
        else:
            t = d.get(name)
            if t is None:
                t = torch.zeros(kind[1], dtype=getattr(torch, kind[2]), device=device)
            t = t.clone()
            dist.reduce(t, dst=0, op=dist.ReduceOp.MAX if name == "absmax" else dist.ReduceOp.SUM)
            if world.main:
                out.data.setdefault((e, layer, b), {})[name] = t
    for key in sorted((k for k in keys if k[3] == "tokens"), key=str):
        e, layer, b, _ = key
        d = stats.data.get((e, layer, b), {})
        shape, dtype = keys[key][1], getattr(torch, keys[key][2])
        rows = d.get("tokens")
        n = int(d["count"]) if "count" in d else 0
        padded = torch.zeros(max_tokens, shape[1], dtype=dtype, device=device)
        if rows is not None:
            padded[: rows.shape[0]] = rows.to(device)
        gathered = [torch.zeros_like(padded) for _ in range(world.size)]
        dist.all_gather(gathered, padded)
        seen_t = torch.tensor([n], dtype=torch.int64, device=device)
        seens = [torch.zeros_like(seen_t) for _ in range(world.size)]
        dist.all_gather(seens, seen_t)
        if world.main:
            seen = [int(s) for s in seens]
            samples = [g[: min(max_tokens, s)] for g, s in zip(gathered, seen)]
            out.data.setdefault((e, layer, b), {})["tokens"] = merge_reservoirs(
                samples, seen, max_tokens, seed=_seed(seed, e, layer, b))
    if world.main:
        for other in everyone:
            out.aliases.update(other["aliases"])
        names = {k for other in everyone for k in other["traces"]}
        for k in names:
            folded = _fold_traces([other["traces"].get(k) for other in everyone])
            if folded is not None:
                out.trace[k] = folded
    return out


def _seed(*parts) -> int:
    """A seed from the key (Python's own str hash changes from process to process)."""
    import hashlib
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


def _device_of(stats: CalibStats) -> torch.device:
    for d in stats.data.values():
        for v in d.values():
            return v.panels[0].device if isinstance(v, PackedGram) else v.device
    return torch.device("cpu")
