"""Torch ops and host syncs per phase of one ``quant=tsclip`` layer build (issue 13, build time).

On a GPU the layer build is launch- and sync-bound (small kernels per GPTQ column, per candidate), so
the number of torch ops each phase issues, and the host syncs among them, say what it pays there
(~5–10 µs a launch; a sync drains the queue). This counts them on the CPU for one full-width layer
with synthetic statistics shaped as the A14B default records them (4 bins × 256 bf16 tokens, the
channel maxima, one fp32 Hessian; rank 32 randomized SVD, α grid of 5, 5 clip ratios, MXFP4):

    PYTHONPATH=$PWD python experiments/build_ops.py --in 5120 --out 5120       # attn1.to_q-like
    PYTHONPATH=$PWD python experiments/build_ops.py --in 13824 --out 5120      # ffn.net.2
    PYTHONPATH=$PWD python experiments/build_ops.py --in 512 --out 256 --compare REF.pt   # tiny check

Phases are the outermost QuantRecipe step running when an op is issued: ``smoothing`` (the α search,
its RTN builds included), ``lowrank``, ``gptq`` (``_quantize_residual``), ``clip`` (``_clip_table``),
``sensitivity``, ``other``. Syncs: ``aten._local_scalar_dense`` (``float()``, ``int()``, ``bool()``,
``.item()``), ``nonzero``, ``equal``, boolean-mask indexing, and every ``Tensor.tolist`` / ``.cpu()``
(device-to-host copies on a GPU, invisible to dispatch on a CPU, so counted by wrapping them).
``--timed`` builds without the counter (wall seconds per phase).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections import Counter, defaultdict

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from wanexp.quant.methods import LayerStats, QuantRecipe

PHASES = {"_smoothing": "smoothing", "_smoothing_per_bin": "smoothing", "_lowrank": "lowrank",
          "_quantize_residual": "gptq", "_clip_table": "clip", "sensitivity": "sensitivity"}
SYNC_OPS = {"_local_scalar_dense", "nonzero", "equal", "is_nonzero"}


def tsclip_recipe(bins: int = 4) -> QuantRecipe:
    """``quant=tsclip format=mxfp4`` as the A14B default resolves it (model.calib.lowrank_solver=randomized)."""
    return QuantRecipe(name="tsclip", weight_format={"name": "mxfp4", "opts": {}},
                       act_format={"name": "mxfp4", "opts": {}}, smoothing="max",
                       alpha=[0.3, 0.4, 0.5, 0.6, 0.7], rank=32, lowrank_solver="randomized", residual="gptq",
                       gptq={"block_size": 128, "damp": 0.01, "act_order": False, "static_groups": False},
                       clip_search=True, clip_candidates=[0.6, 0.7, 0.8, 0.9, 1.0], num_bins=bins)


def synthetic_layer(n_in: int, n_out: int, bins: int = 4, tokens: int = 256, hessian_tokens: int = 2048,
                    seed: int = 0) -> tuple[nn.Linear, LayerStats]:
    """A linear and the statistics calibration records for it: inputs with a few outlier channels
    (as DiT activations have), bf16 token samples per bin, maxima over more tokens than the sample,
    H = Σ xᵀx (fp32) over ``hessian_tokens`` rows."""
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(n_in, n_out)
    with torch.no_grad():
        linear.weight.copy_((torch.randn(n_out, n_in, generator=g) * 0.02).bfloat16().float())
        linear.bias.copy_(torch.randn(n_out, generator=g) * 0.01)
    channel = torch.ones(n_in)
    channel[torch.randperm(n_in, generator=g)[: max(1, n_in // 64)]] = 20.0  # outlier channels
    x = torch.randn(hessian_tokens, n_in, generator=g) * channel
    stats = LayerStats(absmax=x.abs().amax(0), hessian=x.T @ x)
    for b in range(bins):
        stats.tokens[b] = (torch.randn(tokens, n_in, generator=g) * channel * (1 + 0.25 * b)).bfloat16()
    stats.absmax = torch.maximum(stats.absmax, torch.stack([t.float().abs().amax(0) for t in stats.tokens.values()]).amax(0))
    return linear, stats


class _Phases:
    """The phase stack (outermost wins) over QuantRecipe's steps."""

    def __init__(self) -> None:
        self.stack: list[str] = []

    @property
    def current(self) -> str:
        return self.stack[0] if self.stack else "other"

    @contextlib.contextmanager
    def patched(self):
        saved = {}
        for attr, phase in PHASES.items():
            if not hasattr(QuantRecipe, attr):
                continue
            saved[attr] = fn = getattr(QuantRecipe, attr)
            setattr(QuantRecipe, attr, self._wrap(fn, phase))
        try:
            yield self
        finally:
            for attr, fn in saved.items():
                setattr(QuantRecipe, attr, fn)

    def _wrap(self, fn, phase):
        def wrapped(*args, **kwargs):
            self.stack.append(phase)
            try:
                return fn(*args, **kwargs)
            finally:
                self.stack.pop()
        return wrapped


