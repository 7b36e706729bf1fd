"""The CLI as a user runs it: a subprocess, its output, its exit code, and what it leaves on disk."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def optpipe(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "optpipe", *args], capture_output=True, text=True,
                          cwd=cwd, env=os.environ.copy(), timeout=600)


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("optpipe: error:")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr


def test_targets_lists_descriptions_and_recipes():
    result = optpipe("targets")
    assert result.returncode == 0
    assert "cpu-int8" in result.stdout and "cpu-fp32" in result.stdout
    assert "export,fuse{flavor=cpu},quantize{" in result.stdout


def test_run_bundled_model_default_output(bundled_int8, tmp_path):
    # The fixture filled the pass cache; the CLI run reuses it and still validates and publishes.
    result = optpipe("run", "--target", "cpu-int8", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out" / "all-MiniLM-L6-v2-cpu-int8"
    assert (out / "model.onnx").is_file() and (out / "manifest.json").is_file()
    for line in ("[1/3] export", "[2/3] fuse", "[3/3] quantize", "validating"):
        assert line in result.stderr
    assert "mean_cosine" in result.stdout and "passed" in result.stdout and str(out) in result.stdout
    assert "SkipLayerNormalization 12" in result.stdout


def test_run_with_set_and_output(tiny_bert_dir, tmp_path):
    out = tmp_path / "art"
    result = optpipe("run", str(tiny_bert_dir), "-t", "cpu-int8", "-o", str(out), "--set", "quantize.per_channel=false")
    assert result.returncode == 0, result.stderr
    assert "per_channel=false" in result.stdout


@pytest.mark.parametrize("args,fragment", [
    (["run", "--target", "gpu-int2"], "unknown target 'gpu-int2'; known targets:"),
    (["run", "/nonexistent/model", "--target", "cpu-int8"], "does not exist"),
    (["run", "--target", "cpu-int8", "--set", "quantize.mode=fancy"], "quantize.mode"),
    (["run", "--pipeline", "quantize,export"], "needs a 'onnx' model"),
])
def test_user_errors_are_one_line(args, fragment, tmp_path):
    assert_one_line_error(optpipe(*args, cwd=tmp_path), fragment)


def test_not_a_model_directory(tmp_path):
    assert_one_line_error(optpipe("run", str(tmp_path)), "no config.json")


def test_existing_output_refused(tiny_bert_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert_one_line_error(optpipe("run", str(tiny_bert_dir), "-o", str(tmp_path / "taken")), "--overwrite")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output(tiny_bert_dir, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert_one_line_error(optpipe("run", str(tiny_bert_dir), "-o", str(locked / "art")), "not writable")


def test_output_under_a_file_is_refused(tiny_bert_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    assert_one_line_error(optpipe("run", str(tiny_bert_dir), "-o", str(tmp_path / "file" / "art")), "cannot create")


def test_failed_validation_exit_code_and_nothing_published(tiny_bert_dir, tmp_path):
    out = tmp_path / "art"
    result = optpipe("run", str(tiny_bert_dir), "-o", str(out), "--set", "validate.max_abs_diff=0")
    assert result.returncode == 3
    assert_one_line_error(result, "validation failed")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_debug_shows_the_traceback(tmp_path):
    result = optpipe("--debug", "run", "--target", "nope", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_ctrl_c_during_a_pass_leaves_nothing(tiny_bert_dir, tmp_path):
    out = tmp_path / "art"
    proc = subprocess.Popen([sys.executable, "-m", "optpipe", "run", str(tiny_bert_dir), "-o", str(out),
                             "--no-cache"], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=os.environ.copy())
    deadline = time.monotonic() + 300
    for line in proc.stderr:  # interrupt once the export pass has started
        if "[1/3] export" in line or time.monotonic() > deadline:
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []
