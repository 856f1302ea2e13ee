"""calibrate: BF16 denoising of the calibration split, recording per expert, layer and timestep bin
what the method needs (``wanexp.calib.collect``).

Passes run expert by expert (``wanexp.calib.trajectory.ExpertSplit``): every sample's high-noise
steps with collectors on the high-noise expert, then every sample's low-noise steps, so one
denoising pass covers the calibration set and only one expert's statistics are held at a time.
``quant.calib_blocks_per_pass`` cuts each expert's pass further into groups of blocks (bounded
memory, at the cost of one more pass over that expert's steps per group).

Each pass writes one part file (``stats-<expert>-part<k>-of<n>.safetensors``) into the
content-addressed calibration cache; a finished part is not recomputed on resume, so a crash loses
at most the pass in flight. Hessians are *transient* when ``store_hessians`` is false (the default
at A14B size, where they are ~30 GB an expert): the pass builds that expert's GPTQ layers from them
at once, writes them to ``artifact/parts/`` and saves its statistics without the Hessians; the
quantize stage then swaps them in and writes the artifact as an entry file naming these parts
(``wanexp.quant.artifact``): the layers are written once, here.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from wanexp.analysis import trace_spec
from wanexp.calib import ActivationCollector, CalibStats
from wanexp.calib.paper_code import act_quant_hessians
from wanexp.calib.reduce import reduce_stats
from wanexp.calib.store import calib_setting, layer_stats, needs_of, part_path, transient_hessians
from wanexp.calib.trajectory import ExpertSplit, expert_steps, schedule, timestep_contexts
from wanexp.errors import WanexpError
from wanexp.generate import sample_seed
from wanexp.io import write_json
from wanexp.models import boundary_timestep, experts, install_timestep_hooks
from wanexp.models.offload import calib_offload_of, calibration_placement
from wanexp.quant.context import TimestepContext, step_fraction_bins
from wanexp.quant.methods import QuantRecipe, recipe_of
from wanexp.quant.targets import block_index, targeted_linears
from wanexp.schema import PERCENTILE
from wanexp.stages.common import calib_generation_cfg
from wanexp.stages.quantize import build_quant_part

# Bump when what the collectors record changes, so cached statistics of the old kind are not reused.
CALIB_FORMAT = 4  # 4: passes per expert, shared records for one-input layers, packed Hessians (2: traces)


def contexts_of(cfg, pipe) -> dict:
    """Each expert's TimestepContext for ``cfg``'s bins: ``quant.bin_rule=step_fraction`` (the paper
    code's cuts), ``quant.bin_edges``, or bins that follow the generation's step schedule
    (:func:`wanexp.quant.context.schedule_bins`: equal width unless a bin would hold no step)."""
    steps = int(cfg.model.generation.num_inference_steps)
    if cfg.quant.get("bin_rule") == "step_fraction":  # the paper code's: by each expert's share of the steps
        fractions = OmegaConf.to_container(cfg.quant.bin_fractions, resolve=True)
        bins = step_fraction_bins(schedule(pipe, steps), boundary_timestep(pipe), fractions)
        return {name: TimestepContext(bins=b) for name, b in bins.items()}
    edges = cfg.quant.get("bin_edges")
    edges = OmegaConf.to_container(edges, resolve=True) if edges else None
    return timestep_contexts(pipe, int(cfg.quant.get("bins", 1)), edges, str(cfg.expert.policy), steps)


def check_schedule(pipe, steps: int) -> None:
    """Both experts must run at least one step of the schedule, or one of them has nothing to calibrate on."""
    idle = [e for e, ts in expert_steps(pipe, steps).items() if not ts]
    if idle:
        raise WanexpError(f"num_inference_steps={steps} gives the {idle[0]} expert no denoising step to calibrate "
                          "on; use more steps")


def calib_parts(cfg, model) -> list[list[str]]:
    """One expert's targeted layers cut into passes of ``quant.calib_blocks_per_pass`` blocks (null: one)."""
    layers = targeted_linears(model)
    per = cfg.quant.get("calib_blocks_per_pass")
    if not per:
        return [layers]
    blocks = sorted({block_index(n) for n in layers})
    groups = [blocks[i:i + int(per)] for i in range(0, len(blocks), int(per))]
    return [[n for n in layers if block_index(n) in set(g)] for g in groups]


def calib_key(state, pipe, needs: list[str]) -> dict:
    """Everything the calibration statistics depend on, and nothing else (not the method's search
    settings, not the format): runs that agree on it share one set of statistics."""
    cfg = state.cfg
    samples = [(s.id, s.prompt, str(s.image_path), bool(s.extra.get("blank_image"))) for s in state.splits.calib]
    key = {"format": CALIB_FORMAT, "fingerprint": state.fingerprint, "needs": needs,
           "calib_tokens": int(cfg.quant.calib_tokens), "seed": int(cfg.seed),
           "bins": {k: c.bins.to_json() for k, c in state.contexts(pipe).items()},
           "blocks_per_pass": cfg.quant.get("calib_blocks_per_pass"), "samples": samples,
           "generation": calib_generation_cfg(cfg), "analysis": _trace_spec(state, pipe),
           **_hessian_input_key(cfg),
           "share_inputs": bool(calib_setting(cfg, "share_inputs", True))}
    if "hessian" in needs:
        key["hessian_token_stride"] = int(calib_setting(cfg, "hessian_token_stride", 1))
        key["hessians"] = "transient" if transient_hessians(cfg) else "stored"
    return key


def _hessian_input_key(cfg) -> dict:
    """What the paper code's Hessian of Q_A(x / s) also depends on: the smoothing and the activation
    format (absent for wanexp's own Hessian, so those statistics keep their address)."""
    if not QuantRecipe.second_pass(cfg.quant):
        return {}
    q = OmegaConf.to_container(cfg.quant, resolve=True)
    return {"hessian_input": {"kind": q["hessian_input"], "smoothing": q.get("smoothing"), "alpha": q.get("alpha"),
                              "percentile": q.get("percentile"), "act": OmegaConf.to_container(cfg.format, resolve=True)}}


def _trace_spec(state, pipe) -> dict:
    """The layers whose per-step statistics calibration also records (paper Fig. 1), resolved."""
    analysis = state.cfg.get("analysis")
    return trace_spec(OmegaConf.to_container(analysis, resolve=True) if analysis is not None else {},
                      targeted_linears(experts(pipe)["high_noise"]))


def stats_dir(state, key: dict) -> Path:
    """``<paths.calib_cache>/<hash of the key>`` (shared across runs), or the run's own ``calib/``."""
    cache = state.cfg.paths.get("calib_cache")
    if not cache:
        return state.dir.calib
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return Path(str(cache)).expanduser().resolve() / digest


def collector_settings(cfg, trace: dict) -> dict:
    """The ActivationCollector's settings from the config (and the traced layers, resolved). The paper
    code's second pass records one Hessian per layer, so no layers share records then."""
    return dict(max_tokens=int(cfg.quant.calib_tokens), seed=int(cfg.seed),
                trace_layers=trace.get("layers", ()), trace_percentile=trace.get("percentile", PERCENTILE),
                trace_tokens=trace.get("tokens", 16384),
                hessian_stride=int(calib_setting(cfg, "hessian_token_stride", 1)),
                share_inputs=bool(calib_setting(cfg, "share_inputs", True)) and not QuantRecipe.second_pass(cfg.quant))


def first_pass_needs(cfg) -> list[str]:
    """What a pass's collectors record: all the method needs, but the Hessian when the paper code's
    second pass records it (it needs the smoothing of the first)."""
    return [n for n in needs_of(cfg) if n != "hessian"] if QuantRecipe.second_pass(cfg.quant) else needs_of(cfg)


def collect_pass(pipe, expert: str, layers: list[str], contexts: dict, needs: list[str], samples, split: ExpertSplit,
                 steps: int, settings: dict, progress=iter, marks: list | None = None,
                 gpu_peaks: list | None = None) -> CalibStats:
    """One calibration pass: collectors on ``layers`` of ``expert`` while every sample runs that
    expert's steps (``split``). ``marks`` gets, per sample, [start, end of each step, end] in seconds
    from the pass start; ``gpu_peaks`` (on a GPU), per sample, the peak allocated bytes of each step
    (the first step's also covers the sample's text and image encoding): the peak statistics are
    reset at every step end, so a caller timing the whole stage takes the max with these."""
    start = time.perf_counter()
    stats = CalibStats()
    collector = ActivationCollector(expert, experts(pipe)[expert], layers, contexts[expert], needs, stats, **settings)
    hooks = install_timestep_hooks(pipe, lambda e, t: contexts[e].set_timestep(t))
    marks = [] if marks is None else marks
    cuda = torch.cuda.is_available()

    def on_step():  # one host sync a step (the NaN check), which also makes the marks true
        collector.check()
        marks[-1].append(round(time.perf_counter() - start, 4))
        if cuda and gpu_peaks is not None:  # each step's GPU peak (the first also holds the encoders'), then reset
            gpu_peaks[-1].append(int(torch.cuda.max_memory_allocated()))
            torch.cuda.reset_peak_memory_stats()
    try:
        for sample in progress(samples):
            marks.append([round(time.perf_counter() - start, 4)])
            if gpu_peaks is not None:
                gpu_peaks.append([])
            split.run(expert, sample, on_step=on_step, steps=int(steps))
            marks[-1].append(round(time.perf_counter() - start, 4))
    finally:
        for h in hooks + collector.handles:
            h.remove()
    collector.check()
    return stats


SHARED_TRANSIENT = ("expert.policy=shared pools both experts' Hessians, which transient Hessians never hold at once: "
                    "set quant.store_hessians=true (costs their size on disk) or expert=per_expert")


def calibrate(state) -> dict:
    """The calibrate stage (module docstring)."""
    cfg = state.cfg
    if cfg.quant.get("load"):
        return {"skipped": f"quant.load={cfg.quant.load}: the artifact is reused, nothing to calibrate"}
    needs = needs_of(cfg)
    if not needs:
        return {"skipped": f"quant={cfg.quant.name} needs no calibration statistics"}
    samples = state.splits.calib
    world = state.world
    if not samples:
        raise WanexpError(f"quant={cfg.quant.name} needs calibration data but the calibration split is empty "
                          "(set data.calib.num_samples, data.calib.ids or data.calib.prompts_file)")
    transient = transient_hessians(cfg)
    if transient and cfg.expert.policy == "shared":
        raise WanexpError(SHARED_TRANSIENT)
    pipe = state.bf16_pipe()
    check_schedule(pipe, int(calib_generation_cfg(cfg)["num_inference_steps"]))
    contexts = state.contexts(pipe)
    key = calib_key(state, pipe, needs)
    where = stats_dir(state, key)
    if where.parent != state.run_dir and world.main:  # the cache: say what the statistics are of, next to them
        write_json(where / "key.json", key)
    # data parallel (WORLD_SIZE > 1): each rank denoises its share; the statistics are reduced to rank 0
    mine = world.shard(samples)
    trace = key["analysis"]
    # the paper code's Hessian of Q_A(x/s) needs s, i.e. the maxima of the pass it would be recorded in:
    # a second pass of the same expert's steps records it (wanexp.calib.paper_code)
    second = QuantRecipe.second_pass(cfg.quant)
    first_needs = first_pass_needs(cfg)
    gen, seed = calib_generation_cfg(cfg), int(cfg.seed)
    steps = int(gen["num_inference_steps"])
    split = ExpertSplit(pipe, where / "boundary", lambda p, s, cb: denoise(p, s, gen, seed, cb))
    settings = collector_settings(cfg, trace)
    entries, reused, passes, seconds, reused_ranks = 0, 0, 0, {}, 0
    # per pass and sample: [start, end of each denoising step, end] in seconds from the pass start
    step_times: dict[str, list[list[float]]] = {}
    step_gpu_peaks: dict[str, list[list[int]]] = {}  # the same, the GPU peak of each step (on a GPU)
    # model.calib.offload=group: block-level group offloading of the experts for this stage only
    with calibration_placement(pipe, calib_offload_of(cfg), state.device, str(cfg.model.get("offload", "none"))):
        for expert, model in experts(pipe).items():
            parts = calib_parts(cfg, model)
            for k, layers in enumerate(parts):
                path = part_path(where, expert, k, len(parts))
                done = path.is_file() and (not transient or quant_part_done(state, expert, k, len(parts)))
                if done:  # finished by an earlier attempt, or by another run with the same key
                    reused += 1
                    continue
                start = time.perf_counter()
                own = rank_part_path(path, world)
                if own is not None and not transient and own.is_file():  # this rank's share survived a crash
                    stats = reduce_stats(CalibStats.load(own), world, int(cfg.quant.calib_tokens),
                                         int(cfg.seed))
                    _finish_pass(state, pipe, expert, layers, stats, path, transient, k, len(parts))
                    reused_ranks += 1
                    passes += 1
                    continue
                stats = collect_pass(pipe, expert, layers, contexts, first_needs, mine, split, steps, settings,
                                     lambda it: state.progress(it, f"calibrate {expert} {k + 1}/{len(parts)}"),
                                     step_times.setdefault(f"{expert}/{k}", []),
                                     step_gpu_peaks.setdefault(f"{expert}/{k}", []))
                if second:
                    act_quant_hessian_pass(cfg, pipe, split, expert, layers, contexts, stats, mine, steps,
                                           lambda it: state.progress(it, f"calibrate {expert}: Hessian of Q_A(x/s)"))
                if own is not None and not transient:  # kept until the pass is reduced: a crash redoes only the lost ranks
                    stats.save(own)
                    if os.environ.get("WANEXP_FAULT_DIE_AFTER_SHARE") == str(world.rank):
                        _die_once_the_others_saved(path, world)
                stats = reduce_stats(stats, world, int(cfg.quant.calib_tokens), int(cfg.seed))
                entries += _finish_pass(state, pipe, expert, layers, stats, path, transient, k, len(parts))
                passes += 1
                seconds[f"{expert}/{k}"] = round(time.perf_counter() - start, 3)
                del stats
    return {"samples": [s.id for s in samples], "needs": needs, "parts": passes + reused, "entries": entries,
            "parts_reused": reused, "stats_dir": str(where), "traced": trace.get("layers", []),
            "hessians": key.get("hessians"), "pass_seconds": seconds, "step_times": step_times,
            "step_gpu_peaks": step_gpu_peaks,
            "ranks": world.size, "rank_shares_reused": reused_ranks}


def _die_once_the_others_saved(path: Path, world) -> None:
    """Fault injection for the tests (``WANEXP_FAULT_DIE_AFTER_SHARE=<rank>``): this rank is lost
    after its share of the pass is on disk, and after every other rank's is too."""
    deadline = time.time() + 120
    others = [path.with_name(f"{path.stem}.rank{r}-of{world.size}.safetensors") for r in range(world.size)]
    while not all(p.is_file() for p in others) and time.time() < deadline:
        time.sleep(0.2)
    os._exit(17)


def rank_part_path(path: Path, world) -> Path | None:
    """Where one rank keeps its share of a pass until the pass is reduced (None in one process)."""
    if world.size == 1:
        return None
    return path.with_name(f"{path.stem}.rank{world.rank}-of{world.size}.safetensors")


def _finish_pass(state, pipe, expert, layers, stats, path: Path, transient: bool, k: int, n: int) -> int:
    """Rank 0 turns the reduced statistics of a pass into its part file (and, with transient
    Hessians, its GPTQ layers); every rank then drops its own share. Returns the entries written."""
    world = state.world
    entries = 0
    if world.main:
        if transient:  # the Hessians live only now: build this pass's GPTQ layers from them
            build_quant_part(state, pipe, expert, layers, stats, k, n)
            stats.drop("hessian")
        stats.save(path)
        entries = len(stats.data)
    world.barrier()
    own = rank_part_path(path, world)
    if own is not None:
        own.unlink(missing_ok=True)
    return entries


def act_quant_hessian_pass(cfg, pipe, split, expert: str, layers: list[str], contexts: dict, stats,
                           samples, steps: int, progress=iter) -> None:
    """The paper code's GPTQ Hessian (``quant.hessian_input=smoothed_act_quant``) into ``stats``: this
    expert's calibration steps again, with s from the maxima ``stats`` now holds."""
    method = recipe_of(OmegaConf.to_container(cfg.quant, resolve=True),
                       OmegaConf.to_container(cfg.format, resolve=True), contexts["high_noise"].bins.num_bins)
    pools = {e: list(contexts) if cfg.expert.policy == "shared" else [e] for e in contexts}
    wanted = {e: (layers if e == expert else []) for e in contexts}
    hessians = act_quant_hessians(pipe, wanted, contexts, method, lambda e, names: layer_stats(stats, pools[e], names),
                                  progress(samples),
                                  lambda sample: split.run(expert, sample, steps=steps))
    for key, d in hessians.data.items():
        stats.data.setdefault(key, {}).update(d)


def quant_part_done(state, expert: str, k: int, n: int) -> bool:
    return state.dir.artifact_part(expert, k, n).is_file()


@torch.no_grad()
def denoise(pipe, sample, gen: dict, seed: int, callback=None) -> None:
    """One BF16 trajectory of a calibration sample at the calibration setting ``gen`` (latents only), with
    generation's prompt handling (wanexp.generate.generate_one): calibration sees what inference sees."""
    image = sample.load_image().resize((int(gen["width"]), int(gen["height"])))
    extra = {"guidance_scale_2": float(gen["guidance_scale_2"])} if gen.get("guidance_scale_2") is not None else {}
    pipe(image=image, prompt=sample.prompt, negative_prompt=gen.get("negative_prompt") or None,
         height=int(gen["height"]), width=int(gen["width"]), num_frames=int(gen["num_frames"]),
         num_inference_steps=int(gen["num_inference_steps"]), guidance_scale=float(gen["guidance_scale"]),
         output_type="latent", callback_on_step_end=callback,
         max_sequence_length=int(gen.get("max_sequence_length") or 512),
         generator=torch.Generator().manual_seed(sample_seed(int(seed), sample.id)), **extra)
