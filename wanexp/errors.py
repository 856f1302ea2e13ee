"""The one exception type users see as a one-line message (no traceback). The record a failed
attempt leaves in its run directory is :meth:`wanexp.rundir.RunDir.record_error`."""

from __future__ import annotations


class WanexpError(Exception):
    """A user-facing error: bad config, missing files, corrupt artifacts.

    The entry point prints ``str(err)`` on one line and exits with status 2; everything already
    written to the run directory stays there.
    """
