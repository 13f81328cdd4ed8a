"""Bootstrap confidence intervals over evaluation units (contexts).

Every evaluation metric of saelab is a function of sums over units: per-context sums of
per-token quantities (CE, KL, squared error, ...). A bootstrap resample draws ``n`` units with
replacement; its sums are ``counts @ per_unit`` with ``counts [n_resamples, n]`` the number of
times each unit was drawn, so one matrix product gives every resample of every sum.

Units are contexts, not tokens: the tokens of one context share their prefix and their document,
so they are not independent; resampling whole contexts (a cluster bootstrap) keeps that
dependence and gives wider, honest intervals (Efron & Tibshirani 1993, "An Introduction to the
Bootstrap", sec. 13: the percentile interval; Field & Welsh 2007, "Bootstrapping clustered data",
for resampling clusters). Contexts of one document are still correlated with each other; the
intervals do not account for that.

A comparison of two SAEs on the same contexts uses the same ``counts`` for both (a paired
bootstrap): the interval of the difference then excludes the context-to-context variation that
both share.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

LEVEL = 0.95  # two-sided percentile intervals

Sums = Mapping[str, np.ndarray]
Statistic = Callable[[Sums], np.ndarray]


def bootstrap_counts(n_units: int, n_resamples: int, seed: int) -> np.ndarray:
    """Multiplicities of ``n_resamples`` resamples of ``n_units`` units drawn with replacement.

    Returns ``[n_resamples, n_units] float64`` (each row sums to n_units). The same arguments
    give the same counts, so two evaluations with the same seed are paired.

    Raises:
        ValueError: n_units < 1 or n_resamples < 1.
    """
    if n_units < 1 or n_resamples < 1:
        raise ValueError(f"n_units and n_resamples must be >= 1: {n_units}, {n_resamples}")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_units, size=(n_resamples, n_units))
    counts = np.zeros((n_resamples, n_units))
    np.add.at(counts, (np.arange(n_resamples)[:, None], draws), 1.0)
    return counts


def resample_sums(per_unit: Sums, counts: np.ndarray) -> dict[str, np.ndarray]:
    """Resampled sums: ``per_unit[key]`` is ``[n_units]`` or ``[n_units, d]`` float; the result
    ``[n_resamples]`` or ``[n_resamples, d]`` float64 is ``counts @ per_unit[key]``."""
    return {key: counts @ np.asarray(value, dtype=np.float64) for key, value in per_unit.items()}


def point_sums(per_unit: Sums) -> dict[str, np.ndarray]:
    """The full-sample sums, shaped like one resample (``[1]`` or ``[1, d]``)."""
    return {k: np.asarray(v, dtype=np.float64).sum(0, keepdims=True) for k, v in per_unit.items()}


def interval(
    statistic: Statistic, per_unit: Sums, counts: np.ndarray, level: float = LEVEL
) -> tuple[float, float, float]:
    """``(estimate, low, high)`` of ``statistic`` with its percentile bootstrap interval.

    statistic: maps sums (each ``[m]`` or ``[m, d]``) to ``[m]`` values, one per resample.
    per_unit: the per-unit sums it needs. counts: :func:`bootstrap_counts` over the same units.
    A statistic that is undefined on some resample (NaN or infinite, e.g. a zero denominator)
    makes the interval NaN.
    """
    estimate = float(statistic(point_sums(per_unit))[0])
    values = statistic(resample_sums(per_unit, counts))
    if not np.isfinite(values).all():
        return estimate, float("nan"), float("nan")
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return estimate, float(low), float(high)


def ratio(num: str, den: str) -> Statistic:
    """The statistic ``Σ num / Σ den`` (e.g. mean CE per prediction: Σ CE / Σ n_pred)."""
    return lambda s: s[num] / s[den]


def difference(first: Statistic, second: Statistic) -> Statistic:
    """The statistic ``first − second`` (with paired units: a paired difference)."""
    return lambda s: first(s) - second(s)
