"""quantize: replace the targeted linears of each expert by the method's QuantLinears and save the
artifact (``artifact/quantized.safetensors`` + ``choices.json``).

Layers are built on the run's device (the GPU even when the pipeline is offloaded to the CPU) and
placed where the layer was (``wanexp.quant.api``). Statistics reach each layer's build lazily, one
layer at a time, so a full Hessian exists only for the layer being built. With transient Hessians
(``wanexp.stages.calibrate``) the calibrate stage has already built every layer into
``artifact/parts/``; this stage assembles them and writes an artifact made of those parts
(``wanexp.quant.artifact``): the entry file names them, and holds only what changed since (nothing,
unless the paper code's W4A4 clip search re-picked the clip tables), so the model is on disk once.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from omegaconf import OmegaConf

from wanexp.calib.paper_code import w4a4_clip_search
from wanexp.calib.store import calib_setting, layer_stats, load_calib_stats, transient_hessians
from wanexp.errors import WanexpError
from wanexp.generate import sample_seed
from wanexp.io import read_json, write_json
from wanexp.models import (boundary_timestep, experts, held_bytes, install_scope_hooks, install_timestep_hooks,
                           pipeline_bytes)
from wanexp.quant.attention import AttentionConfig, AttentionMode
from wanexp.models.lora import lora_records
from wanexp.quant.api import attach_context, build_timed, linear_on, quantize_, replace_module
from wanexp.quant.artifact import (artifact_digest, check_artifact_files, load_artifact, read_artifact,
                                   save_artifact, save_layers)
from wanexp.quant.context import TimestepBins, TimestepContext
from wanexp.quant.linear import QuantLinear
from wanexp.quant.methods import MethodConfig, QuantRecipe, recipe_of
from wanexp.quant.targets import select_targets
from wanexp.stages.common import generation_cfg



def artifact_path(state) -> Path:
    """This run's artifact, or the one named by ``quant.load`` (reused without recalibrating)."""
    load = state.cfg.quant.get("load")
    return Path(str(load)).expanduser().resolve() if load else state.dir.artifact


def artifact_expect(cfg) -> dict:
    return {"method": cfg.quant.name, "format": {"name": cfg.format.name,
                                                 "opts": OmegaConf.to_container(cfg.format.weight, resolve=True)}}


def keep_lists(cfg, expert: str) -> tuple[list[int], list[str]]:
    """Blocks and module patterns kept in BF16 for one expert: the expert policy's common lists, the
    expert's own (``expert.high_noise.keep_blocks``…), and the method's (``quant.keep_modules``)."""
    own = cfg.expert.get(expert) or {}
    blocks = list(cfg.expert.get("keep_blocks") or []) + list(own.get("keep_blocks") or [])
    modules = (list(cfg.expert.get("keep_modules") or []) + list(own.get("keep_modules") or [])
               + list(cfg.quant.get("keep_modules") or []))
    return sorted(set(int(b) for b in blocks)), modules


def recipe_for(cfg, num_bins: int) -> QuantRecipe:
    """The recipe of ``cfg`` (quant + format groups) for experts with ``num_bins`` timestep bins."""
    quant = dict(OmegaConf.to_container(cfg.quant, resolve=True),
                 lowrank_solver=calib_setting(cfg, "lowrank_solver", "svd"))
    return recipe_of(quant, OmegaConf.to_container(cfg.format, resolve=True), num_bins)


def method_for(cfg, num_bins: int) -> MethodConfig:
    """:func:`recipe_for` as a builder with its own statistics (``stats``, then ``build(name, linear)``)."""
    return MethodConfig.of(recipe_for(cfg, num_bins))


def _recipe(state, pipe, expert: str = "high_noise") -> QuantRecipe:
    """The run's recipe with ``expert``'s bins (they follow each expert's steps, and may differ)."""
    return recipe_for(state.cfg, state.contexts(pipe)[expert].bins.num_bins)


def artifact_header(cfg, fingerprint: str, pipe, contexts: dict, method: QuantRecipe) -> dict:
    """The artifact's JSON header: what was quantized how, for which base model (and the LoRAs merged
    into it), with which bins."""
    return {"method": cfg.quant.name, "format": method.weight_format, "act_format": method.act_format,
            "expert_policy": cfg.expert.policy, "fingerprint": fingerprint, "boundary": boundary_timestep(pipe),
            "bins": {k: c.bins.to_json() for k, c in contexts.items()},
            "quant": OmegaConf.to_container(cfg.quant, resolve=True),
            "lora": [r for m in experts(pipe).values() for r in lora_records(m)]}


def _header(state, pipe, method: QuantRecipe) -> dict:
    return artifact_header(state.cfg, state.fingerprint, pipe, state.contexts(pipe), method)


def expert_targets(cfg, model, expert: str) -> list[str]:
    """The linears of ``expert`` the method quantizes (the targeted ones less what is kept in BF16)."""
    keep_blocks, keep_modules = keep_lists(cfg, expert)
    return select_targets(model, keep_blocks, keep_modules)


