"""The public Python API: quantize a ``WanImageToVideoPipeline`` you loaded yourself.

    recipe = wanexp.recipe("tsclip", format="mxfp4")
    wanexp.calibrate_and_quantize(pipe, recipe, prompts=[...], images=[...], out="q.safetensors")
    pipe = wanexp.load_quantized(other_bf16_pipe, "q.safetensors")

A recipe is the runner's own configuration (``conf/quant/<name>.yaml`` + ``conf/format/<format>.yaml``
+ ``conf/expert/…``, composed by Hydra's compose API from the package's ``conf/``), and the work is
the runner's own machinery: calibration passes expert by expert (``wanexp.stages.calibrate.collect_pass``
over ``wanexp.calib.trajectory.ExpertSplit``), layers built by ``wanexp.quant`` (``QuantRecipe``,
``quantize_``), the artifact written and read by ``wanexp.quant.artifact`` with the base model's
fingerprint, so an artifact from either is usable by the other. What the API does not do is the
runner's bookkeeping: statistics stay in memory (no cache, no resume).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

from wanexp.errors import WanexpError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
GENERATION_KEYS = ("height", "width", "num_frames", "num_inference_steps", "guidance_scale", "guidance_scale_2",
                   "negative_prompt", "max_sequence_length")
_STATE = "_wanexp_quantized"  # on each quantized expert: its base model's fingerprint and its timestep hook


def _group(name: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / name).glob("*.yaml"))


def recipes() -> list[str]:
    """The recipe names: every ``conf/quant`` method that quantizes (``bf16`` does not)."""
    return [n for n in _group("quant") if n.split("_paper_code")[0] != "bf16"]


@dataclass(frozen=True)
class Recipe:
    """A quantization recipe: the runner's ``quant``, ``format`` and ``expert`` groups, plus any Hydra
    overrides (``"quant.bins=8"``, ``"expert.keep_blocks=[0]"``). ``model`` picks the scale-dependent
    settings (SVDQuant rank, calibration memory policy, generation defaults); None: from the pipeline."""

    name: str
    format: str = "mxfp4"
    expert: str = "per_expert"
    overrides: tuple[str, ...] = ()
    model: str | None = None

    def config(self, model: str | None = None):
        """The composed run config of this recipe (checked as the runner checks it)."""
        from wanexp.run import validate
        cfg = compose([f"quant={self.name}", f"format={self.format}", f"expert={self.expert}",
                       f"model={self.model or model or 'tiny'}", "logger=none", *self.overrides])
        validate(cfg)
        return cfg


def recipe(name: str, format: str = "mxfp4", *, expert: str = "per_expert", model: str | None = None,
           overrides: Sequence[str] = ()) -> Recipe:
    """The recipe ``name`` (see :func:`recipes`) in ``format``; composed now, so a bad name, format
    or override fails here with one message."""
    for value, group, choices in ((name, "recipe", recipes()), (format, "format", _group("format")),
                                  (expert, "expert", _group("expert"))):
        if value not in choices:
            raise WanexpError(f"{group} {value!r} does not exist; available: {', '.join(choices)}")
    if model is not None and model not in _group("model"):
        raise WanexpError(f"model {model!r} does not exist; available: {', '.join(_group('model'))}")
    out = Recipe(name, format, expert, tuple(overrides), model)
    out.config()
    return out


_recipe = recipe


def compose(overrides: list[str]):
    """``conf/config.yaml`` with ``overrides``, by Hydra's compose API (also inside a running Hydra app)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from wanexp.config import schema_error
    outer = GlobalHydra.instance().hydra if GlobalHydra.instance().is_initialized() else None
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose("config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise WanexpError(f"recipe overrides {list(overrides)}: {schema_error(err)}") from None
    finally:
        if outer is not None:
            GlobalHydra.instance().initialize(outer)


def tiny_checkpoint() -> Path:
    """The embedded tiny Wan2.2-I2V of ``model=tiny`` (the trained proxy) as a local diffusers directory
    (built offline once, in ``$WANEXP_CACHE``)."""
    from wanexp.models.tiny import WEIGHTS, ensure_tiny_checkpoint
    return ensure_tiny_checkpoint(os.environ.get("WANEXP_CACHE") or "~/.cache/wanexp", WEIGHTS["tiny"])


@dataclass
class Quantized:
    """What :func:`calibrate_and_quantize` made: the artifact's path (None without ``out``), its header,
    the layers swapped per expert, and per layer what the method chose (clip ratios, α, errors)."""

    path: Path | None
    header: dict
    layers: dict[str, int]
    choices: dict[str, dict] = field(repr=False, default_factory=dict)


class _Prompt:
    """A calibration sample from the caller: an id for its seed, a prompt, an image (None: blank)."""

    def __init__(self, k: int, prompt: str, image: Any):
        self.id, self.prompt, self.image = f"calib_{k}", prompt, image

    def load_image(self):
        from PIL import Image
        if self.image is None:  # the runner's blank frame for prompts without an image
            return Image.new("RGB", (832, 480), (128, 128, 128))
        if isinstance(self.image, (str, os.PathLike)):
            with Image.open(self.image) as im:
                return im.convert("RGB")
        return self.image.convert("RGB")


def _samples(prompts: Sequence[str], images: Any) -> list[_Prompt]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts or [])
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise WanexpError("calibration needs a non-empty list of non-empty prompts")
    if images is None or not isinstance(images, (list, tuple)):
        images = [images] * len(prompts)  # one image (or none) for every prompt
    if len(images) != len(prompts):
        raise WanexpError(f"{len(prompts)} prompts but {len(images)} images: give one image per prompt, or one for all")
    for im in images:
        if isinstance(im, (str, os.PathLike)) and not Path(im).is_file():
            raise WanexpError(f"calibration image {im} does not exist")
    return [_Prompt(k, p.strip(), im) for k, (p, im) in enumerate(zip(prompts, images))]


