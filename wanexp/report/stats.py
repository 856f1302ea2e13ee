"""Real differences from noise: paired bootstrap confidence intervals over samples, and sample sizes.

Every run of a sweep scores the same evaluation samples with the same seeds (each sample's noise is a
function of ``seed`` and its id), so two runs are compared *sample by sample*: for a metric ``m`` the
paired differences are ``d_i = m_A(i) − m_B(i)`` over the sample ids both runs scored
(``eval/per_sample.csv``), and the difference of the means is ``mean(d)``. Pairing removes the
between-sample spread (some prompts are simply harder), which is most of the variance.

- **Interval**: the percentile bootstrap of ``mean(d)``: ``resamples`` draws of n ids with replacement
  from the n pairs, the ``(1 − c)/2`` and ``(1 + c)/2`` quantiles of their means (c = ``confidence``,
  0.95). One run's own metric gets the same interval over its samples (no pairing).
- **Significant**: the interval excludes 0.
- **Sample size**: from the spread of the paired differences ``sd = std(d)`` (n − 1 in the
  denominator), the normal approximation to the paired test at two-sided level ``1 − c`` and the
  given ``power`` (0.8): ``n = ((z_{1−(1−c)/2} + z_{power}) · sd / δ)²`` samples detect a true
  difference δ; ``mde = (z_{…} + z_{power}) · sd / √n`` is the smallest difference this many samples
  detect. The tables give ``n_needed`` for δ = the observed difference and ``mde`` at the n used.

Caveats (also in the tables' notes): the percentile bootstrap under-covers with few samples (below
~20 pairs its 95% interval holds the truth less often than 95%); intervals are per comparison, not
corrected for the many comparisons of a table; and a paper figure has no per-sample data, so a gap to
it carries only our own sampling noise.

Settings (``report.bootstrap`` in ``conf/config.yaml``): ``resamples``, ``seed``, ``confidence``,
``power``, and ``baseline``, the run every other run's metrics are also compared with (``auto``: the
first quantized method of the table, e.g. rtn; ``null``: none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Mapping

import numpy as np
import pandas as pd

from wanexp.rundir import RunDir


@dataclass(frozen=True)
class Bootstrap:
    resamples: int = 2000
    seed: int = 0
    confidence: float = 0.95
    power: float = 0.8
    baseline: str | None = "auto"

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any] | None) -> "Bootstrap":
        """From ``report.bootstrap`` (a mapping; missing keys keep their defaults)."""
        cfg = dict(cfg or {})
        known = {k: cfg[k] for k in ("resamples", "seed", "confidence", "power", "baseline") if k in cfg}
        boot = cls(**known)
        if not (boot.resamples >= 1 and 0 < boot.confidence < 1 and 0 < boot.power < 1):
            raise ValueError(f"report.bootstrap: resamples >= 1, confidence and power in (0, 1); got {cfg}")
        return boot

    @property
    def z(self) -> float:
        """z_{1−(1−c)/2} + z_{power}: the factor of the sample-size formula."""
        nd = NormalDist()
        return nd.inv_cdf(0.5 + self.confidence / 2) + nd.inv_cdf(self.power)

    def describe(self) -> str:
        return (f"{self.confidence:.0%} percentile bootstrap over samples ({self.resamples} resamples, seed "
                f"{self.seed})")


def interval(values, boot: Bootstrap) -> tuple[float, float]:
    """The bootstrap interval of the mean of ``values`` (NaN, NaN with fewer than 2 values)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(boot.seed)  # a fresh generator per interval: each one reproducible alone
    means = np.empty(boot.resamples)
    step = max(1, 4_000_000 // v.size)      # resamples drawn in chunks of about 4M indices
    for start in range(0, boot.resamples, step):
        k = min(step, boot.resamples - start)
        means[start:start + k] = v[rng.integers(0, v.size, size=(k, v.size))].mean(axis=1)
    low, high = np.quantile(means, [(1 - boot.confidence) / 2, (1 + boot.confidence) / 2])
    return float(low), float(high)


def paired_differences(a: pd.Series, b: pd.Series) -> pd.Series:
    """``a − b`` on the sample ids (the index) both have a finite value for."""
    joined = pd.concat([a.rename("a"), b.rename("b")], axis=1, join="inner").astype(float)
    joined = joined[np.isfinite(joined).all(axis=1)]
    return joined["a"] - joined["b"]


def compare(diff, boot: Bootstrap) -> dict[str, Any]:
    """Mean difference, its interval, whether it is significant, the spread and the sample sizes."""
    d = np.asarray(diff, dtype=float)
    d = d[np.isfinite(d)]
    n = int(d.size)
    delta = float(d.mean()) if n else math.nan
    low, high = interval(d, boot)
    sd = float(d.std(ddof=1)) if n >= 2 else math.nan
    return {"n": n, "delta": delta, "ci_low": low, "ci_high": high,
            "significant": bool(low > 0 or high < 0) if n >= 2 else False,
            "sd_diff": sd, "mde": boot.z * sd / math.sqrt(n) if n >= 2 else math.nan,
            "n_needed": samples_needed(sd, delta, boot)}


def samples_needed(sd: float, effect: float, boot: Bootstrap) -> float:
    """Paired samples that detect a true mean difference ``effect`` given the differences' ``sd``
    (module docstring); 1 when the differences do not vary, NaN without a difference or a spread."""
    if not (math.isfinite(sd) and math.isfinite(effect)) or effect == 0:
        return math.nan
    if sd == 0:
        return 1.0
    return float(math.ceil((boot.z * sd / abs(effect)) ** 2))


def read_per_sample(run_dir) -> pd.DataFrame | None:
    """A run's per-sample metrics indexed by sample id (None when it has none)."""
    if not isinstance(run_dir, str) or not run_dir:
        return None
    path = RunDir(run_dir).per_sample
    if not path.is_file():
        return None
    df = pd.read_csv(path, dtype={"id": str})
    if "id" not in df:
        return None
    return df.drop_duplicates("id", keep="last").set_index("id")


def metric_intervals(per_sample: pd.DataFrame, metrics, boot: Bootstrap) -> dict[str, float]:
    """``<m>_ci_low`` / ``<m>_ci_high`` of each metric's mean over the samples (a run's own spread)."""
    out = {}
    for m in metrics:
        if m in per_sample:
            out[f"{m}_ci_low"], out[f"{m}_ci_high"] = interval(per_sample[m], boot)
    return out