def build_layers(model, recipe: QuantRecipe, targets: list[str], stats, compute_device, progress=iter,
                 store_device="cpu") -> tuple[dict, dict, dict]:
    """``({name: QuantLinear}, choices, seconds)`` for ``targets`` of ``model`` from their ``stats``,
    built on ``compute_device`` and kept on ``store_device``; the model keeps its BF16 layers (see
    :func:`swap_layers`)."""
    built, chosen, seconds = {}, {}, {}
    for name in progress(targets):
        layer, chosen[name], seconds[name] = build_timed(recipe, name, linear_on(model.get_submodule(name),
                                                                                 compute_device), stats)
        built[name] = layer.to(store_device)
    return built, chosen, seconds


def swap_layers(model, built: dict, context) -> int:
    """Put built QuantLinears in place of their linears (each where the linear was), reading ``context``."""
    for name, layer in built.items():
        layer.context = context
        replace_module(model, name, layer)
    return len(built)


def build_quant_part(state, pipe, expert: str, layers: list[str], stats, k: int, n: int) -> Path:
    """Build one calibration pass's QuantLinears of ``expert`` now (its Hessians are transient) and
    write them to ``artifact/parts/``; the model keeps its BF16 layers (later passes calibrate on
    BF16 activations)."""
    model = experts(pipe)[expert]
    wanted = set(layers)
    targets = [t for t in expert_targets(state.cfg, model, expert) if t in wanted]
    recipe = _recipe(state, pipe, expert)
    built, chosen, seconds = build_layers(model, recipe, targets, layer_stats(stats, [expert], targets), state.device,
                                          lambda it: state.progress(it, f"quantize {expert} {k + 1}/{n}"))
    path = state.dir.artifact_part(expert, k, n)
    save_layers(path, {expert: built}, dict(_header(state, pipe, recipe), part=[expert, k, n]))
    write_json(path.with_suffix(".choices.json"), chosen)
    write_json(path.with_suffix(".seconds.json"), seconds)
    return path


def _size_info(pipe, prefix: str = "") -> dict:
    """Model size as the papers count it: the two experts (what quantization shrinks), and the whole
    pipeline (text encoder and VAE too)."""
    return {f"{prefix}model_bytes": held_bytes(*experts(pipe).values()), f"{prefix}pipeline_bytes": pipeline_bytes(pipe)}


def quantize(state) -> dict:
    """The quantize stage (module docstring)."""
    cfg = state.cfg
    if cfg.quant.name == "bf16":
        pipe = state.bf16_pipe()
        return {"skipped": "quant=bf16 keeps every layer in BF16", **_size_info(pipe), **_size_info(pipe, "bf16_")}
    if cfg.quant.get("load"):
        bf16 = _size_info(state.bf16_pipe(), "bf16_")
        pipe, hooks = quantized_pipe(state)
        for h in hooks:
            h.remove()
        return {"loaded": str(artifact_path(state)), "artifact_sha256": state.artifact_sha256,
                **_size_info(pipe), **bf16}
    pipe = state.bf16_pipe()
    bf16 = _size_info(pipe, "bf16_")
    transient = transient_hessians(cfg)
    parts = sorted(state.dir.artifact_parts.glob("*-part*-of*.safetensors")) if transient else []
    if transient:
        swapped, chosen, seconds, method = _assemble_parts(state, pipe, parts)
    else:
        swapped, chosen, seconds, method = _quantize_now(state, pipe)
    state._pipe_quantized = True
    if method.clip_search and method.clip_search_data == "w4a4_generation":
        _w4a4_clip_search(state, pipe, method, state.contexts(pipe), chosen)
    # with parts, the artifact references them: only what no part holds as it is now is written again
    save_artifact(state.dir.artifact, experts(pipe), _header(state, pipe, method), parts=parts)
    write_json(state.dir.choices, chosen)
    write_json(state.dir.layer_seconds, seconds)
    return {"layers": swapped, "artifact_sha256": artifact_digest(state.dir.artifact), **_size_info(pipe), **bf16}


def _quantize_now(state, pipe):
    cfg = state.cfg
    method = _recipe(state, pipe)
    stats = load_calib_stats(state.run_dir) if QuantRecipe.needs(cfg.quant) else None
    swapped, chosen, seconds = quantize_experts(cfg, pipe, method, stats, state.contexts(pipe), state.device,
                                                lambda it, name: state.progress(it, f"quantize {name}"))
    return swapped, chosen, seconds, method


def quantize_experts(cfg, pipe, recipe: QuantRecipe, stats, contexts: dict, compute_device, progress=None):
    """Swap each expert's targets for the recipe's QuantLinears, from calibration ``stats`` (None: the
    method needs none); returns (layers swapped, per-layer choices, per-layer build seconds), per expert."""
    swapped, chosen, seconds = {}, {}, {}
    for name, model in experts(pipe).items():
        targets = expert_targets(cfg, model, name)
        pool = list(experts(pipe)) if cfg.expert.policy == "shared" else [name]
        # bins follow each expert's steps (they may differ); built on the run's device (the GPU even when
        # the pipeline is offloaded), kept where the layer was
        done = quantize_(model, replace(recipe, num_bins=contexts[name].bins.num_bins),
                         progress(targets, name) if progress else targets, contexts[name],
                         compute_device=compute_device, stats=layer_stats(stats, pool, targets) if stats is not None else {})
        swapped[name], chosen[name], seconds[name] = len(done), done.choices, done.seconds
    return swapped, chosen, seconds