def model_group(pipe) -> str:
    """The ``conf/model`` group whose scale-dependent settings fit ``pipe``: the tiny model, else the A14B."""
    from wanexp.models.tiny import TINY_SPEC
    config = dict(experts_of(pipe)["high_noise"].config)
    tiny = TINY_SPEC["transformer"]
    same = all(config.get(k) == tiny[k] for k in ("num_layers", "num_attention_heads", "attention_head_dim", "ffn_dim"))
    return "tiny" if same else "wan22_i2v_a14b"


def experts_of(pipe) -> dict:
    """Both experts of a Wan2.2 two-expert pipeline (anything else is refused)."""
    from wanexp.models import experts
    if getattr(pipe, "transformer", None) is None or getattr(pipe, "transformer_2", None) is None:
        raise WanexpError(f"{type(pipe).__name__} is not a two-expert Wan2.2 pipeline (transformer and transformer_2); "
                          "wanexp quantizes WanImageToVideoPipeline (Wan2.2-I2V-A14B)")
    return experts(pipe)


def base_fingerprint(pipe) -> str:
    """The BF16 base model's fingerprint (LoRAs merged included), also once wanexp quantized the pipeline."""
    from wanexp.models import model_fingerprint
    from wanexp.quant.api import quant_layers
    models = experts_of(pipe)
    recorded = {getattr(m, _STATE, {}).get("fingerprint") for m in models.values()}
    if recorded != {None}:
        return recorded.pop()
    if any(quant_layers(m) for m in models.values()):
        raise WanexpError("this pipeline holds quantized layers that wanexp did not put there; load a BF16 pipeline")
    return model_fingerprint(pipe)


def _generation(cfg, generation: dict) -> None:
    unknown = sorted(set(generation) - set(GENERATION_KEYS))
    if unknown:
        raise WanexpError(f"unknown generation settings {unknown}; known: {', '.join(GENERATION_KEYS)}")
    for key, value in generation.items():
        cfg.model.generation[key] = value


