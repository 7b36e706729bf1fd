"""The pass cache: atomic entries shared by concurrent runs, damaged entries rebuilt, keys that hold only what a
pass reads (a new calibration file re-runs only the pass that calibrates)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from optpipe import optimize
from optpipe.cache import META


def _cached(artifact) -> dict[str, bool]:
    return {p["name"]: p["cached"] for p in artifact.manifest["passes"]}


def test_two_runs_started_together_on_an_empty_cache_both_publish(tiny_bert_dir, tmp_path):
    env = {**os.environ, "OPTPIPE_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    runs = [subprocess.Popen([sys.executable, "-m", "optpipe", "run", str(tiny_bert_dir), "-t", "cpu-int8",
                              "-o", str(tmp_path / name)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for name in ("a", "b")]
    for run in runs:
        out, err = run.communicate(timeout=600)
        assert run.returncode == 0, err
    for name in ("a", "b"):
        session = ort.InferenceSession(str(tmp_path / name / "model.onnx"), providers=["CPUExecutionProvider"])
        assert session.get_inputs()
        assert json.loads((tmp_path / name / "manifest.json").read_text())["validation"]["passed"]
    entries = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert sorted(p.name.split("-")[0] for p in entries) == ["export", "fuse", "quantize"]
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".staging")]


def test_a_damaged_cache_entry_is_rebuilt(tiny_bert_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("OPTPIPE_CACHE", str(tmp_path / "cache"))
    optimize(str(tiny_bert_dir), "cpu-int8", tmp_path / "a")
    fuse_entry = next((tmp_path / "cache").glob("fuse-*"))
    model = fuse_entry / "files" / "model.onnx"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])  # a truncated write
    with caplog.at_level("WARNING", logger="optpipe"):
        again = optimize(str(tiny_bert_dir), "cpu-int8", tmp_path / "b")
    assert "damaged" in caplog.text and "rebuilding" in caplog.text
    assert _cached(again) == {"export": True, "fuse": False, "quantize": True}  # keys chain on inputs, not bytes
    assert again.manifest["validation"]["passed"]
    rebuilt = next((tmp_path / "cache").glob("fuse-*"))
    assert json.loads((rebuilt / META).read_text())["hashes"]["model.onnx"]
    assert _cached(optimize(str(tiny_bert_dir), "cpu-int8", tmp_path / "c")) == {
        "export": True, "fuse": True, "quantize": True}


def test_a_new_calibration_file_reuses_export_and_fuse(tiny_bert_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OPTPIPE_CACHE", str(tmp_path / "cache"))
    texts = [f"calibration sentence number {i} about trains, rivers and small towns." for i in range(12)]
    first, second = tmp_path / "one.txt", tmp_path / "two.txt"
    first.write_text("\n".join(texts[:6]) + "\n")
    second.write_text("\n".join(texts[6:]) + "\n")
    a = optimize(str(tiny_bert_dir), "cpu-int8-static", tmp_path / "a", calibration=first)
    b = optimize(str(tiny_bert_dir), "cpu-int8-static", tmp_path / "b", calibration=second)
    assert not any(_cached(a).values())
    assert _cached(b) == {"export": True, "fuse": True, "quantize": False}
    assert b.manifest["passes"][-1]["report"]["components"]["model.onnx"]["calibration"]["size"] == 6


def test_cache_store_is_atomic_and_first_writer_wins(tmp_path, monkeypatch):
    from optpipe import cache

    monkeypatch.setenv("OPTPIPE_CACHE", str(tmp_path / "cache"))
    entry = cache.entry_path("fuse", "k" * 64)
    for value in ("first", "second"):
        out = tmp_path / value
        out.mkdir()
        (out / "model.onnx").write_text(value)
        stored = cache.store(entry, out, "onnx", ("model.onnx",), {"v": value}, 1.0)
        assert stored is not None and (stored.files_dir / "model.onnx").read_text() == "first"
    assert cache.load(entry).report == {"v": "first"}
    assert [p.name for p in Path(entry.parent).iterdir()] == [entry.name]


def test_the_task_is_part_of_the_key(tiny_bert_dir, tmp_path, monkeypatch):
    """A cached feature-extraction export must not be served to a text2text-generation run of the same weights."""
    from optpipe.errors import UnsupportedModelError

    monkeypatch.setenv("OPTPIPE_CACHE", str(tmp_path / "cache"))
    optimize(str(tiny_bert_dir), "cpu-int8", tmp_path / "a")
    with pytest.raises(UnsupportedModelError, match="text2text-generation"):
        optimize(str(tiny_bert_dir), "cpu-int8", tmp_path / "b", task="text2text-generation")


def test_clear_removes_only_what_optpipe_wrote(tmp_path, monkeypatch):
    """`optpipe cache clear` with OPTPIPE_CACHE pointed at a folder that holds other things keeps them."""
    from optpipe import cache

    root = tmp_path / "shared"
    monkeypatch.setenv("OPTPIPE_CACHE", str(root))
    (root / "notes").mkdir(parents=True)
    (root / "notes" / "keep.txt").write_text("mine")
    (root / "fuse-0123").mkdir()
    (root / "fuse-0123" / cache.META).write_text("{}")
    (root / ".staging-quantize-1-abc").mkdir()
    converted = root / "gguf" / ("ab" * 12 + "-transformers4.57-gguf0.17")
    converted.mkdir(parents=True)
    (converted / "model.safetensors").write_bytes(b"x" * 100)
    assert cache.clear() == 102
    assert sorted(p.name for p in root.iterdir()) == ["notes"] and (root / "notes" / "keep.txt").is_file()
    (root / "notes" / "keep.txt").unlink()
    (root / "notes").rmdir()
    cache.clear()
    assert not root.exists()  # nothing else lived there: the folder goes too
