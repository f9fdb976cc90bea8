"""Bootstrap confidence intervals over the attacked images, and the verdict they allow.

Every accuracy and measure of the experiments is a mean over N images, v̄ = (1/N) Σ_n v_n.
Its percentile bootstrap interval at level 1 − α resamples the N images with replacement
R times, v̄*_r = (1/N) Σ_n v_{I_rn} with I_rn uniform on {0, …, N−1}, and takes the α/2 and
1 − α/2 quantiles of the R means. Two models measured on the same images are compared by
the paired difference d_n = a_n − b_n, resampled as a whole, which keeps the correlation
between the two (the same hard images hurt both): the comparison *separates* them when
the interval of d̄ excludes 0.

Images whose value is NaN (a measure undefined there, e.g. the share of an all-zero
saliency map) are dropped before resampling, for a pair wherever either is NaN.
The resampling indices come from a fixed seed, so a rerun reproduces every interval.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

RESAMPLES = 2000
LEVEL = 0.95
SEED = 0


@dataclass(frozen=True)
class Interval:
    """A mean over n images with its bootstrap interval [lo, hi]."""

    mean: float
    lo: float
    hi: float
    n: int

    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def sign(self) -> int:
        """+1 when the whole interval is above 0, −1 when below, 0 when it holds 0."""
        return 1 if self.lo > 0 else -1 if self.hi < 0 else 0

    def to_dict(self) -> dict:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi, "n": self.n}

    @classmethod
    def from_dict(cls, d: dict) -> Interval:
        return cls(float(d["mean"]), float(d["lo"]), float(d["hi"]), int(d["n"]))

    def text(self, digits: int = 3) -> str:
        return f"{self.mean:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"


def _as_float(v: Tensor) -> Tensor:
    v = torch.as_tensor(v).detach().to("cpu", torch.float64)
    if v.dim() < 1:
        raise ValueError(f"per-image values must have a leading image axis, got shape "
                         f"{tuple(v.shape)}")
    return v


def mean_intervals(values: Tensor, resamples: int = RESAMPLES, level: float = LEVEL,
                   seed: int = SEED) -> list[Interval]:
    """Intervals of the column means of ``values`` (N, M): one per column; consecutive
    columns that keep the same number of images share one set of resampled indices. A (N,)
    tensor gives one interval. NaN rows of a column are dropped from that column (its n
    says how many images it kept)."""
    v = _as_float(values)
    v = v.reshape(v.shape[0], -1)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    out = []
    g = torch.Generator().manual_seed(seed)
    idx_all = None
    for j in range(v.shape[1]):
        col = v[:, j]
        col = col[~torch.isnan(col)]
        n = col.numel()
        if n == 0:
            out.append(Interval(float("nan"), float("nan"), float("nan"), 0))
            continue
        if idx_all is None or idx_all.shape[1] != n:
            idx_all = torch.randint(0, n, (resamples, n), generator=g)
        means = col[idx_all].mean(1)
        q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
        lo, hi = torch.quantile(means, q).tolist()
        out.append(Interval(float(col.mean()), lo, hi, n))
    return out


def mean_interval(values: Tensor, **kw) -> Interval:
    """The interval of the mean of per-image values (N,)."""
    return mean_intervals(torch.as_tensor(values).reshape(-1), **kw)[0]


def paired_difference(a: Tensor, b: Tensor, **kw) -> Interval:
    """The interval of mean(a − b) over the images where both are defined; a, b: (N,)."""
    a, b = _as_float(a).reshape(-1), _as_float(b).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"a paired comparison needs one value per image in both, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    return mean_interval(a - b, **kw)  # NaN where either is NaN: dropped


#: what a comparison's interval says about the claim it tests
SUPPORTS, CONTRADICTS, INCONCLUSIVE = "supports", "contradicts", "inconclusive"


def part_verdict(diff: Interval) -> str:
    """A claim part that predicts diff > 0: supported when the interval is above 0,
    contradicted when below, inconclusive when it holds 0."""
    return {1: SUPPORTS, -1: CONTRADICTS, 0: INCONCLUSIVE}[diff.sign()]


def claim_verdict(parts: list[str]) -> str:
    """All parts supported: "holds"; all contradicted: "does not hold"; all inconclusive:
    "inconclusive"; any other mix: "partly holds"."""
    if not parts:
        raise ValueError("a claim needs at least one part")
    for word, verdict in ((SUPPORTS, "holds"), (CONTRADICTS, "does not hold"),
                          (INCONCLUSIVE, "inconclusive")):
        if all(p == word for p in parts):
            return verdict
    return "partly holds"