class OpCounter(TorchDispatchMode):
    """Counts every aten op (and the syncs among them) into the current phase."""

    def __init__(self, phases: _Phases) -> None:
        super().__init__()
        self.phases = phases
        self.ops: Counter = Counter()
        self.syncs: Counter = Counter()
        self.by_name: dict[str, Counter] = defaultdict(Counter)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        phase = self.phases.current
        self.ops[phase] += 1
        self.by_name[phase][name] += 1
        bool_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) if i is not None)
        if name in SYNC_OPS or bool_index:
            self.syncs[phase] += 1
        return func(*args, **(kwargs or {}))

    def count_host_copy(self) -> None:
        self.syncs[self.phases.current] += 1


@contextlib.contextmanager
def counting_host_copies(counter: OpCounter):
    """``Tensor.tolist`` and ``Tensor.cpu`` are device-to-host copies on a GPU (a sync each)."""
    tolist, cpu = torch.Tensor.tolist, torch.Tensor.cpu

    def counted_tolist(self):
        counter.count_host_copy()
        return tolist(self)

    def counted_cpu(self, *a, **k):
        counter.count_host_copy()
        return cpu(self, *a, **k)
    torch.Tensor.tolist, torch.Tensor.cpu = counted_tolist, counted_cpu
    try:
        yield
    finally:
        torch.Tensor.tolist, torch.Tensor.cpu = tolist, cpu


def count_build(recipe: QuantRecipe, linear: nn.Linear, stats: LayerStats, name: str = "blocks.0.attn1.to_q"):
    phases = _Phases()
    counter = OpCounter(phases)
    with phases.patched(), counter, counting_host_copies(counter):
        layer, chosen = recipe.build(name, linear, stats)
    return layer, chosen, counter


class _Timer(_Phases):
    def __init__(self) -> None:
        super().__init__()
        self.seconds: Counter = Counter()

    def _wrap(self, fn, phase):
        def wrapped(*args, **kwargs):
            outer = not self.stack
            self.stack.append(phase)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.stack.pop()
                if outer:
                    self.seconds[phase] += time.perf_counter() - start
        return wrapped


def time_build(recipe: QuantRecipe, linear: nn.Linear, stats: LayerStats, name: str = "blocks.0.attn1.to_q"):
    timer = _Timer()
    start = time.perf_counter()
    with timer.patched():
        layer, chosen = recipe.build(name, linear, stats)
    total = time.perf_counter() - start
    timer.seconds["other"] = total - sum(timer.seconds.values())
    return layer, chosen, {k: round(v, 3) for k, v in timer.seconds.items()} | {"total": round(total, 3)}


def layer_tensors(layer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in layer.state_dict().items() if v is not None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--in", dest="n_in", type=int, default=5120)
    p.add_argument("--out", dest="n_out", type=int, default=5120)
    p.add_argument("--timed", action="store_true", help="wall seconds per phase instead of op counts")
    p.add_argument("--save", help="write the built layer's tensors and choices here (torch.save)")
    p.add_argument("--compare", help="check the built layer against tensors saved with --save")
    p.add_argument("--top", type=int, default=8, help="most frequent ops listed per phase")
    args = p.parse_args()
    linear, stats = synthetic_layer(args.n_in, args.n_out)
    recipe = tsclip_recipe()
    if args.timed:
        layer, chosen, seconds = time_build(recipe, linear, stats)
        print(json.dumps({"shape": [args.n_out, args.n_in], "seconds": seconds}))
    else:
        layer, chosen, counter = count_build(recipe, linear, stats)
        out = {"shape": [args.n_out, args.n_in], "ops": dict(counter.ops), "syncs": dict(counter.syncs),
               "ops_total": sum(counter.ops.values()), "syncs_total": sum(counter.syncs.values()),
               "top": {ph: counter.by_name[ph].most_common(args.top) for ph in counter.by_name}}
        print(json.dumps(out, indent=1))
    if args.save:
        torch.save({"tensors": layer_tensors(layer), "chosen": chosen}, args.save)
    if args.compare:
        ref = torch.load(args.compare)
        got = layer_tensors(layer)
        diff = [k for k in ref["tensors"] if not torch.equal(ref["tensors"][k], got[k])]
        print(json.dumps({"equal_tensors": not diff, "differ": diff, "chosen_ref": ref["chosen"], "chosen": chosen}))


if __name__ == "__main__":
    main()
