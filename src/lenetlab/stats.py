"""Statistics over seeds: a mean with its 95% interval, and paired differences.

Every configuration is trained from a few seeds, so its accuracy is a small sample.
The Student t interval says how far the mean of that sample may be from the mean
over all seeds. Two configurations trained from the same seeds are compared seed by
seed (a paired comparison), which removes the part of the noise the seed explains.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

CONFIDENCE = 0.95


def summarize(values: Sequence[float]) -> dict:
    """Mean, sample standard deviation and 95% interval of the mean of values.

    A single value gives no interval: std is 0.0 and both ends of ci95 equal the
    value, and "n" == 1 tells a reader to show the interval as not available.
    """
    if len(values) == 0:
        raise ValueError("summarize needs at least one value")
    n = len(values)
    mean = math.fsum(values) / n
    if n == 1:
        return {"mean": mean, "std": 0.0, "ci95": [mean, mean], "n": 1}
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = _t_quantile(n - 1) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "ci95": [mean - half, mean + half], "n": n}


def paired_difference(
    a: Mapping[int | str, float], b: Mapping[int | str, float]
) -> dict | None:
    """Compare a against b over the seeds both have: statistics of a - b, seed by seed.

    Seeds are matched whether they are written as numbers or as strings ("0" and 0
    are the same seed: JSON turns dictionary keys into strings). Returns None when
    no seed is common. "excludes_zero" is False when fewer than two seeds pair up,
    since one difference gives no interval.
    """
    a_by_seed = {_seed_key(key): value for key, value in a.items()}
    b_by_seed = {_seed_key(key): value for key, value in b.items()}
    seeds = sorted(a_by_seed.keys() & b_by_seed.keys(), key=_seed_order)
    if not seeds:
        return None
    differences = [a_by_seed[seed] - b_by_seed[seed] for seed in seeds]
    summary = summarize(differences)
    lo, hi = summary["ci95"]
    return {
        "seeds": seeds,
        "mean_diff": summary["mean"],
        "std": summary["std"],
        "ci95": [lo, hi],
        "n": summary["n"],
        "excludes_zero": summary["n"] >= 2 and (lo > 0 or hi < 0),
    }


def _t_quantile(degrees_of_freedom: int) -> float:
    """The two-sided 95% Student t factor (4.303 for 2 degrees of freedom)."""
    # Here, not at the top: scipy.stats is slow to import, and only a finished run's statistics need it.
    from scipy import stats as scipy_stats

    return float(scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, degrees_of_freedom))


def _seed_key(key: int | str) -> int | str:
    """A seed as an int where it is one, so "3" from JSON pairs with 3 from Python."""
    text = str(key).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    return text


def _seed_order(seed: int | str) -> tuple[bool, int | str]:
    """Sort numeric seeds numerically, and any named ones after them."""
    return (isinstance(seed, str), seed)
