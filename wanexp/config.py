"""The settings of a run, checked before anything loads, and what each stage's outputs depend on.

``check_settings`` range-checks every numeric and choice setting of the composed config (a bad one
is one line naming the key, the value and what is allowed), before torch is even imported.

``stage_inputs`` says, per stage, which settings (and which samples, by content) its outputs depend
on; a stage marker records them, and ``resume_plan`` uses them to decide what a re-run in the same
directory may do: a change that no finished stage depends on is simply taken; a finished stage whose
inputs changed is redone when its outputs are rewritten whole (quantize, evaluate, report, analyze)
and refused when they are resumed piece by piece (calibrate's parts, generate's videos), where old
and new results would mix.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from wanexp.errors import WanexpError
from wanexp.io import flatten, probe_writable
from wanexp.rundir import RunDir
from wanexp.schema import EXPERTS, GROUP_SCHEMAS, Schema

_MISSING = object()


@dataclass(frozen=True)
class Rule:
    """``ok(value)`` is true for allowed values; ``allowed`` says what they are, in words."""

    ok: Callable[[Any], bool]
    allowed: str


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _interval(lo, hi, lo_open, hi_open) -> str:
    def num(x):
        return f"{x:g}" if isinstance(x, float) else str(x)
    if hi is None:
        return f"{'>' if lo_open else '>='} {num(lo)}"
    return f"in {'(' if lo_open else '['}{num(lo)}, {num(hi)}{')' if hi_open else ']'}"


def integer(lo: int | None = None, hi: int | None = None, null: bool = False, multiple: int | None = None,
            what: str = "") -> Rule:
    def ok(v):
        if v is None:
            return null
        return (_is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi)
                and (multiple is None or v % multiple == 0))
    words = "an integer" + (f" {_interval(lo, hi, False, False)}" if lo is not None else "")
    words += f", a multiple of {multiple}" if multiple else ""
    return Rule(ok, words + (", or null" if null else "") + (f" ({what})" if what else ""))


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False,
           null: bool = False, what: str = "") -> Rule:
    def ok(v):
        if v is None:
            return null
        if not _is_num(v) or v != v:
            return False
        return ((lo is None or (v > lo if lo_open else v >= lo))
                and (hi is None or (v < hi if hi_open else v <= hi)))
    words = "a number" + (f" {_interval(lo, hi, lo_open, hi_open)}" if lo is not None else "")
    return Rule(ok, words + (", or null" if null else "") + (f" ({what})" if what else ""))


def choice(*options: Any, what: str = "") -> Rule:
    return Rule(lambda v: v in options, "one of " + ", ".join("null" if o is None else str(o) for o in options)
                + (f" ({what})" if what else ""))


def boolean(null: bool = False) -> Rule:
    return Rule(lambda v: isinstance(v, bool) or (null and v is None), "true or false" + (", or null" if null else ""))


def listing(each: Rule, nonempty: bool = False, null: bool = False, scalar: bool = False, what: str = "") -> Rule:
    """A list whose every element passes ``each`` (``scalar``: or one such element alone)."""
    def ok(v):
        if v is None:
            return null
        if scalar and not isinstance(v, (list, tuple)):
            return each.ok(v)
        return isinstance(v, (list, tuple)) and (len(v) > 0 or not nonempty) and all(each.ok(x) for x in v)
    words = ("a non-empty list" if nonempty else "a list") + f", each {each.allowed}"
    words = (f"{each.allowed}, or " if scalar else "") + words
    return Rule(ok, words + (", or null" if null else "") + (f" ({what})" if what else ""))


def _device(v) -> bool:
    return isinstance(v, str) and bool(re.fullmatch(r"auto|cpu|cuda(:\d+)?", v))


def _bin_edges(v) -> bool:
    """null, timestep edges (shared policy), or per expert ``{high_noise: [...], low_noise: [...]}``."""
    def edges(xs):  # the runner sorts them; repeats would make an empty bin
        return (isinstance(xs, (list, tuple)) and all(_is_num(x) and 0 <= x <= 1000 for x in xs)
                and len(set(xs)) == len(xs))
    if v is None or edges(v):
        return True
    return isinstance(v, Mapping) and set(v) <= set(EXPERTS) and all(edges(x) for x in v.values())


# Every numeric and choice setting, by key (keys a config does not have are not checked).
SETTINGS: dict[str, Rule] = {
    "seed": integer(0),
    "device": Rule(_device, "auto, cpu, cuda or cuda:N"),
    "progress": boolean(),
    "model.dtype": choice("bf16", "bfloat16", "fp16", "float16", "fp32", "float32"),
    "model.offload": choice("none", "model"),
    "model.calib.offload": choice(None, "pipeline", "group", what="where the weights live during calibration"),
    "attention.name": choice("bf16", "fp8", "int8_sage", "fp8_cudnn"),   # wanexp.quant.attention.ATTENTION
    "attention.block": integer(1),
    "attention.smooth_k": boolean(),
    "attention.pv": choice("fp16", "fp8"),
    "model.compile": choice(False, True, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "model.vae_tiling": boolean(),
    "model.default_rank": integer(0),
    "model.generation.height": integer(16, multiple=16, what="pixels"),
    "model.generation.width": integer(16, multiple=16, what="pixels"),
    "model.generation.num_frames": Rule(lambda v: _is_int(v) and v >= 1 and (v - 1) % 4 == 0,
                                        "an integer 4k+1 >= 1, e.g. 5, 61, 81 (Wan's VAE packs 4 frames per latent)"),
    "model.generation.num_inference_steps": integer(1),
    "model.generation.guidance_scale": number(0.0),
    "model.generation.guidance_scale_2": number(0.0, null=True),
    "model.generation.max_sequence_length": integer(1, null=True),
    "model.generation.fps": integer(1),
    "model.generation.crf": integer(0, 51, what="x264 quality"),
    "data.split_seed": integer(),
    "data.image_condition": choice("reference", "blank"),
    "data.calib.num_samples": integer(0, null=True),
    "data.eval.num_samples": integer(1, null=True),
    "quant.activations": boolean(),
    "quant.smoothing": choice(None, "max", "percentile", "awq"),
    "quant.smoothing_per_bin": boolean(),
    "quant.weight_clip_search": boolean(),
    "quant.weight_clip_ratios": listing(number(0.0, 1.0, lo_open=True), nonempty=True, null=True,
                                       what="weight clip ratios: the share of a group's max |w| kept; null: AWQ's"),
    "quant.alpha": listing(number(0.0, 1.0), nonempty=True, scalar=True, what="SmoothQuant migration strength"),
    "quant.percentile": number(0.0, 100.0, lo_open=True),
    "quant.rank": integer(0, what="low-rank branch width; 0 = none"),
    "quant.residual": choice("rtn", "gptq"),
    "quant.bins": integer(1, what="timestep bins per expert"),
    "quant.bin_edges": Rule(_bin_edges, "null, distinct timesteps in [0, 1000], or {high_noise: [...], low_noise: [...]} of them"),
    "quant.calib_tokens": integer(1),
    "quant.calib_blocks_per_pass": integer(1, null=True),
    "quant.clip_search": boolean(),
    "quant.clip_candidates": listing(number(0.0, 1.0, lo_open=True), nonempty=True,
                                     what="clip ratios: the share of the block maximum kept"),
    "quant.gptq.block_size": integer(1),
    "quant.gptq.damp": number(0.0, 1.0, lo_open=True, what="fraction of the mean Hessian diagonal"),
    "quant.gptq.act_order": boolean(),
    "quant.gptq.static_groups": boolean(),
    "expert.policy": choice("per_expert", "shared"),
    "expert.keep_blocks": listing(integer(0)),
    "expert.high_noise.keep_blocks": listing(integer(0)),
    "expert.low_noise.keep_blocks": listing(integer(0)),
    "expert.max_keep_blocks": Rule(lambda v: v in (None, "auto") or (_is_int(v) and v >= 0),
                                   "auto or an integer >= 0"),
    "evaluate.metrics": listing(choice("fidelity", "vbench"), nonempty=True),
    "evaluate.vbench.chunk_size": integer(1),
    "logger.name": choice("wandb", "none"),
    "logger.mode": choice("auto", "online", "offline", "disabled"),
    "logger.init_timeout": number(0.0, lo_open=True, what="seconds"),
    "logger.videos": integer(0),
    "logger.log_artifact": boolean(),
    "report.paper_table": choice(None, "table1", "table2", "hif4"),
    "report.bootstrap.resamples": integer(1, what="bootstrap draws per interval"),
    "report.bootstrap.seed": integer(0),
    "report.bootstrap.confidence": number(0.0, 1.0, lo_open=True, hi_open=True),
    "report.bootstrap.power": number(0.0, 1.0, lo_open=True, hi_open=True),
    "analysis.auto": boolean(),
    "analysis.percentile": number(0.0, 100.0, lo_open=True),
    "analysis.trace_tokens": integer(1),
    "analysis.channel_groups": integer(1),
    "analysis.sensitivity_keep.modules": integer(0),
    "analysis.sensitivity_keep.blocks": integer(0),
    "analysis.dpi": integer(1),
    "timing.warmup_steps": integer(0, what="denoising steps of the untimed warm-up generation"),
    "timing.videos": integer(1, what="videos timed when a run made none itself"),
    "timing.bf16_twin": boolean(),
}


def _show(v) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_show(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k}: {_show(x)}" for k, x in v.items()) + "}"
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def _schema_keys(path: Sequence[str]) -> list[str] | None:
    """The keys the schema gives the node at ``path`` (None: an open node, or no such node)."""
    import dataclasses
    import typing
    node: Any = Schema
    for part in path:
        if not dataclasses.is_dataclass(node):
            return None
        node = typing.get_type_hints(node).get(part)
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else None


def schema_error(err: Exception) -> str:
    """One line for a config the schema refuses (Hydra's composition error, or OmegaConf's), naming the
    key and, for an unknown key, the nearest known one."""
    import difflib

    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException
    cause = err if isinstance(err, OmegaConfBaseException) else (err.__cause__ or err.__context__)
    head = "" if cause is err else str(err).strip().splitlines()[0].rstrip(".") + ": "
    head = re.sub(r"^(In '[^']*': )\w+ raised while composing config: $", r"\1", head)  # the yaml, not the type
    if getattr(err, "override", None):  # a command-line override that does not parse
        head = f"override {err.override!r}: {head}"
    if not isinstance(cause, OmegaConfBaseException):
        return head.rstrip(": ")
    full_key = str(getattr(cause, "full_key", "") or "")
    parent, _, key = full_key.rpartition(".")
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and key:
        known = _schema_keys(parent.split(".") if parent else [])
        near = difflib.get_close_matches(key, known or [], n=1)
        hint = f"; did you mean {'.'.join(filter(None, (parent, near[0])))}?" if near else ""
        return f"{head}{full_key} is not a setting ({parent or 'the top level'} has no key {key!r}{hint})"
    msg = (getattr(cause, "msg", None) or str(cause)).strip().splitlines()[0]
    return f"{head}{msg}" + (f" ({full_key})" if full_key and full_key not in head + msg else "")


def check_schema(cfg) -> None:
    """The composed config against the schema (``wanexp.schema``): Hydra already refuses an unknown key
    or a wrong type while composing, but not a key added with ``+key=value``."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    try:
        # as plain containers: a typed node merged whole would keep the key it was given
        OmegaConf.merge(OmegaConf.structured(Schema), OmegaConf.to_container(cfg, resolve=False))
    except OmegaConfBaseException as err:
        raise WanexpError(schema_error(err)) from None


