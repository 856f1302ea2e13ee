"""What a run prints: one line per event, the same lines in the run's ``wanexp.log``.

Lines go through the ``wanexp`` logger; ``conf/hydra/job_logging/wanexp.yaml`` sends INFO to stdout
and WARNING and above to stderr, both as the bare message, and everything to ``wanexp.log`` in the
run directory with a timestamp in front. Outside Hydra (a library call) they are printed.

Progress bars are tqdm's on a terminal; when stderr is not a terminal (CI logs, ``nohup``, a pipe)
a bar would write a carriage-return line per update, so a plain line is printed instead at the
start, at most every ``PLAIN_EVERY_S`` seconds, and at the end.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

log = logging.getLogger("wanexp")
PLAIN_EVERY_S = 30.0


class BelowWarning(logging.Filter):
    """For the stdout handler: WARNING and above go to stderr instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


def _configured() -> bool:
    return log.hasHandlers()


def say(message: str) -> None:
    """A line of what the run is doing (stdout and wanexp.log)."""
    if _configured():
        for line in message.splitlines() or [""]:
            log.info(line)
    else:
        print(message, flush=True)


def shout(message: str) -> None:
    """A line that must be seen: an error, the resume command (stderr and wanexp.log)."""
    if _configured():
        log.warning(message)
    else:
        print(message, file=sys.stderr, flush=True)


def append_log(path: Path, message: str) -> None:
    """Also keep ``message`` in a log file of our own (the sweep directory's, written after the jobs)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with open(path, "a") as f:
        f.writelines(f"[{stamp}] {line}\n" for line in message.splitlines())


def progress(iterable: Iterable, desc: str, enabled: bool = True) -> Iterable:
    if not enabled:
        return iterable
    if sys.stderr.isatty():
        from tqdm.auto import tqdm
        return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)
    return _plain_progress(iterable, desc)


def _plain_progress(iterable: Iterable, desc: str) -> Iterator:
    items = list(iterable)
    total, start, last = len(items), time.monotonic(), 0.0
    print(f"  {desc}: 0/{total}", file=sys.stderr, flush=True)
    for k, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if k == total or now - last >= PLAIN_EVERY_S:
            print(f"  {desc}: {k}/{total} ({now - start:.0f} s)", file=sys.stderr, flush=True)
            last = now


# ---------------------------------------------------------------------------------------------
# What a stage wrote
# ---------------------------------------------------------------------------------------------
_UNLISTED = {"wanexp.log", ".hydra", "claims", "stages", "model.json"}  # bookkeeping, rewritten by every stage


def snapshot(dirs: Sequence[Path]) -> dict[Path, tuple[int, int]]:
    """(mtime, size) of every file under ``dirs`` (the run directory and the caches a stage writes)."""
    seen: dict[Path, tuple[int, int]] = {}
    for root in dirs:
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in _UNLISTED]
            for name in filenames:
                if name in _UNLISTED or name.startswith("."):
                    continue
                p = Path(dirpath) / name
                try:
                    st = p.stat()
                except OSError:
                    continue
                seen[p] = (st.st_mtime_ns, st.st_size)
    return seen


def written(before: Mapping[Path, tuple[int, int]], after: Mapping[Path, tuple[int, int]],
            run_dir: Path) -> str:
    """``videos/ (2 files), generate.json; in /cache/ref/abc: videos/ (2 files), …`` for new or changed files."""
    changed = [p for p, st in after.items() if before.get(p) != st]
    if not changed:
        return "nothing new"
    groups: dict[Path, dict[str, int]] = {}
    for p in changed:
        base = run_dir if run_dir in p.parents else _cache_root(p)
        rel = p.relative_to(base)
        head = rel.parts[0] + ("/" if len(rel.parts) > 1 else "")
        groups.setdefault(base, {})
        groups[base][head] = groups[base].get(head, 0) + 1
    parts = []
    for base, heads in sorted(groups.items(), key=lambda kv: kv[0] != run_dir):
        items = ", ".join(f"{h} ({n} files)" if h.endswith("/") and n > 1 else h for h, n in sorted(heads.items()))
        parts.append(items if base == run_dir else f"in {base}: {items}")
    return "; ".join(parts)


def _cache_root(p: Path) -> Path:
    """The content-addressed directory a cache file sits in (``<cache>/<key>/…``): the one holding
    a manifest or a key file, else the file's own directory."""
    for d in p.parents:
        if (d / "manifest.jsonl").is_file() or (d / "key.json").is_file():
            return d
    return p.parent


# ---------------------------------------------------------------------------------------------
# The command that resumes
# ---------------------------------------------------------------------------------------------
def program() -> str:
    """How this process was started: ``python -m wanexp`` or the ``wanexp`` console script."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("wanexp")
    return "python -m wanexp" if argv0.name in ("__main__.py", "-m", "-c") else shlex.quote(argv0.name)


def resume_command(run_dir: Path | None = None, argv: Sequence[str] | None = None) -> str:
    """The command line of this process again; for a single run, pinned to its run directory (a
    sweep's directory is already a function of its overrides)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if run_dir is not None:
        args = [a for a in args if not a.startswith(("hydra.run.dir=", "++hydra.run.dir=", "+hydra.run.dir="))]
        args.append(f"hydra.run.dir={Path(run_dir).resolve()}")
    return " ".join([program(), *(shlex.quote(a) for a in args)])
