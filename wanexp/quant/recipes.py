"""The registry of quantization methods: every ``quant.name`` the runner accepts, in the order the
tables list them (the seed paper's Table I ladder first, then the HiFloat4 paper's, then the field's).

A method is a set of parameters of the steps :class:`wanexp.quant.methods.QuantRecipe` composes
(smoothing, low-rank branch, RTN or GPTQ residual, clip search, weight clipping) in a
``conf/quant/<name>.yaml`` (its keys and defaults: :class:`wanexp.schema.QuantSchema`); this list is
the only other place a method is named. The recipe is frozen, pure parameters:
``recipe.build(name, linear, stats) -> (QuantLinear, choices)``, and
``wanexp.quant.api.quantize_(model, recipe, names, stats=...)`` returns the choices per layer. The
registry stays free of torch (the report's tables read it) and so names methods only. Adding a method
that composes existing steps is that yaml file plus one :func:`method` line below (README "Adding a
method"); variants of one method (``conf/quant/rtn_paper_code.yaml``: ``name: rtn`` with another
recipe) need no line.
"""

from __future__ import annotations

from dataclasses import dataclass

from wanexp.errors import WanexpError


@dataclass(frozen=True)
class Method:
    name: str
    summary: str


REGISTRY: dict[str, Method] = {}


def method(name: str, summary: str) -> Method:
    """Register a method under ``name`` (its ``conf/quant`` yaml's ``name:``); the table order is the
    order of registration."""
    if name in REGISTRY:
        raise ValueError(f"method {name!r} is registered twice")
    REGISTRY[name] = Method(name, summary)
    return REGISTRY[name]


method("bf16", "no quantization: the reference every method is compared with")
method("w4a16", "4-bit weights by round-to-nearest, 16-bit activations")
method("rtn", "W4A4 round-to-nearest")
method("svdquant_rtn", "SVDQuant: smoothing and a 16-bit low-rank branch, RTN residual")
method("svdquant_gptq", "SVDQuant with a GPTQ residual")
method("tsclip", "the seed paper's: SVDQuant + GPTQ + timestep-bin-wise activation clipping")
method("tsclip_keep_sensitive", "TS-clip keeping the sensitive modules in BF16 (the seed paper's Ours†)")
method("hif4_conservative", "the HiFloat4 paper's baseline: SmoothQuant balancing with the per-channel max")
method("hif4_tailaware", "the HiFloat4 paper: balancing with a high percentile of |x| (tail-aware)")
method("smoothquant", "SmoothQuant (INT8 W8A8)")
method("fp8_dynamic", "FP8 W8A8: E4M3 weights per output channel, activations scaled per token")
method("awq", "AWQ: activation-aware scaling and weight clipping (INT4 W4A16)")
method("viditq", "ViDiT-Q-style timestep-aware channel balancing: one smoothing per timestep bin")


def method_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def check_method(name: str) -> Method:
    """The registered method ``name``, or one error naming every registered one."""
    if name not in REGISTRY:
        raise WanexpError(f"quant={name} is not implemented; available: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def table_rank(name: str) -> int:
    """A method's place in the tables (unregistered names last)."""
    names = method_names()
    return names.index(name) if name in names else len(names)
