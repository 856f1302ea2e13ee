"""Which linear layers a method quantizes, and which it keeps in high precision.

Targeted: every ``nn.Linear`` inside the transformer blocks (``blocks.<i>.…``). Embeddings, the
time/text projections, modulation tables and the output head are not in ``blocks`` and stay 16-bit.
Keep selectors remove targets: block indices, and module-name patterns with ``*`` wildcards and
block ranges (``blocks.3-8.ffn.net.2``).
"""

from __future__ import annotations

import re
from typing import Iterable

from torch import nn

BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")   # a denoiser block's module: (block index, name within)


def block_index(name: str) -> int | None:
    m = BLOCK_RE.match(name)
    return int(m.group(1)) if m else None


def targeted_linears(model: nn.Module) -> list[str]:
    return [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear) and block_index(name) is not None]


def pattern_regex(pattern: str) -> re.Pattern:
    """``blocks.*.attn1.to_out.0`` / ``blocks.3-8.ffn.net.2`` → a regex over full module names."""
    parts = []
    for token in pattern.split("."):
        if token == "*":
            parts.append(r"[^.]+")
        elif re.fullmatch(r"\d+-\d+", token):
            lo, hi = map(int, token.split("-"))
            if lo > hi:
                raise ValueError(f"empty block range {token!r} in keep pattern {pattern!r}")
            parts.append("(?:" + "|".join(str(i) for i in range(lo, hi + 1)) + ")")
        else:
            parts.append(re.escape(token).replace(r"\*", ".*"))
    return re.compile(r"\.".join(parts) + r"$")


def kept(name: str, keep_blocks: Iterable[int] = (), keep_patterns: Iterable[str] = ()) -> bool:
    if block_index(name) in set(int(b) for b in keep_blocks):
        return True
    return any(pattern_regex(p).match(name) for p in keep_patterns)


def select_targets(model: nn.Module, keep_blocks: Iterable[int] = (), keep_patterns: Iterable[str] = ()) -> list[str]:
    keep_blocks, keep_patterns = list(keep_blocks), list(keep_patterns)
    return [n for n in targeted_linears(model) if not kept(n, keep_blocks, keep_patterns)]