def calibrate_and_quantize(pipe, recipe: Recipe | str, prompts: Sequence[str] | None = None, images: Any = None,
                           out: str | os.PathLike | None = None, *, lora: Iterable[Any] | None = None, seed: int = 42,
                           progress: bool = False, **generation) -> Quantized:
    """Calibrate ``pipe`` on ``prompts`` (with ``images``: one per prompt, one for all, or None for a
    blank frame), quantize both experts in place by ``recipe``, and write the artifact to ``out``.

    ``generation`` (height, width, num_frames, num_inference_steps, guidance_scale, …) is the setting
    calibration denoises at, as the runner's ``model.generation``: use the one you will generate with
    (the timestep bins follow its step schedule). ``lora``: ``[path@scale, …]`` merged into the BF16
    experts first (``wanexp.models.lora``). Bad input fails before any calibration."""
    from wanexp.models.lora import check_specs, merge_loras
    from wanexp.quant.artifact import save_artifact
    from wanexp.run import validate
    from wanexp.stages.calibrate import (SHARED_TRANSIENT, check_schedule, contexts_of, needs_of,
                                         transient_hessians)
    from wanexp.stages.common import calib_generation_cfg
    from wanexp.stages.quantize import artifact_header, quantize_experts, recipe_for, w4a4_search

    recipe = _recipe(recipe) if isinstance(recipe, str) else recipe
    _require_bf16(pipe)
    cfg = recipe.config(model_group(pipe))
    _generation(cfg, generation)
    cfg.seed = int(seed)
    validate(cfg)
    if transient_hessians(cfg) and cfg.expert.policy == "shared":
        raise WanexpError(SHARED_TRANSIENT)
    samples = _samples(prompts, images) if needs_of(cfg) else []
    if samples:
        check_schedule(pipe, int(calib_generation_cfg(cfg)["num_inference_steps"]))
    out = _writable(out)
    merge_loras(pipe, check_specs(lora))
    fingerprint = base_fingerprint(pipe)
    contexts = contexts_of(cfg, pipe)
    method = recipe_for(cfg, contexts["high_noise"].bins.num_bins)
    device = pipe._execution_device  # the GPU also when the pipeline is offloaded to the CPU
    bar = _progress(progress)
    with tempfile.TemporaryDirectory(prefix="wanexp_boundary_") as boundary:  # ExpertSplit's per-sample states
        calib = _Calibration(cfg, pipe, samples, contexts, Path(boundary), bar)
        if samples and transient_hessians(cfg):
            swapped, chosen = calib.quantize_transient(method, device)
        else:
            swapped, chosen, _ = quantize_experts(cfg, pipe, method, calib.stats() if samples else None, contexts,
                                                  device, lambda it, name: bar(it, f"quantize {name}"))
    if method.clip_search and method.clip_search_data == "w4a4_generation":  # the paper code's search data
        w4a4_search(cfg, pipe, method, contexts, chosen, samples, lambda it: bar(it, "TS-clip search"))
    _activate(pipe, contexts, fingerprint)
    header = artifact_header(cfg, fingerprint, pipe, contexts, method)
    path = save_artifact(out, experts_of(pipe), header) if out is not None else None
    return Quantized(path, header, swapped, chosen)


def _require_bf16(pipe) -> None:
    base_fingerprint(pipe)  # refuses layers quantized by something else
    if any(getattr(m, _STATE, None) for m in experts_of(pipe).values()):
        raise WanexpError("this pipeline is already quantized; calibrate a BF16 pipeline")


def _writable(out) -> Path | None:
    """``out`` as a path whose folder can be written, checked before any work."""
    if out is None:
        return None
    out = Path(out).expanduser()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WanexpError(f"cannot write the artifact {out}: {err.strerror}") from None
    if not os.access(out.parent, os.W_OK):
        raise WanexpError(f"cannot write the artifact {out}: {out.parent} is not writable")
    return out


