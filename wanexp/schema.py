"""The schema of a run's config: dataclasses registered in Hydra's ConfigStore.

``conf/config.yaml`` lists ``wanexp_schema`` first in its defaults, so Hydra composes every yaml and
every override onto these types: a key the schema does not have (``quant.rnak=8``,
``+quant.rnak=8``, a typo in a yaml) or a value of the wrong type (``quant.rank=abc``) is refused
while the config is composed, before anything runs. Ranges and choices are checked after composing
(``wanexp.config.check_settings``); the method names come from the registry
(``wanexp.quant.recipes``).

The defaults of the quant group live here, once: a ``conf/quant/*.yaml`` names only what its method
sets, and every other key takes the default below (``--cfg job`` shows them all). The other groups
keep their values in their yaml files; their schema only names the keys (``MISSING``: a yaml must
give it; null for the keys only some options have) or leaves the group open (``Any``: attention,
evaluate, logger, report, analysis, paths) where its options differ in shape.

Registering imports only omegaconf and hydra: ``import wanexp`` does it (see ``wanexp/__init__.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

SCHEMA_NAME = "wanexp_schema"
EXPERTS = ("high_noise", "low_noise")   # Wan2.2's two denoisers, as configs, records and artifacts name them

# The calibration defaults that several readers share (the calibration key, the collectors, the
# analysis traces): one home each.
CALIB_TOKENS = 256          # token sample kept per (expert, layer, bin)
PERCENTILE = 99.9           # the tail-aware smoothing statistic and the analysis traces' percentile
CLIP_CANDIDATES = (0.6, 0.7, 0.8, 0.9, 1.0)   # TS-clip's ratios (the seed paper's five)


@dataclass
class GPTQSchema:
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False
    static_groups: bool = False   # true: every block's scales from the original residual, up front (the paper code)


@dataclass
class QuantSchema:
    """``conf/quant/*.yaml``: one method and its recipe (wanexp.quant.methods reads them)."""

    name: str = MISSING
    recipe: Optional[str] = None                 # paper_code: a row of the seed paper code's recipe
    activations: bool = True                     # false: weight-only (activations stay 16-bit)
    load: Optional[str] = None                   # an existing artifact to reuse (no calibration)
    # smoothing: s from an activation statistic and the weight
    smoothing: Optional[str] = None              # null | max | percentile | awq
    smoothing_per_bin: bool = False              # one smoothing vector (and weight) per timestep bin (ViDiT-Q)
    alpha: Any = 0.5                             # one value, or a list searched per layer
    percentile: float = PERCENTILE
    # low-rank branch and residual
    rank: int = 0
    residual: str = "rtn"                        # rtn | gptq
    gptq: GPTQSchema = field(default_factory=GPTQSchema)
    hessian_input: str = "smoothed"              # smoothed | smoothed_act_quant (the paper code)
    # TS-clip
    clip_search: bool = False
    clip_candidates: List[float] = field(default_factory=lambda: list(CLIP_CANDIDATES))
    exp_shifts: List[int] = field(default_factory=lambda: [0])
    clip_search_data: str = "calib_tokens"       # calib_tokens | w4a4_generation (the paper code)
    clip_metric: str = "bf16_output"             # bf16_output | wq_output_rel (the paper code)
    clip_exclude: List[str] = field(default_factory=list)
    search_samples: int = 1                      # w4a4_generation: calibration samples generated
    search_rows: int = 4096                      # w4a4_generation: input rows per layer call
    search_generation: Dict[str, Any] = field(default_factory=dict)   # overrides of model.generation
    # AWQ's weight clipping
    weight_clip_search: bool = False
    weight_clip_ratios: Optional[List[float]] = None   # null: AWQ's (wanexp.quant.awq.AWQ_RATIOS)
    weight_clip_exclude: List[str] = field(default_factory=list)
    # timestep bins
    bins: int = 1
    bin_rule: str = "equal_width"                # equal_width | step_fraction (the paper code)
    bin_fractions: Optional[Dict[str, List[float]]] = None
    bin_edges: Any = None                        # null, edges, or {high_noise: [...], low_noise: [...]}
    # calibration
    calib_tokens: int = CALIB_TOKENS
    calib_blocks_per_pass: Optional[int] = None  # null: every block in one pass
    calib_generation: Dict[str, Any] = field(default_factory=dict)    # overrides of model.generation
    # null: the model's scale-dependent model.calib.<key> (wanexp.calib.store.calib_setting)
    store_hessians: Optional[bool] = None
    hessian_token_stride: Optional[int] = None
    share_inputs: Optional[bool] = None
    lowrank_solver: Optional[str] = None
    keep_modules: List[str] = field(default_factory=list)   # module patterns this method keeps in BF16
    freeze_condition_latent: bool = False        # the paper code: latent frame 0 reset after the last step


@dataclass
class GenerationSchema:
    """``model.generation``: every model yaml gives each key (the pipeline call's settings)."""

    height: int = MISSING
    width: int = MISSING
    num_frames: int = MISSING
    num_inference_steps: int = MISSING
    guidance_scale: float = MISSING
    guidance_scale_2: Optional[float] = MISSING
    negative_prompt: str = MISSING
    max_sequence_length: Optional[int] = MISSING
    fps: int = MISSING
    crf: int = MISSING


@dataclass
class ModelCalibSchema:
    """``model.calib``: the calibration settings that depend on the model's scale (``quant.<key>`` overrides)."""

    store_hessians: bool = MISSING
    hessian_token_stride: int = MISSING
    share_inputs: bool = MISSING
    lowrank_solver: str = MISSING
    offload: Optional[str] = None  # during calibration: pipeline (as model.offload) | group (wanexp.models.offload)


@dataclass
class ModelSchema:
    """``conf/model/*.yaml``; the keys only some models have default to null (not used by the others)."""

    name: str = MISSING
    dtype: str = MISSING
    default_rank: int = MISSING
    offload: str = MISSING
    compile: Any = MISSING                       # false, true or a torch.compile mode
    lora: List[str] = MISSING
    calib: ModelCalibSchema = MISSING
    generation: GenerationSchema = MISSING
    path: Optional[str] = None                   # a local diffusers checkpoint (wan22_i2v_a14b)
    path_env: Optional[str] = None               # the variable that names it when path is null
    vae_tiling: bool = False                     # decode in spatial tiles (the 720p models set it)
    seed: Optional[int] = None                   # a14b_random: its weights' seed, blocks and encoder layers
    num_layers: Optional[int] = None
    text_encoder_layers: Optional[int] = None


@dataclass
class CalibSplitSchema:
    num_samples: Optional[int] = MISSING
    ids: Optional[List[str]] = MISSING
    prompts_file: Optional[str] = MISSING
    overlap_eval: bool = MISSING


@dataclass
class EvalSplitSchema:
    num_samples: Optional[int] = MISSING
    ids: Optional[List[str]] = MISSING


@dataclass
class PaperSplitSchema:
    calib_samples: int = MISSING
    calib_prompts: int = MISSING


@dataclass
class DataSchema:
    """``conf/data/*.yaml``: every data yaml gives each key."""

    name: str = MISSING
    root: Optional[str] = MISSING
    files: Optional[List[str]] = MISSING
    on_conflict: str = MISSING
    split_seed: int = MISSING
    image_condition: str = MISSING
    calib: CalibSplitSchema = MISSING
    eval: EvalSplitSchema = MISSING
    paper: PaperSplitSchema = MISSING


@dataclass
class FormatSchema:
    name: str = MISSING
    weight: Dict[str, Any] = field(default_factory=dict)   # the format's own options, checked by the format
    act: Dict[str, Any] = field(default_factory=dict)


@dataclass
class KeepSchema:
    keep_blocks: List[int] = field(default_factory=list)
    keep_modules: List[str] = field(default_factory=list)


@dataclass
class ExpertSchema:
    policy: str = MISSING
    keep_blocks: List[int] = MISSING
    keep_modules: List[str] = MISSING
    max_keep_blocks: Any = MISSING               # auto or an int
    high_noise: KeepSchema = field(default_factory=KeepSchema)
    low_noise: KeepSchema = field(default_factory=KeepSchema)


@dataclass
class TimingSchema:
    warmup_steps: int = MISSING
    videos: int = MISSING
    bf16_twin: bool = MISSING


@dataclass
class Schema:
    """The top level: every key a composed config may have (the groups' own keys by their schemas)."""

    model: ModelSchema = MISSING
    data: DataSchema = MISSING
    format: FormatSchema = MISSING
    quant: QuantSchema = MISSING
    expert: ExpertSchema = MISSING
    attention: Any = MISSING
    evaluate: Any = MISSING
    logger: Any = MISSING
    stage: str = MISSING
    seed: int = MISSING
    device: str = MISSING
    progress: bool = MISSING
    timing: TimingSchema = MISSING
    report: Any = MISSING
    analysis: Any = MISSING
    paths: Any = MISSING
    # +experiment=paper_table1 (its ladder of recipes)
    recipe: Optional[str] = None
    paper_table1: Any = None


# The groups whose schema gives defaults (read as such in a record an older version wrote: wanexp.config).
GROUP_SCHEMAS = {"quant": QuantSchema, "model": ModelSchema, "data": DataSchema, "format": FormatSchema,
                 "expert": ExpertSchema, "timing": TimingSchema}


def register() -> None:
    """Store the schema in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore
    ConfigStore.instance().store(name=SCHEMA_NAME, node=Schema)
