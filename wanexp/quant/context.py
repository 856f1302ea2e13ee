"""The denoising timestep as the activation quantizers see it: one small object per expert.

A forward pre-hook on each expert (installed by the runner, which knows the model) calls
``TimestepContext.set_timestep``; every QuantLinear of that expert reads ``ctx.bin`` to pick its
clip ratio from its table. No globals: two experts, two contexts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch



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


def schedule_bins(steps: Sequence[float], low: float, high: float, num_bins: int) -> TimestepBins:
    """Bins over one expert's range [low, high) that every step of the schedule ``steps`` visits.

    The rule: equal width over [low, high) (the paper's bins) when each bin holds at least one of
    ``steps``; otherwise (few steps, e.g. a 4-step distilled schedule) the steps themselves are cut
    into ``min(num_bins, len(steps))`` runs of consecutive steps whose lengths differ by at most one
    (the noisier runs the longer), with each edge halfway between the runs it separates. No steps (an
    expert the schedule never runs): equal width."""
    equal = TimestepBins.equal_width(low, high, num_bins)
    ts = sorted((float(t) for t in steps), reverse=True)  # noisiest first, the order bins are numbered in
    if not ts or {equal.bin_of(t) for t in ts} == set(range(equal.num_bins)):
        return equal
    n = min(int(num_bins), len(ts))
    sizes = [len(ts) // n + (1 if k < len(ts) % n else 0) for k in range(n)]
    ends = [sum(sizes[:k + 1]) for k in range(n - 1)]  # index of the first step of runs 1..n-1
    return TimestepBins(tuple(sorted((ts[i - 1] + ts[i]) / 2.0 for i in ends)))


def expert_bins(boundary: float, num_train_timesteps: float, num_bins: int | Sequence[int],
                edges: dict | None = None, steps: dict[str, Sequence[float]] | None = None) -> dict[str, TimestepBins]:
    """Bins for both experts inside [boundary, T) for high-noise and [0, boundary) for low-noise: equal
    width, or, given each expert's ``steps`` of the schedule, bins those steps all visit
    (:func:`schedule_bins`); explicit ``edges`` per expert are taken as given."""
    per = (num_bins, num_bins) if isinstance(num_bins, int) else tuple(num_bins)
    if edges:
        return {k: TimestepBins(tuple(sorted(float(e) for e in v))) for k, v in edges.items()}
    ranges = {"high_noise": (boundary, num_train_timesteps, int(per[0])), "low_noise": (0.0, boundary, int(per[1]))}
    return {k: schedule_bins((steps or {}).get(k, ()), lo, hi, n) for k, (lo, hi, n) in ranges.items()}


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
    # ``bin`` as a 0-d CPU tensor, updated in place: what the fused kernels' custom op reads, so a
    # compiled block sees a new bin as new data rather than a new constant (no recompile per bin)
    bin_index: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64),
                                    compare=False, repr=False)

    def set_timestep(self, t: float) -> None:
        self.timestep = float(t)
        self.bin = self.bins.bin_of(self.timestep)
        self.bin_index.fill_(self.bin)
