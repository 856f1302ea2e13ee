"""The calibration statistics on disk and in use: part files, loading them back, and each layer's
statistics pooled across experts (one expert, or both for the shared policy), plus the calibration
settings that decide what is held (``quant.<key>``, else the model's scale-dependent ``model.calib``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from wanexp.calib.collect import ALL_BINS, CalibStats
from wanexp.errors import WanexpError
from wanexp.io import read_json, rebased
from wanexp.models import EXPERTS
from wanexp.quant.methods import LayerStats, QuantRecipe
from wanexp.rundir import RunDir


def calib_setting(cfg, key: str, default):
    """A calibration setting: ``quant.<key>``, else the model's scale-dependent ``model.calib.<key>``."""
    value = cfg.quant.get(key)
    if value is None:
        value = (cfg.model.get("calib") or {}).get(key, default)
    return value


def needs_of(cfg) -> list[str]:
    return QuantRecipe.needs(cfg.quant) if cfg.quant.name != "bf16" else []


def transient_hessians(cfg) -> bool:
    """True when the Hessians are used within their pass and never written (see the module docstring)."""
    return "hessian" in needs_of(cfg) and not bool(calib_setting(cfg, "store_hessians", True))


def part_path(stats_dir: Path, expert: str, k: int, n: int) -> Path:
    return stats_dir / f"stats-{expert}-part{k:03d}-of{n:03d}.safetensors"


def load_calib_stats(run_dir: Path) -> CalibStats:
    """Every part of both experts' statistics that the run's calibration recorded, merged (a missing
    part is refused, naming how many of how many are there)."""
    run_dir = Path(run_dir)
    marker = RunDir(run_dir).marker("calibrate")
    info = read_json(marker) if marker.is_file() else {}
    # a run directory that moved reads its statistics where they are now (wanexp.io.rebased)
    where = rebased(info["stats_dir"], info.get("run_dir"), run_dir) if "stats_dir" in info else RunDir(run_dir).calib
    parts = sorted(p for p in where.glob("stats-*part*-of*.safetensors") if ".rank" not in p.name)
    if not parts:
        raise WanexpError(f"no calibration statistics in {where} (run stage=calibrate first)")
    for expert in EXPERTS:
        mine = [p for p in parts if p.name.startswith(f"stats-{expert}-")]
        n = int(mine[0].stem.split("-of")[-1]) if mine else 0
        if not mine or len(mine) != n:
            raise WanexpError(f"{where} holds {len(mine)} of {n or '?'} calibration parts of {expert}; "
                              "re-run stage=calibrate")
    merged = CalibStats()
    for p in parts:
        merged.update(CalibStats.load(p))
    return merged


class LayerStatsView(Mapping):
    """``layer → LayerStats`` for the experts in ``pool`` (one expert, or both for the shared policy),
    made when a layer asks for it: the full Hessian of one layer at a time."""

    def __init__(self, stats, pool: list[str], layers: list[str]):
        self.stats, self.pool, self.layers = stats, list(pool), list(layers)

    def __getitem__(self, layer: str) -> LayerStats:
        if layer not in self.layers:
            raise KeyError(layer)
        ls = LayerStats()
        for expert in self.pool:
            h = self.stats.get(expert, layer, ALL_BINS).get("hessian")
            if h is not None:
                ls.hessian = h if ls.hessian is None else ls.hessian + h.to(ls.hessian.device)
            for b in self.stats.bins_of(expert, layer):
                d = self.stats.get(expert, layer, b)
                if "absmax" in d:
                    ls.absmax = d["absmax"] if ls.absmax is None else torch.maximum(ls.absmax, d["absmax"])
                    seen = ls.bin_absmax.get(b)  # per bin too (timestep-aware balancing)
                    ls.bin_absmax[b] = d["absmax"] if seen is None else torch.maximum(seen, d["absmax"])
                if "tokens" in d:
                    ls.tokens[b] = d["tokens"] if b not in ls.tokens else torch.cat([ls.tokens[b], d["tokens"]])
        return ls

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)


def layer_stats(stats, pool: list[str], layers: list[str]) -> Mapping[str, LayerStats]:
    """Per-layer statistics for the experts in ``pool`` (see :class:`LayerStatsView`)."""
    return LayerStatsView(stats, pool, layers)
