"""The statistics behind the experiments' verdicts: bootstrap intervals, the claims' rules,
the λ selection, and the per-image storage, on small synthetic data."""

from __future__ import annotations

import json

import pytest
import torch

from gradreg_kernels.experiments.bootstrap import (
    Interval,
    claim_verdict,
    mean_interval,
    mean_intervals,
    paired_difference,
    part_verdict,
)
from gradreg_kernels.experiments.claims import ClaimData, claim_parts, seeds_verdict, verdicts
from gradreg_kernels.experiments.lambda_grid import (
    PAPER_GRID,
    choose_lambda,
    package_lam,
    validation_split,
)
from gradreg_kernels.experiments.per_image import floats, from_floats, pack_bits, unpack_bits

NAMES = ["normal", "distilled", "adv-trained", "insensitive", "gradreg"]


def test_interval_covers_the_true_mean_about_as_often_as_its_level():
    g = torch.Generator().manual_seed(1)
    p, n, trials = 0.3, 200, 300
    covered = 0
    for t in range(trials):
        v = (torch.rand(n, generator=g) < p).double()
        iv = mean_interval(v, resamples=400, seed=t)
        covered += iv.lo <= p <= iv.hi
        assert iv.lo <= iv.mean <= iv.hi
    assert 0.88 <= covered / trials <= 0.99  # 95 % nominal; the percentile bootstrap is close


def test_interval_width_shrinks_as_one_over_root_n():
    g = torch.Generator().manual_seed(2)
    w = []
    for n in (100, 1600):
        iv = mean_interval((torch.rand(n, generator=g) < 0.5).double())
        w.append(iv.hi - iv.lo)
    assert 3.0 < w[0] / w[1] < 5.5  # √16 = 4


def test_paired_difference_separates_a_real_gap_and_not_noise():
    g = torch.Generator().manual_seed(3)
    a = (torch.rand(500, generator=g) < 0.6).double()
    better = torch.maximum(a, (torch.rand(500, generator=g) < 0.2).double())  # a, plus more
    assert part_verdict(paired_difference(better, a)) == "supports"
    assert part_verdict(paired_difference(a, better)) == "contradicts"
    shuffled = a[torch.randperm(500, generator=g)]  # same rate, no real difference
    assert part_verdict(paired_difference(a, shuffled)) == "inconclusive"


def test_pairing_sees_a_gap_that_two_separate_intervals_miss():
    # b is a with 15 of 300 wrong answers fixed: the unpaired intervals overlap, the paired
    # difference (15/300 = 0.05 on every resample's subset) does not hold 0
    g = torch.Generator().manual_seed(4)
    a = (torch.rand(300, generator=g) < 0.5).double()
    b = a.clone()
    b[(a == 0).nonzero()[:15, 0]] = 1
    ia, ib = mean_interval(a), mean_interval(b)
    assert ia.hi > ib.lo  # overlap
    assert paired_difference(b, a).lo > 0


def test_nan_images_are_dropped_pairwise():
    a = torch.tensor([1.0, float("nan"), 0.0, 1.0])
    b = torch.tensor([0.0, 1.0, float("nan"), 0.0])
    iv = paired_difference(a, b)
    assert iv.n == 2 and iv.mean == 1.0
    assert mean_intervals(torch.full((3,), float("nan")))[0].n == 0


def test_intervals_are_reproducible_and_checked():
    v = torch.rand(50, generator=torch.Generator().manual_seed(5))
    assert mean_interval(v) == mean_interval(v)
    with pytest.raises(ValueError, match="level"):
        mean_interval(v, level=1.5)
    with pytest.raises(ValueError, match="one value per image"):
        paired_difference(v, v[:10])


def test_claim_verdict_rules():
    s, c, i = "supports", "contradicts", "inconclusive"
    assert claim_verdict([s, s]) == "holds"
    assert claim_verdict([c, c]) == "does not hold"
    assert claim_verdict([i, i]) == "inconclusive"
    assert claim_verdict([s, i]) == "partly holds"
    assert claim_verdict([s, c]) == "partly holds"
    up, down, zero = Interval(0.1, 0.05, 0.2, 9), Interval(-0.1, -0.2, -0.05, 9), Interval(
        0, -0.1, 0.1, 9)
    assert seeds_verdict([up, up]) == s
    assert seeds_verdict([down]) == c
    assert seeds_verdict([up, zero]) == i
    assert seeds_verdict([up, down]) == i


