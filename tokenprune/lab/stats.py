"""Statistics of accuracy on paired samples (scipy.stats): is a cell's accuracy really different?

Two cells answered the same samples, so they are compared sample by sample:

- `paired_bootstrap`: the mean per-sample difference in accuracy with a percentile bootstrap
  confidence interval; the samples are resampled with replacement, each one carrying both cells'
  scores (so what the two cells share cancels). `RESAMPLES` resamples, seeded with `BOOTSTRAP_SEED`:
  the same rows always give the same interval.
- `mcnemar_exact`: McNemar's exact test, a two-sided binomial test (p = 1/2) on the discordant
  samples (right in one cell, wrong in the other); the concordant ones carry no information.
- `spread`: mean, sample standard deviation and count of a measure over the seeds of one cell.

`compare` does both tests on two cells' per-sample predictions; a cell run with several seeds
enters the bootstrap with its per-sample accuracy averaged over its seeds, and McNemar's test only
when it has one seed (it needs one right-or-wrong per sample).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.stats

from tokenprune.lab.predictions import SamplePredictions

RESAMPLES = 10_000
CONFIDENCE = 0.95
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class Interval:
    """An estimate with its confidence interval."""

    estimate: float
    low: float
    high: float


@dataclass(frozen=True)
class McNemar:
    """McNemar's exact test: the discordant counts and the two-sided p-value."""

    only_reference: int  # samples the reference got right and the other wrong
    only_other: int  # samples the other got right and the reference wrong
    p_value: float


@dataclass(frozen=True)
class Spread:
    """Mean, sample standard deviation (None for one value) and count of values over seeds."""

    mean: float
    std: float | None
    n: int


@dataclass(frozen=True)
class Comparison:
    """Exact-match accuracy of one cell against another on the same samples: other minus reference."""

    difference: float
    interval: Interval | None  # the paired bootstrap's; None when not asked for
    mcnemar: McNemar | None  # None when a side has several seeds


def paired_bootstrap(
    reference: Sequence[float],
    other: Sequence[float],
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = BOOTSTRAP_SEED,
) -> Interval:
    """mean(other - reference) over samples, with its percentile bootstrap interval (paired samples).

    Resampling the per-sample differences is resampling the samples with both scores attached.
    """
    differences = np.asarray(other, dtype=float) - np.asarray(reference, dtype=float)
    if differences.size == 0:
        raise ValueError("a paired bootstrap needs at least one sample")
    result = scipy.stats.bootstrap(
        (differences,),
        np.mean,
        n_resamples=resamples,
        confidence_level=confidence,
        method="percentile",
        vectorized=True,
        rng=np.random.default_rng(seed),
    )
    interval = result.confidence_interval
    return Interval(float(differences.mean()), float(interval.low), float(interval.high))


def mcnemar_exact(reference: Sequence[bool], other: Sequence[bool]) -> McNemar:
    """McNemar's exact test of two cells' right/wrong on the same samples (p = 1 with no discordant one)."""
    if len(reference) != len(other):
        raise ValueError(f"paired samples differ in number: {len(reference)} and {len(other)}")
    only_reference = sum(r and not o for r, o in zip(reference, other, strict=True))
    only_other = sum(o and not r for r, o in zip(reference, other, strict=True))
    discordant = only_reference + only_other
    p_value = scipy.stats.binomtest(only_other, discordant, 0.5).pvalue if discordant else 1.0
    return McNemar(only_reference, only_other, float(p_value))


def spread(values: Sequence[float]) -> Spread:
    """Mean, sample standard deviation (ddof = 1) and count of `values`."""
    array = np.asarray(values, dtype=float)
    if array.size == 0:
        raise ValueError("a spread needs at least one value")
    std = float(array.std(ddof=1)) if array.size > 1 else None
    return Spread(float(array.mean()), std, int(array.size))


def compare(
    reference: Sequence[SamplePredictions], other: Sequence[SamplePredictions], interval: bool = True
) -> Comparison:
    """Exact-match accuracy of `other` against `reference` (each: the seeds of one cell), sample by sample:
    the difference, its bootstrap interval (unless `interval` is False: the costly part) and McNemar's test.

    Raises ValueError when they are not over the same samples.
    """
    first = reference[0]
    if not all(first.same_samples(p) for p in [*reference, *other]):
        raise ValueError("the cells were not run on the same samples: no paired comparison")
    scores, other_scores = _mean_correct(reference), _mean_correct(other)
    difference = float(np.mean(other_scores) - np.mean(scores))
    bootstrap = paired_bootstrap(scores, other_scores) if interval else None
    single = len(reference) == len(other) == 1
    mcnemar = mcnemar_exact(reference[0].correct, other[0].correct) if single else None
    return Comparison(difference, bootstrap, mcnemar)


def _mean_correct(seeds: Sequence[SamplePredictions]) -> list[float]:
    """Per sample, the fraction of the seeds that got it right."""
    return np.mean([p.correct for p in seeds], axis=0, dtype=float).tolist()
