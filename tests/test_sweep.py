"""optpipe sweep and optpipe report on a real Ray (2 CPUs): tiny models x cpu-fp32/cpu-int8, a missing model, a
rerun that reuses, a worker killed mid-job, Ctrl-C, an existing cluster started with `ray start`, the report."""

from __future__ import annotations

import html.parser
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests import models
from tests.test_cli import INTERRUPTED, default_sigint

pytest.importorskip("ray")
pytest.importorskip("matplotlib")

TARGETS = "cpu-fp32,cpu-int8"
QUICK = ["--num-cpus", "2", "--bench-seconds", "0.5"]


def optpipe(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "optpipe", *args], capture_output=True, text=True,
                          env=env or os.environ.copy(), timeout=timeout)


def records(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())["results"]


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "artifacts").iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep-models")
    models.tiny_bert(root / "tiny-bert")
    models.tiny_distilbert(root / "tiny-distilbert")
    return root


@pytest.fixture(scope="module")
def first_sweep(model_dir, tmp_path_factory):
    """2 tiny models x 2 targets, plus a model that does not exist: 4 jobs ok, 2 failed."""
    out = tmp_path_factory.mktemp("sweep") / "out"
    started = time.perf_counter()
    result = optpipe("sweep", str(model_dir / "tiny-bert"), str(model_dir / "tiny-distilbert"),
                     str(model_dir / "missing-model"), "--targets", TARGETS, "-o", str(out), *QUICK)
    return result, out, time.perf_counter() - started


def test_every_job_runs_and_a_failed_one_does_not_stop_the_others(first_sweep, model_dir):
    result, out, _ = first_sweep
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "[6/6]" in result.stderr and "4 ok, 2 failed" in result.stdout
    recs = records(out)
    assert [r["job"] for r in recs] == [f"{m}-{t}" for m in ("tiny-bert", "tiny-distilbert", "missing-model")
                                        for t in ("cpu-fp32", "cpu-int8")]
    ok, failed = recs[:4], recs[4:]
    for r in ok:
        assert r["status"] == "ok" and r["reused"] is False
        from optpipe import Artifact

        artifact = Artifact.load(r["artifact"])
        assert Path(r["artifact"]) == out / "artifacts" / r["job"] and artifact.verify() == []
        assert r["validation"]["mean_cosine"] >= r["thresholds"]["mean_cosine"] >= 0.99
        assert {"p50_ms", "p90_ms", "p99_ms", "mean_ms", "sequences_per_s"} <= set(r["bench"])
        assert 0 < r["bench"]["p50_ms"] <= r["bench"]["p99_ms"] and r["bench"]["sequences_per_s"] > 0
        assert [p["name"] for p in r["passes"]][:2] == ["export", "fuse"]
        assert all(p["seconds"] >= 0 for p in r["passes"]) and r["size"]["onnx_bytes"] > 0
        assert len(r["node"]) == 56 and r["seconds"] > 0 and r["machine"]["cores"] >= 1
        assert r["bench_isolation"]["mode"] == "exclusive-per-machine"
    assert ok[1]["passes"][-1]["name"] == "quantize" and ok[1]["size"]["onnx_bytes"] < ok[0]["size"]["onnx_bytes"]
    for r in failed:
        assert r["status"] == "failed" and r["model_name"] == "missing-model"
        assert "\n" not in r["error"] and "does not exist" in r["error"]
        assert f"{r['job']}: FAILED: " in result.stderr
    assert leftovers(out) == []


def test_a_rerun_reuses_ok_jobs_and_reruns_failed_ones(first_sweep, model_dir):
    _, out, _ = first_sweep
    before = {r["job"]: r for r in records(out)}
    models.tiny_bert(model_dir / "missing-model", seed=1)  # the missing model now exists
    result = optpipe("sweep", str(model_dir / "tiny-bert"), str(model_dir / "tiny-distilbert"),
                     str(model_dir / "missing-model"), "--targets", TARGETS, "-o", str(out), *QUICK)
    assert result.returncode == 0, result.stderr
    assert "(2 to run, 4 reused)" in result.stderr
    after = {r["job"]: r for r in records(out)}
    assert len(after) == 6 and all(r["status"] == "ok" for r in after.values())
    for job in ("tiny-bert-cpu-fp32", "tiny-bert-cpu-int8", "tiny-distilbert-cpu-fp32", "tiny-distilbert-cpu-int8"):
        assert after[job]["reused"] is True and after[job]["finished"] == before[job]["finished"]
    for job in ("missing-model-cpu-fp32", "missing-model-cpu-int8"):
        assert after[job]["reused"] is False and "error" not in after[job]


