"""Calibration texts from each file format and the built-in set; bad files give one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from optpipe.data.calibration import builtin_set, graph_input_names, load_calibration, tokenized_batches
from optpipe.errors import CalibrationDataError
from optpipe.data.texts import validation_texts
from tests.models import bert_tokenizer
from tests.test_cli import assert_one_line_error, optpipe

TEXTS = ["The first calibration sentence.", "Ein zweiter Satz, mit Umlauten: äöü.", "A third, \"quoted\" one."]


def test_txt_one_text_per_line_skips_blank_lines(tmp_path):
    path = tmp_path / "cal.txt"
    path.write_text("\n".join([TEXTS[0], "", TEXTS[1], "   ", TEXTS[2]]) + "\n", encoding="utf-8")
    chosen = load_calibration(path)
    assert chosen.texts == tuple(TEXTS) and chosen.origin == str(path)
    assert len(chosen.sha256) == 64 and chosen.to_json()["size"] == 3


def test_jsonl_text_field_and_named_field(tmp_path):
    path = tmp_path / "cal.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "body": t.upper(), "id": i}) for i, t in enumerate(TEXTS)))
    assert load_calibration(path).texts == tuple(TEXTS)
    named = load_calibration(f"{path}:body")
    assert named.texts == tuple(t.upper() for t in TEXTS) and named.origin.endswith("cal.jsonl:body")
    assert named.sha256 != load_calibration(path).sha256


def test_every_calibrating_pass_reads_the_named_column(tmp_path, monkeypatch):
    """--calibration FILE.jsonl:FIELD reaches pruning and weight-only sensitivity too, not only quantize."""
    from optpipe.api import check_calibration
    from optpipe.passbase import PassContext
    from optpipe.passes.prune_strategies import calibration_texts

    path = tmp_path / "cal.jsonl"
    path.write_text("\n".join(json.dumps({"body": t}) for t in TEXTS))
    monkeypatch.chdir(tmp_path)
    spec, column = check_calibration("cal.jsonl:body")
    assert spec == f"{path}:body" and column == "body"
    ctx = PassContext(source=None, target=None, out_dir=tmp_path, progress=print, calibration=spec)
    assert calibration_texts(ctx) == tuple(TEXTS)


def test_csv_default_and_named_column(tmp_path):
    import csv

    path = tmp_path / "cal.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "text", "review"])
        for i, t in enumerate(TEXTS):
            writer.writerow([i, t, f"review {i}: {t}"])
    assert load_calibration(path).texts == tuple(TEXTS)  # commas and quotes survive CSV quoting
    assert load_calibration(f"{path}:review").texts[0] == f"review 0: {TEXTS[0]}"
    assert load_calibration(path, column="review").texts[2].startswith("review 2")


def test_limit_and_builtin_set_distinct_from_validation():
    builtin = builtin_set()
    assert builtin.origin == "built-in" and len(builtin.texts) >= 16
    assert not set(builtin.texts) & set(validation_texts())
    limited = load_calibration(None, limit=5)
    assert limited.texts == builtin.texts[:5] and limited.sha256 != builtin.sha256


@pytest.mark.parametrize("name,content,fragment", [
    ("missing.txt", None, "does not exist"),
    ("empty.txt", "\n  \n", "has no texts"),
    ("wrong.csv", "id,body\n1,hello\n", "no column 'text' (columns: id, body)"),
    ("nofield.jsonl", '{"body": "hello"}\n', "line 1: no 'text' field"),
    ("broken.jsonl", '{"text": "ok"}\n{not json\n', "line 2: not valid JSON"),
    ("latin1.txt", "caf\xe9 cr\xe8me\n".encode("latin-1"), "is not UTF-8 text"),
    ("data.parquet", "x", "unsupported format"),
])
def test_bad_files_are_one_line_errors(tmp_path, name, content, fragment):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(CalibrationDataError) as err:
        load_calibration(path)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_unreadable_file(tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    path = tmp_path / "locked.txt"
    path.write_text("text\n")
    path.chmod(0)
    with pytest.raises(CalibrationDataError, match="cannot be read"):
        load_calibration(path)


def test_batches_cycle_sequence_lengths_and_feed_graph_inputs(tiny_bert_dir, tmp_path):
    from optpipe import optimize

    art = optimize(str(tiny_bert_dir), "cpu-fp32", tmp_path / "fp32")
    names = graph_input_names(art.path / "model.onnx")
    batches = tokenized_batches(builtin_set().texts, bert_tokenizer(), names, batch_size=4)
    assert [b["input_ids"].shape[1] for b in batches[:5]] == [16, 32, 64, 128, 16]
    assert all(set(b) == set(names) and b["input_ids"].dtype == np.int64 for b in batches)
    assert batches[3]["attention_mask"][:, -1].sum() == 0  # long batches are padded
    import onnxruntime as ort

    session = ort.InferenceSession(str(art.path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, batches[1])[0].shape[:2] == (4, 32)


@pytest.mark.parametrize("content,suffix,spec_suffix,fragment", [
    ("", ".txt", "", "has no texts"),
    ("id,body\n1,hello\n", ".csv", ":review", "no column 'review'"),
])
def test_cli_bad_calibration_file_fails_before_any_work(tiny_bert_dir, tmp_path, content, suffix, spec_suffix,
                                                         fragment):
    path = tmp_path / f"cal{suffix}"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "art"
    result = optpipe("run", str(tiny_bert_dir), "-t", "cpu-int8-static", "-o", str(out),
                     "--calibration", f"{path}{spec_suffix}")
    assert_one_line_error(result, fragment)
    assert "[1/3] export" not in result.stderr and not out.exists()
