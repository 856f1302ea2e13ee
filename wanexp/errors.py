"""The one exception type users see as a one-line message (no traceback), and the record a failed
attempt leaves in its run directory."""

from __future__ import annotations

from pathlib import Path

ERROR_FILE = "error.json"


class WanexpError(Exception):
    """A user-facing error: bad config, missing files, corrupt artifacts.

    The entry point prints ``str(err)`` on one line and exits with status 2; everything already
    written to the run directory stays there.
    """


def record_error(run_dir: str | Path, stage: str, err: BaseException) -> None:
    """Leave ``error.json`` behind a failed stage, so a sweep's report can name the failure (what the
    finished stages wrote stays; a re-run resumes from the failed stage)."""
    import traceback

    from wanexp.io import write_json
    message = "interrupted" if isinstance(err, KeyboardInterrupt) else (str(err) or type(err).__name__)
    info = {"stage": stage, "error": message, "type": type(err).__name__}
    if not isinstance(err, (WanexpError, KeyboardInterrupt)):
        info["traceback"] = traceback.format_exc()
    try:
        write_json(Path(run_dir) / ERROR_FILE, info)
    except OSError:
        pass  # an unwritable run dir already has its own error; don't mask it
