"""The seed paper code's two extra passes over the pipeline (README "The seed paper code's recipe").

* :func:`act_quant_hessians` (``quant.hessian_input=smoothed_act_quant``): the calibration
  trajectories once more, accumulating each layer's GPTQ Hessian of ``Q_A(x / s)`` at clip 1, with
  the smoothing s from the first pass's maxima (so it cannot be recorded in the first pass).
* :func:`w4a4_clip_search` (``quant.clip_search_data=w4a4_generation``): one W4A4 generation with
  CFG per search sample, every layer already quantized at clip 1, whose layer inputs score the TS-clip
  candidates (:class:`wanexp.quant.clip_search.OutputErrorSearch`).

The runner supplies what only it knows (the samples, how a calibration trajectory is run, the
per-layer statistics as the quantize stage pools them); everything else lives here.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

from wanexp.calib.collect import ALL_BINS, ActivationCollector, CalibStats
from wanexp.models import experts, install_timestep_hooks


def act_quant_hessians(pipe, layers: Mapping[str, list[str]], contexts: Mapping, method,
                       layer_stats_of: Callable[[str, list[str]], Mapping], samples: Iterable,
                       denoise: Callable[[object], None]) -> CalibStats:
    """Σ Q_A(x/s)ᵀ Q_A(x/s) of each layer in ``layers`` (per expert), pooled over bins, as a CalibStats
    holding only those Hessians. ``layer_stats_of(expert, names)`` gives the first pass's statistics
    (the smoothing's input), ``denoise(sample)`` runs one calibration trajectory."""
    models = experts(pipe)
    hessians, collectors = CalibStats(), []
    for name, model in models.items():
        stats = layer_stats_of(name, layers[name])
        fns = {n: method.hessian_input_fn(model.get_submodule(n), stats[n]) for n in layers[name]}
        collectors.append(ActivationCollector(name, model, layers[name], contexts[name], ["hessian"], hessians,
                                              hessian_input=fns))
    hooks = install_timestep_hooks(pipe, lambda expert, t: contexts[expert].set_timestep(t))
    try:
        for sample in samples:
            denoise(sample)
    finally:
        for h in hooks + [h for c in collectors for h in c.handles]:
            h.remove()
    out = CalibStats()
    out.data = {key: {"hessian": d["hessian"]} for key, d in hessians.data.items()
                if key[2] == ALL_BINS and "hessian" in d}
    return out


def w4a4_clip_search(pipe, method, contexts: Mapping, samples: Iterable, gen_cfg: Mapping,
                     seed_of: Callable[[object], int], max_rows: int = 4096) -> dict:
    """Run the search generation(s) and write every searched layer's clip table; returns
    ``{(expert, layer): {"clip", "clip_candidate", "search_err"}}`` (see ``OutputErrorSearch.apply``)."""
    from wanexp.generate import generate_one
    from wanexp.quant.api import quant_layers
    from wanexp.quant.clip_search import OutputErrorSearch
    layers = {(e, n): layer for e, model in experts(pipe).items() for n, layer in quant_layers(model).items()
              if method.searches(n) and layer.act_format is not None}
    search = OutputErrorSearch(layers, method.clip_candidates, method.exp_shifts, max_rows)
    hooks = install_timestep_hooks(pipe, lambda expert, t: contexts[expert].set_timestep(t)) + search.attach()
    try:
        for sample in samples:
            generate_one(pipe, sample, gen_cfg, seed_of(sample), decode=False)
    finally:
        for h in hooks:
            h.remove()
    return search.apply({e: c.bins.num_bins for e, c in contexts.items()})  # the experts' bins may differ
