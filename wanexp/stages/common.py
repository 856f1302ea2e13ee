"""Settings more than one stage reads."""

from __future__ import annotations

from omegaconf import OmegaConf


def generation_cfg(cfg) -> dict:
    """``model.generation``, plus ``freeze_condition_latent`` when the method turns it on (the paper
    code's inference); it applies to the run's BF16 twin too, so both sides are generated alike."""
    gen = OmegaConf.to_container(cfg.model.generation, resolve=True)
    if cfg.quant.get("freeze_condition_latent"):
        gen["freeze_condition_latent"] = True
    if cfg.model.get("compile") not in (None, False):  # compiled blocks round differently: their own videos
        gen["compile"] = str(cfg.model.compile)
    return gen


def calib_generation_cfg(cfg) -> dict:
    """The generation setting of the calibration trajectories: ``model.generation`` with the method's
    ``quant.calib_generation`` overrides (the paper code: 480×832, no CFG)."""
    return {**OmegaConf.to_container(cfg.model.generation, resolve=True),
            **OmegaConf.to_container(cfg.quant.get("calib_generation") or OmegaConf.create({}), resolve=True)}
