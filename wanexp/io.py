"""Atomic file writes and small JSON helpers shared by every stage.

Every file a stage produces is written to a temporary sibling and renamed into place, so a crash
never leaves a half-written file that a resumed run would mistake for finished work. The file then
gets the mode an ordinary ``open(path, "w")`` would give it (0666 less the umask): the temporary
file's private 0600 must not leak onto results that colleagues on a shared filesystem read.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

from wanexp.errors import WanexpError


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but no thread writes here)
    os.umask(mask)
    return mask


def _follow_umask(path: Path, directory: bool = False) -> None:
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _follow_umask(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A fresh directory under ``parent`` to build into and rename into place, with the mode of an
    ordinary ``mkdir`` (``tempfile.mkdtemp`` alone gives 0700)."""
    path = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    _follow_umask(path, directory=True)
    return path


def probe_writable(path: str | os.PathLike, what: str, hint: str = "") -> None:
    """Refuse a directory this run cannot write, by really creating (and removing) a directory in
    its deepest existing ancestor: ``os.access`` answers yes for root even on ``/proc``."""
    path = Path(path).expanduser().absolute()
    base = path
    while not base.exists() and base.parent != base:
        base = base.parent
    why = None
    if not base.is_dir():
        why = f"{base} is a file, not a directory"
    else:
        try:
            os.rmdir(tempfile.mkdtemp(dir=base, prefix=".wanexp-write-probe-"))
        except OSError as err:
            why = f"{base} is not writable ({err.strerror or type(err).__name__})"
    if why:
        raise WanexpError(f"cannot write the {what} {path}: {why}" + (f"; {hint}" if hint else ""))


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one line; a line is written with a single ``write`` so readers never see half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file, ignoring a torn last line left by a crash mid-append."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def rebased(path: str | os.PathLike, recorded_run_dir: str | os.PathLike | None, run_dir: str | os.PathLike) -> Path:
    """A path a run recorded (absolute), read from where its run directory is now.

    When the run directory has moved, a path inside it is rebased onto the new location, and a
    path beside it (the output root's shared caches) is looked for at the same place relative to
    the new location when it is gone from the recorded one (the whole output tree moved)."""
    path, run_dir = Path(path), Path(run_dir).resolve()
    if recorded_run_dir is None or Path(recorded_run_dir) == run_dir:
        return path
    old = Path(recorded_run_dir)
    inside = path == old or old in path.parents
    if not inside and path.exists():
        return path
    moved = Path(os.path.normpath(run_dir / os.path.relpath(path, old)))
    return moved if inside or moved.exists() else path


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``; values that are not scalars become strings."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out
