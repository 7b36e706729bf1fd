"""The statistics of `optpipe check`'s verdict: the latency ratio's interval, the decision against the tolerance,
and the sequential rule that stops the timing once the decision is clear (regress.py times and reports)."""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np

from optpipe.perf.stats import RatioEstimate, bootstrap_medians

LEVEL = 0.95
# "a check failed" in the CLI's exit-code table, as for a failed validation (optpipe/cli/main.py); also the exit
# of an inconclusive verdict with fail_inconclusive (--fail-inconclusive)
REGRESSION_EXIT = 3

# The sequential rule. Rounds run until the verdict is clear or the budget (`seconds`) ends. Every look at the
# data is a chance to stop on a fluke, so interim looks are stricter than the final verdict:
# - an interim look stops only when the 99% interval lies wholly on one side of 1 + tolerance (z = 2.576 on the
#   log scale, from the bootstrap standard error of the median over INTERIM_RESAMPLES resamples: cheap enough to
#   repeat, and stable where 0.5% percentiles of a few hundred resamples would rest on one or two values);
# - looks start after MIN_LOOK_SECONDS and MIN_LOOK_ROUNDS, and come at least LOOK_EVERY_S apart with the rounds
#   grown by LOOK_GROWTH since the previous look, so their number grows with the logarithm of the budget (about 8
#   in 20 s, 12 in 60 s at MiniLM's ~35 rounds/s), not linearly;
# - a stop also needs the final 95% percentile interval (BOOTSTRAP resamples) on the same rounds to agree, so the
#   reported interval is always the fixed-level one.
# Pocock's group-sequential boundary for 10 looks at an overall one-sided 2.5% is a nominal 0.53% per look, about
# the 0.5% one-sided tail of a 99% interval: the interim looks together err about as often as one fixed-length
# 95% interval does, at a true slowdown exactly at the tolerance. The final look at the budget's end adds at most
# its own 2.5% there. Well inside the tolerance (A/A) or well beyond it, both are far smaller; the study
# (bench/gate_study.py) measures the rates.
# Fresh sessions per epoch. Two sessions of the same file differ by up to 1-2% in speed, steadily, for as long as
# they live (where their weights and buffers land in memory; bench/results/gate-study-20261202-one-session-pair.*:
# calm, A/A checks with one session pair read 0.986 to 1.021, tight intervals around each: 3 of 42 flagged at 1%).
# So with the reference at hand the check runs epochs: each opens both artifacts afresh, in a random order, and
# times EPOCH_SECONDS of interleaved rounds; an epoch gives one estimate (the median of its per-round log ratios),
# and the verdict rests on the epochs' mean with a Student-t interval, whose spread includes that session effect.
# Looks come after each epoch from MIN_EPOCHS on (99% interval, as below).
EPOCH_SECONDS = 1.0
MIN_EPOCHS = 5
MIN_LOOK_SECONDS = 3.0
MIN_LOOK_ROUNDS = 60
LOOK_EVERY_S = 1.5
LOOK_GROWTH = 1.25
INTERIM_Z = 2.576  # two-sided 99%
INTERIM_RESAMPLES = 400
BOOTSTRAP_T = 20_000  # draws of the epochs' Student-t distribution


class Looks:
    """The sequential rule (see MIN_LOOK_SECONDS) as interleave's `stop`: looks at the rounds so far and says
    stop once the verdict is clear. `logs(times)` turns interleave's times into per-round log ratios."""

    def __init__(self, logs: Callable[[list[list[float]]], np.ndarray], tolerance: float):
        self.logs, self.limit = logs, math.log1p(tolerance)
        self.tolerance = tolerance
        self.started = self.last = time.perf_counter()
        self.last_rounds = 0
        self.looks = 0
        self.stopped = False

    def __call__(self, times: list[list[float]]) -> bool:
        now, rounds = time.perf_counter(), len(times[-1])
        if (now - self.started < MIN_LOOK_SECONDS or rounds < MIN_LOOK_ROUNDS or now - self.last < LOOK_EVERY_S
                or rounds < LOOK_GROWTH * self.last_rounds):
            return False
        self.looks += 1
        logs = self.logs(times)
        center = float(np.median(logs))
        spread = INTERIM_Z * float(np.std(bootstrap_medians(logs, INTERIM_RESAMPLES, seed=self.looks), ddof=1))
        clear = center - spread > self.limit or center + spread < self.limit
        if clear:  # the reported verdict is the final 95% one: stop only when it agrees
            clear = verdict(*ratio_distribution(logs), len(logs), self.tolerance)[2] != "inconclusive"
        self.last, self.last_rounds = time.perf_counter(), rounds
        self.stopped = clear
        return clear