def check_settings(cfg) -> None:
    """Refuse a key the schema does not have, then the first setting out of its range, naming key, value
    and the allowed values."""
    from omegaconf import OmegaConf
    check_schema(cfg)
    for key, rule in SETTINGS.items():
        value = OmegaConf.select(cfg, key, default=_MISSING)
        if value is _MISSING:
            continue
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        if not rule.ok(value):
            raise WanexpError(f"{key}={_show(value)} is not allowed: {key} takes {rule.allowed}")


def check_format_options(cfg) -> None:
    """The format's own options (``format.weight``/``format.act``), checked by the format itself."""
    from omegaconf import OmegaConf

    from wanexp.formats import FORMAT_NAMES, get_format
    if cfg.format.name not in FORMAT_NAMES:
        return  # named by run.validate
    for side in ("weight", "act"):
        node = cfg.format.get(side)
        opts = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node or {})
        try:
            get_format(cfg.format.name, **opts)
        except ValueError as err:
            raise WanexpError(f"format.{side}={_show(opts)} is not allowed for format.name={cfg.format.name}: "
                              f"{err}") from None


# ---------------------------------------------------------------------------------------------
# What each stage's outputs depend on
# ---------------------------------------------------------------------------------------------
STAGE_ORDER = ("calibrate", "quantize", "generate", "evaluate", "report", "analyze")
# Settings that no output depends on: where things go, how the run talks, when timing is taken.
FREE = ("stage", "progress", "device", "paths", "logger", "report", "timing", "hydra")
# Each setting belongs to the first stage whose outputs it changes (matched by key prefix, in this
# order); a later stage also depends on everything the stages before it depend on, since it reads
# their outputs. ``samples.calib`` / ``samples.eval`` are the samples read, by content (id, prompt,
# category, image bytes): not ``data.root`` or ``data.files``, which only say where they are.
# A setting no entry names (a new config group) belongs to calibrate: everything depends on it.
OWNERS: tuple[tuple[str, str], ...] = (
    ("data", "-"),                          # only through the samples it selects
    ("analysis.auto", "-"),
    ("model.generation.fps", "generate"), ("model.generation.crf", "generate"),  # the mp4 encoding only
    ("model.default_rank", "quantize"),     # enters through quant.rank
    ("model", "calibrate"), ("seed", "calibrate"), ("samples.calib", "calibrate"),
    ("expert.policy", "calibrate"),         # the shared policy bins the whole trajectory
    *((f"quant.{k}", "calibrate") for k in ("name", "load", "smoothing", "residual", "clip_search", "bins",
                                            "bin_edges", "calib_tokens", "calib_blocks_per_pass")),
    ("quant", "quantize"), ("format", "quantize"), ("expert", "quantize"),
    ("samples.eval", "generate"),
    ("evaluate", "evaluate"),
    # analysis.layers/percentile/trace_tokens say what calibration traces; a later change is not
    # re-recorded: the analyze stage names a layer it has no trace of.
    ("analysis", "analyze"),
)
# Stages whose outputs are rewritten whole when they run, so redoing them after a settings change
# is safe; the others resume piece by piece and would mix old and new results.
REDOABLE = ("quantize", "evaluate", "report", "analyze")


