"""Minimal interleaved latency ratios for `optpipe tune`, used only while optpipe.harness.interleaved_ratios
(same signature, richer statistics) is not there. Models run in rotating order, one call each per round, with
ONNX Runtime spinning off; each round gives a paired ratio to the first model, so drift hits both sides."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from optpipe.session import create_session

WARMUP = 3
MIN_ROUNDS = 5


@dataclass(frozen=True)
class LatencyRatio:
    ratio: float  # median over rounds of (this model's latency / the first model's latency)
    low: float  # 95% bootstrap interval of that median
    high: float
    median_ms: float
    rounds: int


def _feed(session, batch: int, seq: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feed = {}
    for spec in session.get_inputs():
        if spec.name == "input_ids":
            feed[spec.name] = rng.integers(1000, 20000, size=(batch, seq), dtype=np.int64)
        elif spec.name == "attention_mask":
            feed[spec.name] = np.ones((batch, seq), dtype=np.int64)
        else:
            feed[spec.name] = np.zeros((batch, seq), dtype=np.int64)
    return feed


def interleaved_ratios(model_paths: list[Path], *, batch: int = 1, seq: int = 128, threads: int | None = None,
                       seconds: float = 10.0) -> list[LatencyRatio]:
    """Latency of each model relative to the first, measured interleaved in this process for about `seconds`."""
    sessions = [create_session(path, threads=threads, spinning=False) for path in model_paths]
    rng = np.random.default_rng(0)
    feeds = [_feed(s, batch, seq, rng) for s in sessions]
    for session, feed in zip(sessions, feeds):
        for _ in range(WARMUP):
            session.run(None, feed)
    count = len(sessions)
    times: list[list[float]] = [[] for _ in sessions]
    deadline = time.perf_counter() + seconds
    rounds = 0
    while rounds < MIN_ROUNDS or time.perf_counter() < deadline:
        for offset in range(count):  # rotate the order so no model always runs right after another
            index = (rounds + offset) % count
            start = time.perf_counter()
            sessions[index].run(None, feeds[index])
            times[index].append(time.perf_counter() - start)
        rounds += 1
    base = np.array(times[0])
    results = []
    for series in times:
        paired = np.array(series) / base
        boot = np.median(rng.choice(paired, size=(500, len(paired)), replace=True), axis=1)
        results.append(LatencyRatio(float(np.median(paired)), float(np.percentile(boot, 2.5)),
                                    float(np.percentile(boot, 97.5)), float(np.median(series) * 1e3), rounds))
    return results
