"""Resampling statistics for comparing backbones on one test set (numpy only).

The report compares backbones with a paired bootstrap over test images: one set of resample
weights per test set, shared by every model evaluated on it, so that what differs between two
models' resampled metrics is the models, not the draw of images.
"""

from __future__ import annotations

import zlib

import numpy as np


def stable_seed(name: str) -> int:
    """A seed derived from a name, the same in every process and Python version (``hash()``
    of a string is salted per process)."""
    return zlib.crc32(name.encode("utf-8"))


def bootstrap_weights(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) float counts: how many times each of ``n`` items appears in each
    resample drawn with replacement (each row sums to ``n``), reproducible from ``seed``."""
    if n < 1 or resamples < 1:
        raise ValueError(f"bootstrap of {n} items with {resamples} resamples")
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval holding the central ``level`` of ``samples`` (NaN, NaN when a
    sample is not finite: an undefined statistic has no interval)."""
    samples = np.asarray(samples, dtype=np.float64).ravel()
    if samples.size == 0 or not np.all(np.isfinite(samples)):
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(samples, [tail, 1.0 - tail])
    return float(low), float(high)


def average_ranks(values: np.ndarray, axis: int = 0) -> np.ndarray:
    """Ranks along ``axis``, 1 for the largest value; tied values share the mean of the ranks
    they span (two tied for first both get 1.5). Other axes (e.g. resamples) are independent.
    """
    v = np.moveaxis(np.asarray(values, dtype=np.float64), axis, -1)
    greater = (v[..., None, :] > v[..., :, None]).sum(-1)  # items strictly better than each
    equal = (v[..., None, :] == v[..., :, None]).sum(-1)  # itself included
    return np.moveaxis(1.0 + greater + (equal - 1) / 2.0, -1, axis)


def error(metric: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """The error of a metric: ``1 - m`` for a higher-is-better metric in [0, 1] (accuracy,
    mAP, mIoU), ``m`` itself for a lower-is-better one."""
    metric = np.asarray(metric, dtype=np.float64)
    return 1.0 - metric if higher_is_better else metric


def relative_error_reduction(error: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``(reference - error) / reference``: the share of the reference's error removed
    (positive: better than the reference; NaN where the reference has no error)."""
    error = np.asarray(error, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (reference - error) / reference
    return np.where(reference > 0, out, np.nan)
