"""optpipe check, the CI gate: baselines, the decision, and its exit codes through the CLI (large effects only)."""

from __future__ import annotations

import json
import shutil

import pytest

from optpipe.perf.regress import check, fingerprint, load_baseline, parse_tolerance
from tests.test_cli import assert_one_line_error, optpipe

FAST = ["--seconds", "1.5"]


@pytest.fixture()
def baseline(slowed_pair, tmp_path):
    path = tmp_path / "ci" / "baseline.json"
    result = check(slowed_pair[0], path, update=True, threads=1, seconds=1.0)
    assert result.status == "updated" and result.exit_code == 0
    return path


def test_baseline_round_trip(slowed_pair, baseline):
    data = load_baseline(baseline)
    assert data["machine"]["cpu"] and data["machine"]["cores"] >= 1 and data["machine"]["threads"] == 1
    assert data["machine"]["onnxruntime"] and "torch" in data["machine"]["versions"]
    assert data["reference"]["sha256"] == fingerprint(slowed_pair[0]) and data["reference"]["target"] == "cpu-fp32"
    assert not data["reference"]["path"].startswith("/")  # relative to the baseline file: the repo can move
    assert (baseline.parent / data["reference"]["path"]).resolve() == slowed_pair[0].resolve()
    assert 0 < data["figures"]["p50_ms"] <= data["figures"]["p99_ms"] and data["settings"]["seq"] == 128


def test_same_artifact_passes_and_slower_one_fails(slowed_pair, baseline, tmp_path):
    fp32, slow = slowed_pair
    same = optpipe("check", str(fp32), "--baseline", str(baseline), "--tolerance", "25%", *FAST)
    assert same.returncode == 0, same.stdout + same.stderr
    assert "ok" in same.stdout and "interleaved" in same.stdout
    out_json, out_md = tmp_path / "v.json", tmp_path / "v.md"
    worse = optpipe("check", str(slow), "--baseline", str(baseline), "--tolerance", "25%", *FAST,
                    "--json", str(out_json), "--markdown", str(out_md))
    assert worse.returncode == 3, worse.stdout + worse.stderr  # a check failed
    assert "REGRESSION" in worse.stdout and "| artifact | baseline | mode |" in worse.stdout
    verdict = json.loads(out_json.read_text())
    assert verdict["status"] == "regression" and verdict["ratio"]["low"] > 1.25 and verdict["probability"] > 0.95
    assert out_md.read_text().startswith("### optpipe check: regression")


def test_update_makes_the_candidate_the_reference(slowed_pair, baseline):
    fp32, slow = slowed_pair
    result = optpipe("check", str(slow), "--baseline", str(baseline), "--update", "--seconds", "1")
    assert result.returncode == 0 and "updated" in result.stdout
    assert load_baseline(baseline)["reference"]["sha256"] == fingerprint(slow)
    faster = check(fp32, baseline, tolerance=0.25, seconds=1.5)
    assert faster.exit_code == 0 and faster.ratio.high < 1.0


def test_without_the_reference_same_machine_uses_the_recorded_figures(slowed_pair, baseline):
    data = load_baseline(baseline)
    data["reference"]["path"] = "gone"
    baseline.write_text(json.dumps(data))
    result = check(slowed_pair[1], baseline, tolerance=0.25, seconds=1.5)
    assert result.mode == "recorded" and result.exit_code == 3
    assert any("recorded figures" in note for note in result.notes)


def test_other_machine_class_cannot_judge(slowed_pair, baseline):
    data = load_baseline(baseline)
    data["machine"]["cpu"] = "Some Other CPU"
    baseline.write_text(json.dumps(data))
    # The reference is at hand: both are timed here, so the ratio is still fair (and the difference noted).
    judged = check(slowed_pair[0], baseline, tolerance=0.25, seconds=1.0)
    assert judged.mode == "interleaved" and any("Some Other CPU" in note for note in judged.notes)
    data["reference"]["path"] = "gone"
    baseline.write_text(json.dumps(data))
    result = optpipe("check", str(slowed_pair[0]), "--baseline", str(baseline), *FAST)
    assert result.returncode == 1  # bad input: this baseline cannot judge here
    assert_one_line_error(result, "cannot judge")


def test_missing_provider_is_exit_4_with_the_install_line(slowed_pair, baseline, tmp_path):
    gpu = tmp_path / "gpu"
    shutil.copytree(slowed_pair[0], gpu)
    manifest = json.loads((gpu / "manifest.json").read_text())
    manifest["target"]["provider"] = "CUDAExecutionProvider"
    (gpu / "manifest.json").write_text(json.dumps(manifest))
    result = optpipe("check", str(gpu), "--baseline", str(baseline))
    assert result.returncode == 4
    assert_one_line_error(result, "CUDAExecutionProvider is not available")
    assert "pip install" in result.stderr


def test_unusable_inputs_are_one_line(slowed_pair, baseline, tmp_path, capsys):
    """In-process through the CLI's main() (the exit codes above run as subprocesses; these need no timing)."""
    from optpipe.cli.main import main

    def run(*args: str) -> tuple[int, str]:
        code = main(list(args))
        err = capsys.readouterr().err
        assert "Traceback" not in err and len([l for l in err.splitlines() if l.startswith("optpipe: error:")]) == 1
        return code, err

    assert run("check", str(slowed_pair[0]), "--baseline", str(tmp_path / "none.json")) == (
        1, f"optpipe: error: baseline {tmp_path / 'none.json'} does not exist; record one with: optpipe check "
           f"ARTIFACT --baseline {tmp_path / 'none.json'} --update\n")
    (tmp_path / "bad.json").write_text("{not json")
    code, err = run("check", str(slowed_pair[0]), "--baseline", str(tmp_path / "bad.json"))
    assert code == 1 and "unreadable" in err
    code, err = run("check", str(slowed_pair[0]), "--baseline", str(baseline), "--tolerance", "lots")
    assert code == 1 and "--tolerance" in err
    corrupt = tmp_path / "corrupt"
    shutil.copytree(slowed_pair[0], corrupt)
    (corrupt / "manifest.json").write_text("garbage")
    code, err = run("check", str(corrupt), "--baseline", str(baseline))
    assert code == 1 and "unreadable or corrupt" in err


def test_parse_tolerance():
    assert parse_tolerance("5%") == pytest.approx(0.05) and parse_tolerance("0.1") == pytest.approx(0.1)
