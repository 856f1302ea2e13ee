"""``model.compile``: every denoiser block of both experts ``torch.compile``d, as a diffusers user
would run the model, for generation (BF16 and W4A4 alike).

The fused W4A4 kernels are one custom op (``wanexp::mxfp4_w4a4``, :mod:`wanexp.kernels`), so the
compiled block graph keeps them whole; the timestep bin reaches them as data, so one graph serves
every bin. The weight-row caches the FP8 path needs are filled first (``kernels.prepare``).
"""

from __future__ import annotations

from wanexp import kernels
from wanexp.models.experts import experts


def compile_denoisers(pipe, mode: str | None = None, backend: str = "inductor") -> int:
    """Compile each block of both experts in place (idempotent); returns how many blocks are compiled.
    ``mode`` and ``backend`` are torch.compile's (None = its default mode; the tests use backend
    "aot_eager", which traces the same graphs without generating code)."""
    count = 0
    for model in experts(pipe).values():
        kernels.prepare(model)
        for block in model.blocks:
            if getattr(block, "_compiled_call_impl", None) is None:
                block.compile(mode=mode, backend=backend)
                kernels.block_checked(block)   # the FP8 fold's bound checked once a block, not a layer
            count += 1
    return count


def compile_setting(value) -> str | None:
    """``model.compile`` as torch.compile's mode: false/None -> None (eager), true -> "default"."""
    if value in (None, False, "false", "none"):
        return None
    return "default" if value is True or value == "true" else str(value)


__all__ = ["compile_denoisers", "compile_setting"]