def _assemble_parts(state, pipe, parts: list[Path]):
    """The layers the calibrate stage built from transient Hessians, swapped into the pipeline (each
    part checked against its checksums: the artifact will reference these bytes)."""
    if not parts:
        raise WanexpError(f"{state.dir.artifact_parts} holds no quantized parts (run stage=calibrate first: with "
                          "transient Hessians it builds the GPTQ layers)")
    contexts = state.contexts(pipe)
    swapped, chosen, seconds = ({e: 0 for e in experts(pipe)}, {e: {} for e in experts(pipe)},
                                {e: {} for e in experts(pipe)})
    for path in parts:
        header, tensors, _ = read_artifact(path)
        expert = header["part"][0]
        model = experts(pipe)[expert]
        built = {name: QuantLinear.from_description(desc, {k.rpartition("/")[2]: v for k, v in tensors.items()
                                                           if k.startswith(f"{expert}/{name}/")})
                 for name, desc in header["layers"][expert].items()}
        swapped[expert] += swap_layers(model, built, contexts[expert])
        chosen[expert].update(read_json(path.with_suffix(".choices.json")))
        seconds[expert].update(read_json(path.with_suffix(".seconds.json")))
    return swapped, chosen, seconds, _recipe(state, pipe)


def _w4a4_clip_search(state, pipe, method, contexts: dict, chosen: dict) -> None:
    w4a4_search(state.cfg, pipe, method, contexts, chosen, state.splits.calib,
                lambda it: state.progress(it, "TS-clip search (W4A4 generation)"))


def w4a4_search(cfg, pipe, method, contexts: dict, chosen: dict, calib_samples, progress=iter) -> None:
    """The paper code's TS-clip search data (``quant.clip_search_data=w4a4_generation``): one W4A4 CFG
    generation per sample of the first ``quant.search_samples`` calibration samples, at ``model.generation``
    with the ``quant.search_generation`` overrides (:mod:`wanexp.calib.paper_code`). The picks fill the clip
    tables and ``chosen``; the layers' sensitivity numbers stay those measured at clip 1."""
    q = cfg.quant
    samples = list(calib_samples)[: int(q.get("search_samples", 1))]
    if not samples:
        raise WanexpError("quant.clip_search_data=w4a4_generation searches on calibration samples, but the "
                          "calibration split is empty (set data.calib.num_samples)")
    gen = {**generation_cfg(cfg), **OmegaConf.to_container(q.get("search_generation") or OmegaConf.create({}))}
    for model in experts(pipe).values():
        attach_context(model, contexts[[e for e, m in experts(pipe).items() if m is model][0]])
    picks = w4a4_clip_search(pipe, method, contexts, progress(samples), gen,
                             lambda sample: sample_seed(int(cfg.seed), sample.id), int(q.get("search_rows", 4096)))
    for (expert, name), picked in picks.items():
        chosen[expert].setdefault(name, {}).update(picked)


def quantized_pipe(state):
    """The pipeline with the run's artifact applied (reusing the in-memory one when it is already quantized)."""
    if state._pipe is not None and state._pipe_quantized:
        pipe = state._pipe
        contexts = state.contexts(pipe)
    else:
        fingerprint = state.fingerprint
        check_artifact_files(artifact_path(state))  # a missing or truncated part is named before the model loads
        pipe = state.bf16_pipe()
        header = load_artifact(artifact_path(state), experts(pipe), fingerprint,
                               expect=artifact_expect(state.cfg))  # every tensor checked against its SHA-256
        state.artifact_sha256 = header["sha256"]
        state._pipe_quantized = True
        contexts = artifact_contexts(header)  # the clip tables were made for the artifact's bins
    for name, model in experts(pipe).items():
        attach_context(model, contexts[name])
    hooks = install_timestep_hooks(pipe, lambda expert, t: contexts[expert].set_timestep(t))
    attention = attention_config(state.cfg)
    if attention.name != "bf16":  # attention=fp8 | int8_sage: every attention call of the experts
        hooks += install_scope_hooks(pipe, AttentionMode(attention))
    return pipe, hooks


def attention_config(cfg) -> AttentionConfig:
    """The run's ``attention`` group (bf16 when the config has none: runs written before it existed)."""
    att = OmegaConf.to_container(cfg.attention, resolve=True) if cfg.get("attention") is not None else {}
    return AttentionConfig(**{k: v for k, v in att.items() if k in ("name", "block", "smooth_k", "pv", "block_n")})


def artifact_contexts(header: dict) -> dict:
    """Each expert's TimestepContext with the bins an artifact's clip tables were chosen for."""
    return {e: TimestepContext(bins=TimestepBins.from_json(b)) for e, b in header["bins"].items()}