class _Calibration:
    """The calibrate stage's passes over the caller's prompts: expert by expert (``ExpertSplit``), each
    expert in the passes of ``calib_parts``, through the stage's ``collect_pass``; statistics in memory."""

    def __init__(self, cfg, pipe, samples, contexts: dict, boundary_dir: Path, bar):
        from wanexp.calib.trajectory import ExpertSplit
        from wanexp.stages.calibrate import denoise
        from wanexp.stages.common import calib_generation_cfg
        self.cfg, self.pipe, self.samples, self.contexts, self.bar = cfg, pipe, samples, contexts, bar
        self.gen, seed = calib_generation_cfg(cfg), int(cfg.seed)
        self.split = ExpertSplit(pipe, boundary_dir, lambda p, s, cb: denoise(p, s, self.gen, seed, cb))

    def passes(self):
        from wanexp.stages.calibrate import calib_parts
        for expert, model in experts_of(self.pipe).items():
            for layers in calib_parts(self.cfg, model):
                yield expert, layers

    def collect(self, expert: str, layers: list[str]):
        from wanexp.quant.methods import QuantRecipe
        from wanexp.stages.calibrate import act_quant_hessian_pass, collect_pass, collector_settings, first_pass_needs
        steps = int(self.gen["num_inference_steps"])
        stats = collect_pass(self.pipe, expert, layers, self.contexts, first_pass_needs(self.cfg), self.samples,
                             self.split, steps, collector_settings(self.cfg, {}),
                             lambda it: self.bar(it, f"calibrate {expert}"))
        if QuantRecipe.second_pass(self.cfg.quant):  # the paper code's Hessian of Q_A(x/s)
            act_quant_hessian_pass(self.cfg, self.pipe, self.split, expert, layers, self.contexts, stats, self.samples,
                                   steps, lambda it: self.bar(it, f"calibrate {expert}: Hessian of Q_A(x/s)"))
        return stats

    def stats(self):
        """Every pass of both experts, merged."""
        from wanexp.calib import CalibStats
        stats = CalibStats()
        for expert, layers in self.passes():
            stats.update(self.collect(expert, layers))
        return stats

    def quantize_transient(self, method, device):
        """As the calibrate stage does with transient Hessians: each pass's layers are built from its
        Hessians at once (the experts keep their BF16 layers until every pass is done), then swapped in."""
        from wanexp.stages.quantize import build_layers, expert_targets, layer_stats, swap_layers
        built, chosen = {e: {} for e in self.contexts}, {e: {} for e in self.contexts}
        for expert, layers in self.passes():
            stats = self.collect(expert, layers)
            model = experts_of(self.pipe)[expert]
            targets = [t for t in expert_targets(self.cfg, model, expert) if t in set(layers)]
            recipe = replace(method, num_bins=self.contexts[expert].bins.num_bins)
            layers_built, choices, _ = build_layers(model, recipe, targets, layer_stats(stats, [expert], targets), device,
                                                    lambda it: self.bar(it, f"quantize {expert}"))
            built[expert].update(layers_built)
            chosen[expert].update(choices)
        return {e: swap_layers(experts_of(self.pipe)[e], built[e], self.contexts[e]) for e in built}, chosen


def _progress(enabled: bool):
    def bar(iterable, desc: str):
        from tqdm.auto import tqdm
        return tqdm(iterable, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)
    return bar


def _activate(pipe, contexts: dict, fingerprint: str) -> None:
    """Point every QuantLinear at its expert's context and keep one timestep hook per expert, for
    every later call of the pipeline (replacing the hooks of an earlier artifact)."""
    from wanexp.models import install_timestep_hooks
    from wanexp.quant.api import attach_context
    models = experts_of(pipe)
    for model in models.values():
        old = getattr(model, _STATE, None)
        if old:
            old["hook"].remove()
    hooks = install_timestep_hooks(pipe, lambda expert, t: contexts[expert].set_timestep(t))
    for (name, model), hook in zip(models.items(), hooks):
        attach_context(model, contexts[name])
        setattr(model, _STATE, {"fingerprint": fingerprint, "hook": hook})


def load_quantized(pipe, path: str | os.PathLike, *, lora: Iterable[Any] | None = None):
    """``pipe`` (BF16, loaded by you) with the artifact at ``path`` swapped into its experts: no
    calibration; on CUDA the MXFP4 layers run wanexp's fused kernels. An artifact made for another base
    model (or with other LoRAs: pass the same ``lora`` it was made with) is refused. Returns ``pipe``."""
    from wanexp.models.lora import check_specs, lora_records, merge_loras
    from wanexp.quant.artifact import load_artifact, read_header
    from wanexp.stages.quantize import artifact_contexts
    header = read_header(Path(path).expanduser())
    specs = check_specs(lora)
    if specs and any(getattr(m, _STATE, None) for m in experts_of(pipe).values()):
        raise WanexpError("LoRAs merge into a BF16 pipeline; this one is already quantized")
    merge_loras(pipe, specs)
    fingerprint = base_fingerprint(pipe)
    made_with = [f"{r['file']}@{r['scale']:g}" for r in header.get("lora") or []]
    have = [f"{r['file']}@{r['scale']:g}" for m in experts_of(pipe).values() for r in lora_records(m)]
    if header.get("fingerprint") != fingerprint and made_with != have:
        raise WanexpError(f"artifact {path} was made for base model {header.get('fingerprint')} with LoRAs "
                          f"{made_with or 'none'}, but this pipeline is {fingerprint} with LoRAs {have or 'none'}; "
                          "load it on the pipeline it was made from (lora=[...] merges the same LoRAs)")
    header = load_artifact(Path(path).expanduser(), experts_of(pipe), fingerprint)
    _activate(pipe, artifact_contexts(header), fingerprint)
    return pipe
