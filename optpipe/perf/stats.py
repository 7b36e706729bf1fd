"""Paired ratio statistics for interleaved timings: estimate, bootstrap interval, and how sure a verdict is."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BOOTSTRAP = 2000
_CHUNK = 4_000_000  # elements per bootstrap chunk: bounds memory for long runs of tiny models


@dataclass(frozen=True)
class RatioEstimate:
    """Latency of a model / latency of the reference, from paired rounds; [low, high] is the `level` interval."""

    ratio: float
    low: float
    high: float
    rounds: int = 0
    level: float = 0.95
    workload: str = ""  # what the rounds timed (optpipe.perf.inputs: forward, prefill, decode ...), when known

    def verdict(self, margin: float = 0.0) -> str:
        """faster / slower / no difference detected at this noise (beyond `margin`, e.g. 0.01 = 1%)."""
        if self.low > 1.0 + margin:
            return "slower"
        if self.high < 1.0 - margin:
            return "faster"
        return "no difference detected at this noise"


def _block_length(n: int) -> int:
    # Noise on a shared machine comes in bursts that span consecutive rounds; resampling blocks of rounds
    # keeps that dependence in the bootstrap instead of pretending every round is independent.
    return max(1, int(round(n ** (1 / 3))))


def bootstrap_medians(log_ratios: np.ndarray, resamples: int = BOOTSTRAP, seed: int = 0) -> np.ndarray:
    """Moving-block bootstrap distribution of the median of per-round log ratios."""
    n = len(log_ratios)
    block = _block_length(n)
    blocks = -(-n // block)
    rng = np.random.default_rng(seed)
    out = np.empty(resamples)
    step = max(1, _CHUNK // max(n, 1))
    offsets = np.arange(block)
    for start in range(0, resamples, step):
        count = min(step, resamples - start)
        starts = rng.integers(0, n - block + 1, size=(count, blocks))
        index = (starts[:, :, None] + offsets).reshape(count, -1)[:, :n]
        out[start:start + count] = np.median(log_ratios[index], axis=1)
    return out


def paired_distribution(reference: np.ndarray, other: np.ndarray, seed: int = 0) -> tuple[float, np.ndarray]:
    """Point estimate (median paired ratio) and its bootstrap samples, both as ratios."""
    reference, other = np.asarray(reference, float), np.asarray(other, float)
    if len(reference) != len(other) or len(reference) < 2:
        raise ValueError("paired timings need the same number (>= 2) of rounds on both sides")
    logs = np.log(other) - np.log(reference)
    return float(np.exp(np.median(logs))), np.exp(bootstrap_medians(logs, seed=seed))


def paired_ratio(reference: np.ndarray, other: np.ndarray, level: float = 0.95, seed: int = 0) -> RatioEstimate:
    """other / reference per round, summarized by the median, with a percentile bootstrap interval."""
    estimate, samples = paired_distribution(reference, other, seed)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return RatioEstimate(round(estimate, 5), round(float(low), 5), round(float(high), 5), len(reference), level)