def test_a_killed_worker_is_retried_and_nothing_is_half_published(tiny_bert_dir, tmp_path, monkeypatch):
    from optpipe import Artifact
    from optpipe.sweep import sweep
    from optpipe.sweep.jobs import CRASH_ONCE_ENV

    markers = tmp_path / "markers"
    monkeypatch.setenv(CRASH_ONCE_ENV, str(markers))  # the embedded Ray's workers inherit it
    auth_before = os.environ.get("RAY_AUTH_MODE")
    lines: list[str] = []
    result = sweep([str(tiny_bert_dir)], ["cpu-fp32", "cuda-fp16"], tmp_path / "out", num_cpus=2, num_gpus=0,
                   bench_seconds=0.3, retries=1, progress=lines.append)
    assert result.exit_code == 1, lines
    record, gpu = result.records
    assert gpu["status"] == "failed" and "needs a GPU (CUDAExecutionProvider)" in gpu["error"]  # not left pending
    assert (markers / f"{record['job']}.crashed").is_file()  # the first attempt died in os._exit
    assert record["status"] == "ok" and record["reused"] is False
    assert any(".partial-" in name for name in record["cleaned_leftovers"])  # what the dead attempt left
    assert Artifact.load(record["artifact"]).verify() == []
    assert leftovers(tmp_path / "out") == []
    assert records(tmp_path / "out") == [record, gpu]
    assert os.environ.get("RAY_AUTH_MODE") == auth_before  # ray.init's token mode does not leak out of sweep()


def test_ctrl_c_leaves_valid_results_and_exits_130(model_dir, tmp_path):
    out = tmp_path / "out"
    # 2 CPUs per job: the jobs run one after the other, so the second is under way when the first is recorded
    proc = subprocess.Popen([sys.executable, "-m", "optpipe", "sweep", str(model_dir / "tiny-distilbert"),
                             "--targets", TARGETS, "-o", str(out), "--num-cpus", "2", "--cpus-per-job", "2",
                             "--bench-seconds", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if (out / "results.json").is_file() and records(out):
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode in INTERRUPTED, stderr
    assert "Traceback" not in stderr and "optpipe: error: interrupted: 1 of 2 jobs" in stderr
    data = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in data["results"]] == ["ok"] and "interrupted" in data["sweep"]


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.srcs, self.tags, self.data, self._in_data = [], [], set(), "", False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        self.ids.append(attrs.get("id", ""))
        self.srcs += [v for k, v in attrs.items() if k in ("src", "href") and v]
        self._in_data = attrs.get("id") == "optpipe-report-data"

    def handle_data(self, data):
        if self._in_data:
            self.data += data

    def handle_endtag(self, tag):
        self._in_data = False


def test_report_shows_every_point_and_a_valid_png(first_sweep, tiny_bert_dir, tmp_path):
    from PIL import Image

    from optpipe import optimize

    _, out, _ = first_sweep
    solo = optimize(str(tiny_bert_dir), "cpu-int8", tmp_path / "solo-int8", bench=True).path  # an artifact dir
    result = optpipe("report", str(out), str(solo), "-o", str(tmp_path / "rep" / "report.html"), timeout=120)
    assert result.returncode == 0, result.stderr
    page = _Page()
    page.feed((tmp_path / "rep" / "report.html").read_text())
    assert page.srcs == [] and "link" not in page.tags  # self-contained: nothing fetched
    points = json.loads(page.data)["points"]
    ok_jobs = {r["job"] for r in records(out) if r["status"] == "ok"}
    assert {p["job"] for p in points} == ok_jobs | {"solo-int8"}
    assert {f"point-{job}" for job in ok_jobs | {"solo-int8"}} <= set(page.ids)  # drawn in the inline SVG
    for model in {p["model"] for p in points}:
        assert any(p["pareto"] for p in points if p["model"] == model)
    assert all(p["metric"] == "mean_cosine" and p["p50_ms"] > 0 for p in points)
    text = (tmp_path / "rep" / "report.html").read_text()
    assert "exclusive-per-machine" in text and "optpipe run --bench" in text and "seconds per pass" in text
    png = tmp_path / "rep" / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.size[0] >= 600 and image.size[1] >= 400


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, seconds: float = 90) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"ray start did not listen on {port} within {seconds} s: {log.read_text()[-3000:]}")


