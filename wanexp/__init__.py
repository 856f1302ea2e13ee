"""wanexp: W4A4 post-training quantization experiments for Wan2.2-I2V-A14B.

``python -m wanexp`` runs experiments; the names below are the Python API (``wanexp.api``), imported
on first use so that ``import wanexp`` stays light.
"""

__version__ = "0.1.0"

_API = ("recipe", "recipes", "Recipe", "calibrate_and_quantize", "load_quantized", "Quantized", "tiny_checkpoint")
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        from wanexp import api
        return getattr(api, name)
    raise AttributeError(f"module 'wanexp' has no attribute {name!r}")