def _owner(key: str) -> str:
    if key.split(".")[0] in FREE:
        return "-"
    for prefix, stage in OWNERS:
        if key == prefix or key.startswith(prefix + "."):
            return stage
    return "calibrate"


def sample_identity(samples: Sequence) -> str:
    """The samples a stage reads, by content: ``N samples, sha256 …`` over ids, prompts, categories,
    the conditioning (blank or the image's bytes)."""
    h = hashlib.sha256()
    for s in samples:
        if s.extra.get("blank_image"):
            image = "blank"
        else:
            try:
                image = hashlib.sha256(s.image_path.read_bytes()).hexdigest()
            except OSError as err:
                raise WanexpError(f"sample {s.id}: cannot read its image {s.image_path} ({err.strerror})") from err
        h.update(repr((s.id, s.prompt, s.category, image)).encode())
    return f"{len(samples)} samples, sha256 {h.hexdigest()[:16]}"


def stage_inputs(config: Mapping[str, Any], samples: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Per stage, the flattened settings (and sample identities) its outputs depend on."""
    flat = flatten(dict(config, **({"samples": dict(samples)} if samples else {})))
    own: dict[str, dict[str, Any]] = {s: {} for s in STAGE_ORDER}
    for key, value in flat.items():
        stage = _owner(key)
        if stage != "-":
            own[stage][key] = value
    out, acc = {}, {}
    for stage in STAGE_ORDER:
        acc = {**acc, **own[stage]}
        out[stage] = dict(acc)
    return out


@dataclass
class ResumePlan:
    redo: list[str]                 # finished stages to run again (their inputs changed)
    notes: list[str]                # what changed, per redone stage (to print)


def changed_keys(before: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    return sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))


# Keys an earlier version wrote into the quant group that nothing read (removed with the schema: conf/quant no
# longer has them, and the schema refuses them); run directories of that version still record them.
DEAD_KEYS = ("quant.weights", "quant.needs")


def _schema_defaults() -> dict[str, Any]:
    """The defaults the schema gives a group's keys (``wanexp.schema``: the quant group's, and the model
    keys only some models have), flattened as recorded settings are."""
    import json

    from omegaconf import OmegaConf
    groups = {group: OmegaConf.to_container(OmegaConf.structured(node)) for group, node in GROUP_SCHEMAS.items()}
    flat = flatten(json.loads(json.dumps(groups)))
    return {k: v for k, v in flat.items() if v != "???"}  # MISSING: a yaml gives it, no default


def migrate_settings(recorded: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, Any]:
    """Flattened settings an older version recorded, in today's terms, to compare with ``now``: its dead
    keys dropped, and a key its config did not have (the schema gives every method every quant key now)
    read as the schema's default, which is what the older version used in its place."""
    defaults = _schema_defaults()
    out = {k: v for k, v in recorded.items() if k not in DEAD_KEYS}
    groups = {k.split(".")[0] for k in out}  # only for groups the record has at all
    out.update({k: defaults[k] for k in now if k in defaults and k not in out and k.split(".")[0] in groups})
    return out


