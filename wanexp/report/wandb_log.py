"""W&B logging that never hangs and never fails a run for lack of network.

Online only when the user named a project *and* has credentials (``WANDB_API_KEY`` or a netrc
entry); otherwise offline into the run directory, to be synced later with ``wandb sync``.
``logger=none`` logs nothing. A W&B failure is reported as a warning; results on disk are kept.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from wanexp.io import flatten


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def resolve_mode(cfg: Mapping[str, Any]) -> str:
    mode = str(cfg.get("mode") or "auto")
    if mode == "auto":
        return "online" if cfg.get("project") and _has_credentials() else "offline"
    return mode


def log_run(cfg: Mapping[str, Any], run_dir: Path, config: Mapping[str, Any], summary: Mapping[str, Any],
            tables: Mapping[str, pd.DataFrame], videos: Sequence[tuple[str, Path]] = (),
            artifact: Path | Sequence[Path] | None = None, images: Mapping[str, Path] | None = None) -> str | None:
    """Log one run: flattened config (so W&B's run table and parallel coordinates can use every key),
    summary metrics, tables, a few videos (caption, mp4 path), images (key → PNG path, e.g. the
    analysis figures) and optionally the quantized artifact.
    Returns the W&B run directory (offline) or URL (online), or None."""
    if cfg.get("name", "wandb") == "none":
        return None
    try:
        import wandb
    except ImportError:
        warnings.warn("wandb is not installed; logger=wandb skipped (results are on disk)")
        return None
    mode = resolve_mode(cfg)
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        run = wandb.init(project=cfg.get("project") or "wanexp", entity=cfg.get("entity") or None,
                         group=cfg.get("group") or None, job_type=cfg.get("job_type") or None,
                         name=cfg.get("run_name") or run_dir.name, tags=list(cfg.get("tags") or []),
                         dir=str(run_dir), mode=mode, config=flatten(config), reinit="finish_previous",
                         settings=wandb.Settings(init_timeout=float(cfg.get("init_timeout", 60)),
                                                 console="off", silent=True))
        run.summary.update({k: v for k, v in flatten(summary).items() if v is not None})
        for name, df in tables.items():
            run.log({name: wandb.Table(dataframe=df.reset_index(drop=True))})
        if images:
            run.log({key: wandb.Image(str(path), caption=Path(path).stem) for key, path in images.items()})
        if videos:
            run.log({"videos": [wandb.Video(str(path), caption=caption, format="mp4") for caption, path in videos]})
        if artifact is not None:
            art = wandb.Artifact(f"quantized-{run_dir.name}", type="model",
                                 metadata={k: v for k, v in flatten(summary).items() if v is not None})
            files = [artifact] if isinstance(artifact, (str, Path)) else list(artifact)
            for f in files:  # an artifact made of parts: the entry file first, its parts by their path beside it
                art.add_file(str(f), name=Path(f).relative_to(Path(files[0]).parent).as_posix())
            run.log_artifact(art)
        where = run.url if mode == "online" else str(Path(run.dir).parent)
        run.finish()
        # wandb 0.31's finish() can return before its service has flushed the run's .wandb log (seen
        # as a 7-byte header in 1 of 4 runs); teardown waits for the service, so the offline run
        # is complete on disk when we return it, and `wandb sync` finds it whole.
        wandb.teardown()
        return where
    except Exception as err:  # never lose a finished run to a logging problem
        warnings.warn(f"W&B logging failed ({type(err).__name__}: {err}); results are on disk in {run_dir}")
        return None


def sweep_group(path: Path) -> str | None:
    """``multirun/<date>/<time>``: the W&B group of a Hydra sweep directory, or of a run inside one
    (Hydra writes multirun.yaml into the sweep directory); None outside a sweep."""
    path = Path(path).resolve()
    for d in (path, *path.parents):
        if (d / "multirun.yaml").is_file():
            return "/".join(d.parts[-3:])
    return None