def test_sweep_on_an_existing_cluster(model_dir, tmp_path):
    port = _free_port()
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))  # the cluster's token, as a user would set
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray = Path(sys.executable).with_name("ray")
    log = (tmp_path / "ray-start.log").open("w")
    head = subprocess.Popen([str(ray), "start", "--head", f"--port={port}", "--num-cpus=2",
                             "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats",
                             f"--temp-dir={temp_dir}", "--block"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        _wait_for_port(port, head, tmp_path / "ray-start.log")
        out = tmp_path / "out"
        result = optpipe("sweep", str(model_dir / "tiny-bert"), "--targets", "cpu-int8", "-o", str(out),
                         "--address", f"127.0.0.1:{port}", "--bench-seconds", "0.5", env=env)
        assert result.returncode == 0, result.stderr + (tmp_path / "ray-start.log").read_text()[-3000:]
        assert f"on the Ray cluster at 127.0.0.1:{port}" in result.stderr
        data = json.loads((out / "results.json").read_text())
        assert data["sweep"]["address"] == f"127.0.0.1:{port}" and data["sweep"]["cluster"]["CPU"] == 2
        (record,) = data["results"]
        assert record["status"] == "ok" and len(record["node"]) == 56
        assert head.poll() is None  # the sweep left the cluster running
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` drains and stops the processes it started
        try:
            head.wait(timeout=45)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # whatever of its session is left
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_without_ray_one_line_says_what_to_install(tmp_path):
    code = ("import sys; sys.modules['ray'] = None; from optpipe.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", code, "sweep", "some/model", "--targets", "cpu-int8", "-o",
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("optpipe: error:")]
    assert 'pip install "optpipe[sweep]"' in line


def test_plan_applies_grid_and_overrides_where_the_target_has_the_pass():
    from optpipe.sweep import plan_jobs

    jobs = plan_jobs(["org/enc", "./local/model"], ["cpu-int8", "cpu-int8-pruned"],
                     overrides=["quantize.per_channel=false"], grid=["prune.sparsity=0.2,0.4"])
    assert [j.name for j in jobs] == [f"{m}-{t}" for m in ("enc", "model") for t in (
        "cpu-int8", "cpu-int8-pruned-prune.sparsity-0.2", "cpu-int8-pruned-prune.sparsity-0.4")]
    first, pruned = jobs[0], jobs[1]
    assert first.model == "org/enc" and jobs[3].model == str(Path("./local/model").resolve())
    assert first.grid == () and first.overrides == ("quantize.per_channel=false",)
    assert pruned.grid == (("prune.sparsity", "0.2"),)
    assert pruned.target.pass_spec("prune").options["sparsity"] == 0.2
    assert pruned.target.pass_spec("quantize").options["per_channel"] is False
    assert pruned.target.name == "cpu-int8-pruned" and not pruned.needs_gpu
    assert plan_jobs(["m"], ["cuda-fp16"])[0].needs_gpu


def test_models_with_the_same_last_name_get_distinct_artifact_names():
    from optpipe.sweep.jobs import model_names

    names = model_names(["a/model", "b/model", "other"])
    assert names["other"] == "other" and len(set(names.values())) == 3
    assert all(names[m].startswith("model-") for m in ("a/model", "b/model"))


@pytest.mark.parametrize("kwargs,fragment", [
    ({"targets": ["cpu-int8"], "grid": ["prnue.sparsity=0.2"]}, "no target in this sweep has a 'prnue' pass"),
    ({"targets": ["cpu-int8"], "grid": ["prune.sparsity"]}, "expected PASS.KEY=V1,V2"),
    ({"targets": ["cpu-int8"], "overrides": ["nonsense"]}, "expected SECTION.KEY=VALUE"),
    ({"targets": ["gpu-int2"]}, "unknown target 'gpu-int2'"),
    ({"targets": []}, "at least one target"),
])
def test_plan_errors_are_one_line(kwargs, fragment):
    from optpipe.errors import OptpipeError
    from optpipe.sweep import plan_jobs

    with pytest.raises(OptpipeError, match=fragment.replace("[", r"\[").replace(".", r"\.")):
        plan_jobs(["m"], **kwargs)


def test_pareto_front():
    from optpipe.sweep.charts import pareto_front

    #            fast+bad   slow+good  dominated  equal-latency-worse  fastest-best
    pairs = [(1.0, 0.90), (3.0, 0.99), (3.5, 0.95), (1.0, 0.80), (0.5, 0.999)]
    assert pareto_front(pairs) == {4}
    assert pareto_front([(1.0, 0.90), (3.0, 0.99), (3.5, 0.95), (1.0, 0.80)]) == {0, 1}


def test_results_are_rewritten_atomically_and_reuse_needs_the_same_job(tmp_path):
    from optpipe.sweep import plan_jobs
    from optpipe.sweep.results import load_records, reusable, write_records

    job = plan_jobs(["org/model"], ["cpu-int8"])[0]
    artifact = tmp_path / "artifacts" / job.name
    artifact.mkdir(parents=True)
    (artifact / "manifest.json").write_text("{}")
    record = {**job.identity(), "status": "ok", "artifact": str(artifact), "host": socket.gethostname()}
    write_records(tmp_path, {job.name: record}, {"jobs": [job.name]})
    assert load_records(tmp_path) == {job.name: record}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifacts", "results.json"]  # no temp file left
    assert reusable(record, job)
    other = plan_jobs(["org/model"], ["cpu-int8"], overrides=["quantize.per_channel=false"])[0]
    assert not reusable(record, other)  # same name, other options: rerun
    assert not reusable({**record, "status": "failed"}, job)
    shutil.rmtree(artifact)
    assert not reusable(record, job)  # its artifact is gone from this host


def test_a_bench_waits_for_compiles_on_its_machine_unless_isolation_is_bench(tmp_path, monkeypatch):
    import threading

    from optpipe.sweep.lock import bench_slot, compile_slot

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # a lock of this test's own

    def bench_starts_within(isolation: str, seconds: float) -> bool:
        started = threading.Event()

        def bench():
            with bench_slot(isolation):
                started.set()

        with compile_slot(isolation):
            thread = threading.Thread(target=bench)
            thread.start()
            during = started.wait(seconds)
        thread.join(10)
        assert started.is_set()  # it ran once the compile let go
        return during

    assert not bench_starts_within("machine", 0.5)
    assert bench_starts_within("bench", 5)