def _claim_data(gradreg_good: bool, n: int = 400) -> ClaimData:
    """Synthetic outcomes where gradreg beats normal everywhere (or loses everywhere)."""
    g = torch.Generator().manual_seed(6)
    eps = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    correct = torch.rand(5, 5, 8, n, generator=g) < 0.5
    gi, ni, ai = NAMES.index("gradreg"), NAMES.index("normal"), NAMES.index("adv-trained")
    good, bad = torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    hi, lo = (good, bad) if gradreg_good else (bad, good)
    correct[ni, gi], correct[ni, ni], correct[ni, ai, 4:] = hi, lo, lo
    for t in range(5):  # the others are right on normal's examples, wrong on gradreg's
        if t != ni:
            correct[ni, t, 1:4] = hi
        if t != gi:
            correct[gi, t, 1:4] = lo
    hit = torch.zeros(5, 5, n, dtype=torch.bool)
    hit[gi if gradreg_good else ni] = True
    rnd = {nm: torch.rand(n, generator=g, dtype=torch.float64) for nm in NAMES}
    shift = {nm: (0.5 if (nm in ("gradreg", "insensitive")) == gradreg_good else 0.0)
             for nm in NAMES}
    vals = {nm: rnd[nm] * 0.1 + shift[nm] for nm in NAMES}
    return ClaimData(NAMES, eps, correct, hit, vals, vals, vals)


def test_claims_follow_the_data_both_ways():
    for good, want in ((True, "holds"), (False, "does not hold")):
        d = _claim_data(good)
        parts = [(p, mean_interval(v)) for p, v in claim_parts(d)]
        out = verdicts([parts], moot=False)
        assert [v for _, v, _ in out] == [want] * 3, out
    # under-trained gradreg: claims 1 and 2 inconclusive whatever the parts say
    parts = [(p, mean_interval(v)) for p, v in claim_parts(_claim_data(True))]
    got = [v for _, v, _ in verdicts([parts], moot=True)]
    assert got[0].startswith("inconclusive") and got[1].startswith("inconclusive")
    assert got[2] == "holds"


def test_claims_need_every_seed_to_agree():
    good = [(p, mean_interval(v)) for p, v in claim_parts(_claim_data(True))]
    bad = [(p, mean_interval(v)) for p, v in claim_parts(_claim_data(False))]
    assert [v for _, v, _ in verdicts([good, bad], moot=False)] == ["inconclusive"] * 3


def _vec(p: float, n: int = 400, seed: int = 0) -> torch.Tensor:
    return (torch.rand(n, generator=torch.Generator().manual_seed(seed)) < p).double()


def test_choose_lambda_takes_the_best_eligible_score():
    normal = _vec(0.98)
    clean = [_vec(0.98), _vec(0.97), _vec(0.96), _vec(0.70)]
    scores = [_vec(0.30, seed=1), _vec(0.50, seed=2), _vec(0.52, seed=3), _vec(0.95, seed=4)]
    c = choose_lambda(scores, clean, normal)
    assert c.eligible == [0, 1, 2]  # the last one has not learned the task
    assert c.index == 2
    assert 1 in c.indistinguishable and 0 not in c.indistinguishable
    assert c.score_vs_chosen[2] is None and c.score_vs_chosen[0].hi < 0


def test_choose_lambda_breaks_ties_towards_the_smaller_lambda_and_refuses_no_fit():
    v = _vec(0.5, seed=7)
    c = choose_lambda([v, v.clone()], [_vec(0.9), _vec(0.9)], _vec(0.9))
    assert c.index == 0 and c.indistinguishable == [1]
    with pytest.raises(ValueError, match="no grid point trains"):
        choose_lambda([v], [_vec(0.2)], _vec(0.9))


def test_paper_grid_and_lambda_convention():
    assert len(PAPER_GRID) == 13
    assert PAPER_GRID[0] == pytest.approx(100) and PAPER_GRID[-1] == pytest.approx(1e5)
    assert package_lam(10 ** 4.75) == pytest.approx(10 ** 4.75 / 512)
    assert package_lam(512, (1, 8, 8)) == pytest.approx((64 / 784) ** 2)


def test_validation_split_holds_out_the_last_training_images():
    from gradreg_kernels.data import Dataset

    x, y = torch.rand(20, 1, 4, 4), torch.arange(20) % 3
    ds = Dataset(x, y, x[:5], y[:5], 3, "toy")
    split, vx, vy = validation_split(ds, 6)
    assert len(split.train_y) == 14 and torch.equal(vx, x[14:]) and torch.equal(vy, y[14:])
    assert torch.equal(split.test_x, vx)
    with pytest.raises(ValueError, match="n_val"):
        validation_split(ds, 20)


def test_per_image_storage_round_trips_through_json():
    b = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(8)) < 0.5
    assert torch.equal(unpack_bits(json.loads(json.dumps(pack_bits(b)))), b)
    f = torch.tensor([0.123456789, float("nan"), -2.0])
    back = from_floats(json.loads(json.dumps(floats(f))))
    assert back[0] == pytest.approx(0.12346) and torch.isnan(back[1]) and back[2] == -2.0
