"""stats.py: bootstrap counts and percentile intervals on hand-built sums with known answers."""

import numpy as np
import pytest

from saelab import stats


def test_counts_are_draws_with_replacement_and_reproducible() -> None:
    """Each resample draws n units (rows sum to n), the seed fixes the draw, another seed
    changes it, and every unit is drawn about once per resample on average."""
    counts = stats.bootstrap_counts(50, 400, seed=3)
    assert counts.shape == (400, 50)
    np.testing.assert_array_equal(counts.sum(1), 50)
    np.testing.assert_array_equal(counts, stats.bootstrap_counts(50, 400, seed=3))
    assert not np.array_equal(counts, stats.bootstrap_counts(50, 400, seed=4))
    assert counts.mean() == pytest.approx(1.0)


def test_ratio_estimate_is_the_pooled_ratio() -> None:
    """Σ num / Σ den over units [1, 2, 3] / [1, 1, 2] is 6 / 4 (not the mean of the ratios)."""
    per_unit = {"num": np.array([1.0, 2.0, 3.0]), "den": np.array([1.0, 1.0, 2.0])}
    counts = stats.bootstrap_counts(3, 200, seed=0)
    estimate, low, high = stats.interval(stats.ratio("num", "den"), per_unit, counts)
    assert estimate == 1.5
    assert 1.0 <= low <= estimate <= high <= 2.0  # every resample's ratio lies in [1, 2]


def test_constant_units_give_a_degenerate_interval() -> None:
    """Units that all have the same ratio give that ratio in every resample."""
    per_unit = {"num": np.full(20, 3.0), "den": np.full(20, 2.0)}
    est, low, high = stats.interval(stats.ratio("num", "den"), per_unit,
                                    stats.bootstrap_counts(20, 100, seed=1))  # fmt: skip
    assert est == low == high == 1.5


def test_paired_difference_removes_shared_variation() -> None:
    """Two SAEs whose per-context CE differ by exactly 0.1 everywhere, on contexts whose CE varies
    a lot: the paired interval of the difference is exactly [0.1, 0.1]; each mean alone is wide."""
    rng = np.random.default_rng(0)
    base = rng.normal(4.0, 1.0, 200)
    per_unit = {"a": base + 0.1, "b": base, "n": np.ones(200)}
    counts = stats.bootstrap_counts(200, 500, seed=2)
    diff = stats.difference(stats.ratio("a", "n"), stats.ratio("b", "n"))
    est, low, high = stats.interval(diff, per_unit, counts)
    assert est == pytest.approx(0.1) and low == pytest.approx(0.1) and high == pytest.approx(0.1)
    _, low_a, high_a = stats.interval(stats.ratio("a", "n"), per_unit, counts)
    assert high_a - low_a > 0.2


def test_interval_covers_the_true_mean_about_95_percent_of_the_time() -> None:
    """Coverage of the percentile interval of a mean over 40 normal units, 300 repetitions: about
    0.95 (binomial sd ~0.013; percentile intervals under-cover slightly at small n)."""
    rng = np.random.default_rng(5)
    counts = stats.bootstrap_counts(40, 500, seed=6)
    hits = 0
    for _ in range(300):
        per_unit = {"x": rng.normal(1.0, 2.0, 40), "n": np.ones(40)}
        _, low, high = stats.interval(stats.ratio("x", "n"), per_unit, counts)
        hits += low <= 1.0 <= high
    assert 0.89 <= hits / 300 <= 0.98


def test_vector_sums_resample_row_wise() -> None:
    """[n, d] per-unit sums resample to [m, d]; a statistic over them reduces to [m]."""
    per_unit = {"v": np.arange(6.0).reshape(3, 2)}
    counts = np.array([[1.0, 1.0, 1.0], [3.0, 0.0, 0.0]])
    out = stats.resample_sums(per_unit, counts)["v"]
    np.testing.assert_array_equal(out, [[6.0, 9.0], [0.0, 3.0]])


def test_undefined_statistic_gives_nan_interval() -> None:
    """A resample where the denominator sums to 0 makes the statistic undefined: NaN bounds, the
    full-sample estimate kept."""
    per_unit = {"num": np.array([1.0, 1.0]), "den": np.array([0.0, 1.0])}
    counts = np.array([[2.0, 0.0], [1.0, 1.0]])
    with np.errstate(divide="ignore", invalid="ignore"):
        est, low, high = stats.interval(stats.ratio("num", "den"), per_unit, counts)
    assert est == 2.0 and np.isnan(low) and np.isnan(high)
