"""RunDir: every path inside one run directory, named here and nowhere else.

The stages write these files, the reports and the analysis read them; a file's name is spelled once,
here, so a reader and its writer cannot drift apart. Paths are relative to the directory the run is
in *now* (a moved or copied run directory reads its own files).
"""

from __future__ import annotations

import traceback
from pathlib import Path

from wanexp.errors import WanexpError
from wanexp.io import write_json

CONFIG_FILE = "wanexp_config.json"   # written when a run starts: marks a run directory
RESULTS_CSV = "results.csv"
RESULTS_PARQUET = "results.parquet"
ERROR_FILE = "error.json"            # a failed attempt's stage and message, until an attempt succeeds
ARTIFACT = Path("artifact") / "quantized.safetensors"
PER_SAMPLE = Path("eval") / "per_sample.csv"
FIDELITY_FILE = Path("eval") / "fidelity.jsonl"
VBENCH_FILE = Path("eval") / "vbench.jsonl"   # evaluate=vbench: one line per video
ANALYSIS_DIR = "analysis"
REPORT_HTML = "report.html"
VERSIONS_FILE = "versions.json"


class RunDir:
    """The files of one run directory. Each attribute is a :class:`~pathlib.Path` under ``root``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __fspath__(self) -> str:
        return str(self.root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # -- what a run started with ----------------------------------------------------------------
    @property
    def config(self) -> Path:
        """The resolved configuration of the latest attempt (reports read method and format)."""
        return self.root / CONFIG_FILE

    @property
    def model(self) -> Path:
        """The base model's fingerprint the run was started with (another model is refused)."""
        return self.root / "model.json"

    @property
    def hydra_config(self) -> Path:
        return self.root / ".hydra" / "config.yaml"

    @property
    def hydra_overrides(self) -> Path:
        return self.root / ".hydra" / "overrides.yaml"

    @property
    def log(self) -> Path:
        return self.root / "wanexp.log"

    # -- stage bookkeeping -----------------------------------------------------------------------
    @property
    def stages(self) -> Path:
        return self.root / "stages"

    def marker(self, stage: str) -> Path:
        """``stages/<stage>.json``: written once the stage's outputs are on disk."""
        return self.stages / f"{stage}.json"

    def finished_stages(self) -> list[str]:
        return sorted(p.stem for p in self.stages.glob("*.json")) if self.stages.is_dir() else []

    @property
    def error(self) -> Path:
        return self.root / ERROR_FILE

    def record_error(self, stage: str, err: BaseException) -> None:
        """Leave ``error.json`` behind a failed stage, so a sweep's report can name the failure (what the
        finished stages wrote stays; a re-run resumes from the failed stage)."""
        message = "interrupted" if isinstance(err, KeyboardInterrupt) else (str(err) or type(err).__name__)
        info = {"stage": stage, "error": message, "type": type(err).__name__}
        if not isinstance(err, (WanexpError, KeyboardInterrupt)):
            info["traceback"] = traceback.format_exc()
        try:
            write_json(self.error, info)
        except OSError:
            pass  # an unwritable run dir already has its own error; don't mask it

    # -- calibrate, quantize -----------------------------------------------------------------------
    @property
    def calib(self) -> Path:
        """Statistics parts kept in the run directory (the calibration cache is elsewhere)."""
        return self.root / "calib"

    @property
    def artifact(self) -> Path:
        return self.root / ARTIFACT

    @property
    def artifact_parts(self) -> Path:
        """GPTQ layers built during calibration (transient Hessians), one file per pass."""
        return self.root / "artifact" / "parts"

    def artifact_part(self, expert: str, k: int, n: int) -> Path:
        return self.artifact_parts / f"{expert}-part{k:03d}-of{n:03d}.safetensors"

    @property
    def choices(self) -> Path:
        """Per expert and layer, what the method chose (clip ratios, kept modules …)."""
        return self.root / "artifact" / "choices.json"

    @property
    def layer_seconds(self) -> Path:
        """Expert → layer → seconds its build took."""
        return self.root / "artifact" / "layer_seconds.json"

    # -- generate ----------------------------------------------------------------------------------
    @property
    def generated(self) -> Path:
        """``generate.json``: where the videos are, timing and memory."""
        return self.root / "generate.json"

    def layer_calls(self, rank: int | str) -> Path:
        """Which path the quantized layers took while one rank generated (fused kernels or torch)."""
        return self.root / f"layer_calls.rank{rank}.json"

    # -- evaluate, report, analyze ---------------------------------------------------------------------
    @property
    def fidelity(self) -> Path:
        return self.root / FIDELITY_FILE

    @property
    def vbench(self) -> Path:
        return self.root / VBENCH_FILE

    def vbench_work(self, variant: str = "") -> Path:
        """VBench's working directory for this method's videos (``variant='bf16'``: the twin's)."""
        return self.root / "eval" / ("vbench_" + variant if variant else "vbench")

    @property
    def eval_summary(self) -> Path:
        return self.root / "eval" / "summary.json"

    @property
    def per_sample(self) -> Path:
        return self.root / PER_SAMPLE

    @property
    def results_csv(self) -> Path:
        return self.root / RESULTS_CSV

    @property
    def results_parquet(self) -> Path:
        return self.root / RESULTS_PARQUET

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def summary_txt(self) -> Path:
        return self.root / "summary.txt"

    @property
    def report(self) -> Path:
        return self.root / REPORT_HTML

    @property
    def versions(self) -> Path:
        return self.root / VERSIONS_FILE

    @property
    def analysis(self) -> Path:
        return self.root / ANALYSIS_DIR

    # -- what a directory is ---------------------------------------------------------------------------
    def is_run(self) -> bool:
        """A run directory: it has a config record, a results row or an error record."""
        return any((self.root / n).is_file() for n in (CONFIG_FILE, RESULTS_CSV, ERROR_FILE))

    def finished(self) -> bool:
        """It has its results row and no failed attempt since."""
        return self.results_csv.is_file() and not self.error.is_file()
