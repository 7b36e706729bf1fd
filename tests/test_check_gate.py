"""optpipe check on a busy runner (issue 17): the measure (wall clock or the thread's CPU time), the sequential
verdict that stops once it is clear, the inconclusive status and --fail-inconclusive, decoders' decode workload,
and bench/neighbour.py's load generator. Real ONNX Runtime sessions on tiny artifacts; large effects only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from optpipe.errors import BaselineError, InvalidOptionError
from optpipe.perf import regress
from optpipe.perf import verdict as verdict_module
from optpipe.perf.regress import check, load_baseline, resolve_measure
from optpipe.perf.slowdown import slowed_copy
from optpipe.perf.verdict import verdict as judge
from tests.test_cli import optpipe

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture()
def baseline(slowed_pair, tmp_path):
    path = tmp_path / "ci" / "baseline.json"
    check(slowed_pair[0], path, update=True, threads=1, seconds=0.5)
    return path


def test_resolve_measure():
    assert resolve_measure("auto", 1) == ("cpu", None) and resolve_measure(None, 1) == ("cpu", None)
    assert resolve_measure("auto", 2) == ("wall", None) and resolve_measure("auto", None) == ("wall", None)
    assert resolve_measure("wall", 1) == ("wall", None) and resolve_measure("cpu", 1) == ("cpu", None)
    clock, why = resolve_measure("cpu", 2)
    assert clock == "wall" and "exactly 1 intra-op thread" in why and "threads 2" in why
    clock, why = resolve_measure("cpu", 1, ("CUDAExecutionProvider", "CPUExecutionProvider"))
    assert clock == "wall" and "CUDAExecutionProvider" in why  # GPU work is not the calling thread's CPU time
    with pytest.raises(InvalidOptionError, match="--measure"):
        resolve_measure("cycles", 1)


def test_cpu_time_with_one_thread_and_wall_clock_fallback(slowed_pair, baseline):
    data = load_baseline(baseline)
    assert data["settings"]["measure"] == "auto" and data["figures"]["measure"] == "cpu"
    one = check(slowed_pair[0], baseline, tolerance=0.25, seconds=0.5)  # threads 1: the baseline's
    assert one.measure == "cpu" and one.status == "ok" and not any("intra-op" in n for n in one.notes)
    assert one.candidate_ms > 0 and one.rounds >= 10 and one.noise_sd > 0 and one.halfwidth > 0
    two = check(slowed_pair[0], baseline, tolerance=0.25, seconds=0.5, threads=2, measure="cpu")
    assert two.measure == "wall" and two.mode == "interleaved"
    assert any("exactly 1 intra-op thread" in note and "wall clock instead" in note for note in two.notes)
    assert check(slowed_pair[0], baseline, tolerance=0.25, seconds=0.5, measure="wall").measure == "wall"


def test_slowed_copy_is_flagged_on_cpu_time_and_the_check_stops_early(slowed_pair, baseline, tmp_path):
    out_json, out_md = tmp_path / "v.json", tmp_path / "v.md"
    worse = optpipe("check", str(slowed_pair[1]), "--baseline", str(baseline), "--tolerance", "25%",
                    "--seconds", "30", "--json", str(out_json), "--markdown", str(out_md))
    assert worse.returncode == 3, worse.stdout + worse.stderr
    verdict = json.loads(out_json.read_text())
    assert verdict["status"] == "regression" and verdict["measure"] == "cpu" and verdict["ratio"]["low"] > 1.25
    assert verdict["stopped_early"] and verdict["looks"] >= 1 and verdict["seconds"] < 30 and verdict["budget_s"] == 30
    assert verdict["rounds"] == verdict["ratio"]["rounds"] and verdict["noise_sd"] > 0 and verdict["halfwidth"] > 0
    md = out_md.read_text()
    assert "| measure |" in md and "| cpu |" in md and "CPU time of the calling thread" in md
    assert "stopped early" in md and "log-ratio sd" in md
    # A clear ok stops early as well.
    same = check(slowed_pair[0], baseline, tolerance=0.25, seconds=30)
    assert same.status == "ok" and same.stopped_early and same.seconds < 30


def test_verdict_statuses_on_synthetic_samples():
    rng = np.random.default_rng(0)
    straddles = np.exp(rng.normal(np.log(1.01), 0.01, 2000))  # ratio 1.01 with about ±2%: cannot tell at 1%
    ratio, probability, status, code, message = judge(1.01, straddles, 500, 0.01, budget=20)
    assert (status, code) == ("inconclusive", 0) and ratio.low < 1.01 < ratio.high and 0.2 < probability < 0.8
    assert message.startswith("inconclusive: ") and "noise too high to judge within 20s" in message
    assert "rerun on a quieter runner or raise --seconds" in message
    assert judge(1.01, straddles, 500, 0.01, fail_inconclusive=True)[2:4] == ("inconclusive", 3)
    assert judge(1.1, straddles * 1.09, 500, 0.01)[2:4] == ("regression", 3)
    assert judge(0.95, straddles * 0.94, 500, 0.01, fail_inconclusive=True)[2:4] == ("ok", 0)


def test_inconclusive_exit_codes_through_the_cli(slowed_pair, baseline, tmp_path, monkeypatch, capsys):
    """The statistics are forced to straddle the limit (real sessions still run); the exit code and outputs."""
    from optpipe.cli.main import main

    wide = np.exp(np.random.default_rng(0).normal(np.log(1.01), 0.01, 2000))
    for module in (regress, verdict_module):  # the final verdict (regress) and the interim looks (verdict)
        monkeypatch.setattr(module, "ratio_distribution", lambda logs: (1.01, wide))  # recorded-figures mode
        monkeypatch.setattr(module, "t_distribution", lambda estimates: (1.01, wide))  # session epochs
    args = ["check", str(slowed_pair[0]), "--baseline", str(baseline), "--tolerance", "1%", "--seconds", "0.5"]
    assert main(args + ["--json", str(tmp_path / "v.json")]) == 0
    out = capsys.readouterr().out
    assert "optpipe check: inconclusive" in out and "inconclusive: ratio" in out and "not failing the job" in out
    verdict = json.loads((tmp_path / "v.json").read_text())
    assert verdict["status"] == "inconclusive" and verdict["exit_code"] == 0 and verdict["measure"] == "cpu"
    assert not verdict["stopped_early"]
    assert main(args + ["--fail-inconclusive", "--markdown", str(tmp_path / "v.md")]) == 3
    assert "--fail-inconclusive" in capsys.readouterr().out
    assert (tmp_path / "v.md").read_text().startswith("### optpipe check: inconclusive")


def test_recorded_figures_are_compared_on_their_own_clock(slowed_pair, tmp_path):
    path = tmp_path / "wall.json"
    updated = check(slowed_pair[0], path, update=True, threads=1, seconds=0.5, measure="wall")
    assert updated.measure == "wall" and load_baseline(path)["figures"]["measure"] == "wall"
    data = load_baseline(path)
    data["reference"]["path"] = "gone"
    path.write_text(json.dumps(data))
    result = check(slowed_pair[0], path, tolerance=0.25, seconds=0.5, measure="cpu")
    assert result.mode == "recorded" and result.measure == "wall"
    assert any("recorded figures are wall time" in note for note in result.notes)
    with pytest.raises(BaselineError, match="recorded figures are of the forward workload, not decode"):
        check(slowed_pair[0], path, seconds=0.5, workload="decode")
    del data["figures"]["measure"], data["settings"]["measure"]  # a baseline from before the measure setting
    path.write_text(json.dumps(data))
    assert check(slowed_pair[0], path, tolerance=0.25, seconds=0.5).measure == "wall"


def test_decoder_decode_workload_on_cpu_time(arch_dirs, tmp_path):
    """Decoders gate decode (one token against a KV cache; the default on --update) or, with --workload, prefill."""
    from optpipe import optimize

    art = optimize(str(arch_dirs("gpt2")), "cpu-fp32", tmp_path / "gpt2", pipeline="export").path
    slow = slowed_copy(art, tmp_path / "gpt2-slow", matmuls=40)
    path = tmp_path / "decoder.json"
    updated = check(art, path, update=True, threads=1, seconds=0.5, workload="decode")
    assert updated.workload == "decode" and updated.measure == "cpu"
    assert load_baseline(path)["settings"]["workload"] == "decode"
    same = check(art, path, tolerance=0.25, seconds=0.5)
    assert same.workload == "decode" and same.measure == "cpu" and same.status != "regression"
    worse = check(slow, path, tolerance=0.25, seconds=10)
    assert worse.workload == "decode" and worse.measure == "cpu" and worse.status == "regression"
    assert "tokens/s on this clock" in regress.markdown(worse, str(slow), str(path))
    assert check(art, path, tolerance=0.25, seconds=0.5, workload="prefill").workload == "prefill"
    with pytest.raises(InvalidOptionError, match="prefill, decode"):
        check(art, path, seconds=0.5, workload="forward")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_neighbours_start_and_stop(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from neighbour import neighbours

    with pytest.raises(KeyError), neighbours(2, settle=0.3) as procs:
        assert len(procs) == 2 and all(p.poll() is None for p in procs)
        assert all(psutil.Process(p.pid).num_threads() == 1 for p in procs)  # single-threaded workers
        pids = [p.pid for p in procs]
        raise KeyError("an error inside the block still stops them")
    assert all(p.returncode is not None for p in procs) and all(_gone(pid) for pid in pids)


def test_neighbour_worker_exits_when_its_parent_dies():
    """A study killed without cleanup leaves no orphan burning a core."""
    code = (f"import sys, time; sys.path.insert(0, {str(BENCH)!r}); from neighbour import start; "
            "print(start(1)[0].pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(parent.stdout.readline())
        time.sleep(0.5)
        assert not _gone(worker)
    finally:
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 20
    while not _gone(worker) and time.monotonic() < deadline:
        time.sleep(0.2)
    if not _gone(worker):
        os.kill(worker, signal.SIGKILL)
        pytest.fail("the neighbour worker outlived its parent")
