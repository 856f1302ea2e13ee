"""wanexp: W4A4 post-training quantization experiments for Wan2.2-I2V-A14B.

``python -m wanexp`` runs experiments; the names below are the Python API (``wanexp.api``), imported
on first use so that ``import wanexp`` stays light.
"""

from wanexp.version import __version__  # noqa: F401


def _register_resolvers() -> None:
    """``${wanexp_sweep:}`` (``hydra.sweep.dir``): registered on import, so that the worker processes
    of a launcher (submitit), which resolve their job's directory themselves, know it too."""
    from omegaconf import OmegaConf

    def sweep(*_):
        from wanexp.hydra_callbacks import sweep_name
        return sweep_name()
    if not OmegaConf.has_resolver("wanexp_sweep"):
        # cached: every job of a sweep (pickled configs included) sees the value the launching process computed
        OmegaConf.register_new_resolver("wanexp_sweep", sweep, use_cache=True)


_register_resolvers()


def _register_schema() -> None:
    """The config schema (``wanexp.schema``) in Hydra's ConfigStore, before Hydra composes ``conf/``."""
    from wanexp.schema import register
    register()


_register_schema()


_API = ("recipe", "recipes", "Recipe", "calibrate_and_quantize", "load_quantized", "Quantized", "tiny_checkpoint")
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        from wanexp import api
        return getattr(api, name)
    raise AttributeError(f"module 'wanexp' has no attribute {name!r}")