def resume_plan(finished: Mapping[str, dict], inputs: Mapping[str, dict], wanted: Sequence[str],
                run_dir, explicit: bool) -> ResumePlan:
    """What a re-run in ``run_dir`` does with its finished stages (``finished``: stage → its marker).

    Refused (WanexpError naming the key, both values and the stage): a finished stage that resumes
    piece by piece (or, with ``stage=<name>``, any stage before it) whose inputs changed."""
    redo, notes = [], []
    first = STAGE_ORDER.index(wanted[0]) if explicit else len(STAGE_ORDER)
    for stage, marker in finished.items():
        recorded = marker.get("inputs")
        if recorded is None or stage not in inputs:  # a marker from before inputs were recorded
            continue
        recorded = migrate_settings(recorded, inputs[stage])
        diff = changed_keys(recorded, inputs[stage])
        if not diff:
            continue
        skipped = "skipped" in marker  # it wrote nothing: nothing can mix
        key = diff[0]
        what = (f"{key}={_show(recorded.get(key, '(unset)'))} when {stage} finished, now {_show(inputs[stage].get(key, '(unset)'))}"
                + (f" (and {len(diff) - 1} more: {', '.join(diff[1:4])}{' …' if len(diff) > 4 else ''})" if len(diff) > 1 else ""))
        upstream = STAGE_ORDER.index(stage) < first
        if not skipped and (stage not in REDOABLE or (explicit and upstream)):
            why = ("its outputs would mix with new ones" if stage not in REDOABLE
                   else f"stage={wanted[0]} would read its outdated outputs")
            raise WanexpError(f"{run_dir}: {what}; {stage} cannot be redone in place ({why}): go back to the old "
                              f"value, or start a new run directory")
        if stage in wanted or not explicit:
            redo.append(stage)
            notes.append(f"{stage}: redone, {what}")
    return ResumePlan(redo=redo, notes=notes)


