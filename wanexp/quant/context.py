"""The denoising timestep as the activation quantizers see it: one small object per expert.

A forward pre-hook on each expert (installed by the runner, which knows the model) calls
``TimestepContext.set_timestep``; every QuantLinear of that expert reads ``ctx.bin`` to pick its
clip ratio from its table. No globals: two experts, two contexts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence



@dataclass(frozen=True)
class TimestepBins:
    """Bin edges over one expert's timestep range, in the scheduler's timestep units (0..1000).

    ``edges`` are ascending interior edges; bin ``i`` holds ``edges[i-1] <= t < edges[i]`` with the
    outer bins open-ended, so every timestep lands in exactly one bin. Bins are numbered from the
    noisiest (largest t) down, in the order denoising visits them.
    """

    edges: tuple[float, ...] = ()

    @property
    def num_bins(self) -> int:
        return len(self.edges) + 1

    def bin_of(self, t: float) -> int:
        above = sum(1 for e in self.edges if t >= e)  # number of edges at or below t
        return self.num_bins - 1 - above

    @classmethod
    def equal_width(cls, low: float, high: float, num_bins: int) -> "TimestepBins":
        """``num_bins`` bins of equal width over [low, high): the paper's default inside each expert."""
        if num_bins < 1:
            raise ValueError(f"num_bins must be >= 1, got {num_bins}")
        width = (high - low) / num_bins
        return cls(tuple(low + width * k for k in range(1, num_bins)))

    def to_json(self) -> dict:
        return {"edges": list(self.edges)}

    @classmethod
    def from_json(cls, obj: dict) -> "TimestepBins":
        return cls(tuple(float(e) for e in obj["edges"]))


def expert_bins(boundary: float, num_train_timesteps: float, num_bins: int | Sequence[int],
                edges: dict | None = None) -> dict[str, TimestepBins]:
    """Bins for both experts: equal width inside [boundary, T) for high-noise and [0, boundary) for low-noise,
    unless explicit ``edges`` per expert are given."""
    per = (num_bins, num_bins) if isinstance(num_bins, int) else tuple(num_bins)
    if edges:
        return {k: TimestepBins(tuple(sorted(float(e) for e in v))) for k, v in edges.items()}
    return {"high_noise": TimestepBins.equal_width(boundary, num_train_timesteps, int(per[0])),
            "low_noise": TimestepBins.equal_width(0.0, boundary, int(per[1]))}


def step_fraction_bins(timesteps: Sequence[float], boundary: float,
                       fractions: Mapping[str, Sequence[float]]) -> dict[str, TimestepBins]:
    """The seed paper code's bins: within each expert's own steps of the schedule (high-noise:
    t >= boundary, as the pipeline switches), step i of n is in bin k = the number of cut fractions
    f with i / n >= f (the code's ``r < f`` tests in order), e.g. cuts (0.33, 0.66) at 0.33 and 0.66
    of the expert's steps. Returned as timestep edges (midway between the neighbouring steps of two
    bins) so inference looks the bin up from the timestep alone; an empty bin gets an edge at its
    neighbour's last step, so no step falls into it."""
    split = {"high_noise": [float(t) for t in timesteps if float(t) >= boundary],
             "low_noise": [float(t) for t in timesteps if float(t) < boundary]}
    return {expert: _fraction_edges(sorted(ts, reverse=True), [float(f) for f in fractions[expert]])
            for expert, ts in split.items()}


def step_bin(i: int, n: int, cuts: Sequence[float]) -> int:
    """Bin of step ``i`` of an expert's ``n`` steps under the cut fractions (``i / n < cut`` is below it)."""
    return sum(1 for c in cuts if i / n >= c)


def _fraction_edges(ts: list[float], cuts: list[float]) -> TimestepBins:
    if sorted(cuts) != cuts or not all(0 < c < 1 for c in cuts):
        raise ValueError(f"bin cut fractions must be ascending, inside (0, 1): got {cuts}")
    bins = [step_bin(i, len(ts), cuts) for i in range(len(ts))]
    edges = []
    for k in range(1, len(cuts) + 1):  # between bins < k (larger t) and bins >= k
        above = [t for t, b in zip(ts, bins) if b < k]
        below = [t for t, b in zip(ts, bins) if b >= k]
        if above and below:
            edges.append((min(above) + max(below)) / 2)
        else:  # no step on one side (or none at all): the edge just below the larger-t steps
            edges.append(min(above) if above else (max(below) + 1 if below else 0.0))
    return TimestepBins(tuple(sorted(edges)))


@dataclass
class TimestepContext:
    """Where one expert is in the denoising trajectory. ``bin`` is what QuantLinear reads."""

    bins: TimestepBins = field(default_factory=TimestepBins)
    timestep: float | None = None
    bin: int = 0

    def set_timestep(self, t: float) -> None:
        self.timestep = float(t)
        self.bin = self.bins.bin_of(self.timestep)