def ratio_distribution(logs: np.ndarray) -> tuple[float, np.ndarray]:
    """Point estimate (median ratio) and the moving-block bootstrap samples of it, as ratios."""
    return float(np.exp(np.median(logs))), np.exp(bootstrap_medians(logs))


class Epochs:
    """The interleaved timing in epochs of fresh sessions (see EPOCH_SECONDS), with the sequential rule."""

    def __init__(self, tolerance: float):
        self.limit, self.tolerance = math.log1p(tolerance), tolerance
        self.estimates: list[float] = []
        self.ref: list[float] = []
        self.cand: list[float] = []
        self.looks = 0
        self.stopped = False
        self.workload = ""

    def clear(self) -> bool:
        """An interim look after an epoch: stop when the 99% t-interval and the final 95% one agree."""
        if len(self.estimates) < MIN_EPOCHS:
            return False
        self.looks += 1
        center, samples = t_distribution(self.estimates)
        low, high = np.log(np.percentile(samples, [0.5, 99.5]))  # the 99% t-interval, from the same draws
        clear = bool(low > self.limit or high < self.limit)
        if clear:
            clear = verdict(center, samples, len(self.ref), self.tolerance)[2] != "inconclusive"
        self.stopped = clear
        return clear

    @property
    def ref_t(self) -> np.ndarray:
        return np.asarray(self.ref)

    @property
    def cand_t(self) -> np.ndarray:
        return np.asarray(self.cand)

    @property
    def logs(self) -> np.ndarray:
        return np.log(self.cand_t) - np.log(self.ref_t)


def t_distribution(estimates: list[float]) -> tuple[float, np.ndarray]:
    """The epochs' mean log ratio and a sample of its Student-t sampling distribution, as ratios (so that its
    percentiles are the t-interval, as verdict reads them)."""
    values = np.asarray(estimates, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:  # one epoch says nothing about the session effect: an interval that cannot decide
        return math.exp(mean), np.repeat([1e-6, 1e6], BOOTSTRAP_T // 2)
    se = float(values.std(ddof=1)) / math.sqrt(len(values))
    draws = np.random.default_rng(0).standard_t(len(values) - 1, BOOTSTRAP_T)
    return math.exp(mean), np.exp(mean + se * draws)


def verdict(estimate: float, samples: np.ndarray, rounds: int, tolerance: float, fail_inconclusive: bool = False,
            budget: float | None = None):
    """(ratio with its interval, P(slowdown > tolerance), status, exit code, message): a regression only when the
    whole interval lies above 1 + tolerance, ok when it lies wholly below, inconclusive when it straddles."""
    limit = 1.0 + tolerance
    tail = (1 - LEVEL) / 2 * 100
    low, high = (float(v) for v in np.percentile(samples, [tail, 100 - tail]))
    ratio = RatioEstimate(round(estimate, 5), round(low, 5), round(high, 5), rounds, LEVEL)
    probability = float(np.mean(samples > limit))
    interval = f"{ratio.ratio:.3f} [{ratio.low:.3f}, {ratio.high:.3f}]"
    if ratio.low > limit:
        status, code = "regression", REGRESSION_EXIT
        message = (f"REGRESSION: {(ratio.ratio - 1) * 100:+.1f}% latency, ratio {interval} lies wholly above "
                   f"the {tolerance:.1%} tolerance (probability {probability:.1%} that the slowdown exceeds it)")
    elif ratio.high > limit:
        status, code = "inconclusive", REGRESSION_EXIT if fail_inconclusive else 0
        within = f" within {budget:g}s" if budget else ""
        message = (f"inconclusive: ratio {interval} straddles the {tolerance:.1%} tolerance (probability "
                   f"{probability:.1%} that the slowdown exceeds it); noise too high to judge{within}; rerun on a "
                   f"quieter runner or raise --seconds"
                   + (" (failing: --fail-inconclusive)" if fail_inconclusive else " (not failing the job)"))
    else:
        status, code = "ok", 0
        message = (f"ok: no regression beyond {tolerance:.1%}: ratio {interval} (probability "
                   f"{probability:.1%} that the slowdown exceeds it)")
    return ratio, probability, status, code, message