# ---------------------------------------------------------------------------------------------
# Before the first stage
# ---------------------------------------------------------------------------------------------
def check_writable(cfg, run_dir: Path) -> None:
    """Every directory this run writes, probed by writing (as root ``os.access`` says yes to ``/proc``):
    the run directory, the shared caches, and the cache the tiny model is built into (unless built)."""
    from omegaconf import OmegaConf
    probe_writable(run_dir, "run directory", "set hydra.run.dir, paths.output_root or WANEXP_OUTPUT_ROOT")
    run_dir.mkdir(parents=True, exist_ok=True)
    for key, what in (("paths.reference_cache", "reference video cache"), ("paths.calib_cache", "calibration cache")):
        where = OmegaConf.select(cfg, key)
        if where:
            probe_writable(Path(str(where)), what, f"set {key} (or paths.output_root) to a writable place")
    if cfg.model.name in ("tiny", "tiny_random") or cfg.data.name == "tiny":  # a read-only cache holding them is fine
        cache = Path(str(cfg.paths.cache_dir)).expanduser()
        built = any(cache.glob("wan22-i2v-tiny-*/model_index.json")) and any(cache.glob("opens2v-eval-tiny-*/.complete"))
        if not built:
            probe_writable(cache, "cache directory (the tiny model is built there)", "set paths.cache_dir or WANEXP_CACHE")


_LEGACY_FREE = ("stage", "logger", "progress", "device", "paths", "report", "analysis", "evaluate", "timing")


def check_legacy_config(config: Mapping[str, Any], run_dir: Path, finished: Mapping[str, dict]) -> None:
    """A run directory whose stage markers predate recorded inputs: the old whole-config rule."""
    import json
    path = RunDir(run_dir).config
    if not path.is_file() or all("inputs" in m for m in finished.values()):
        return
    before = {k: v for k, v in json.loads(path.read_text()).items() if k not in _LEGACY_FREE}
    now = {k: v for k, v in json.loads(json.dumps(config, default=str)).items() if k not in _LEGACY_FREE}
    now = flatten(now)
    diff = changed_keys(migrate_settings(flatten(before), now), now)
    if diff:
        raise WanexpError(f"{run_dir} holds a run with a different configuration ({', '.join(diff[:6])}"
                          f"{' …' if len(diff) > 6 else ''} differ); use a new run directory")
