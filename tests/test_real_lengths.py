"""The harness at real sentence lengths (issue 12): seq REAL_SEQ / "real" times a batch of held-out texts through
the artifact's own tokenizer, padded to the batch's longest, the same feed every round."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from optpipe.data.texts import calibration_texts, heldout_texts
from optpipe.errors import InvalidOptionError
from optpipe.perf.harness import open_artifact
from optpipe.perf.inputs import REAL_SEQ, parse_seqs, real_pick, real_texts, seq_name, workloads


@pytest.fixture(scope="module")
def fp32(tiny_bert_dir, tmp_path_factory):
    from optpipe import optimize

    return optimize(str(tiny_bert_dir), "cpu-fp32", tmp_path_factory.mktemp("real-lengths") / "fp32").path


@pytest.mark.parametrize("batch", [1, 4, 8])
def test_real_workload_feeds_the_tokenizer_output_of_held_out_texts(fp32, batch):
    from transformers import AutoTokenizer

    model = open_artifact(fp32, threads=1)
    [work] = workloads(fp32, model.sessions, batch, "real")
    texts = [real_texts()[i] for i in real_pick(real_texts(), batch)]
    expected = AutoTokenizer.from_pretrained(fp32)(texts, padding=True, truncation=True, max_length=512,
                                                   return_tensors="np")
    width = expected["input_ids"].shape[1]
    assert (work.name, work.label, work.batch, work.seq) == ("forward", "real", batch, width)
    assert set(work.feed) == {"input_ids", "attention_mask", "token_type_ids"}
    for name, value in work.feed.items():
        assert value.shape == (batch, width) and value.dtype == np.int64, name
        assert np.array_equal(value, expected[name]), name
    assert work.lengths == tuple(int(n) for n in expected["attention_mask"].sum(1)) and max(work.lengths) == width
    model.sessions[work.component].run(None, work.feed)
    # the same feed for the same shape (rounds reuse it; another call builds an equal one), REAL_SEQ or "real"
    [again] = workloads(fp32, model.sessions, batch, REAL_SEQ)
    assert all(np.array_equal(again.feed[k], v) for k, v in work.feed.items())


def test_real_pick_spreads_like_the_held_out_set():
    texts = real_texts()
    assert texts == heldout_texts() and len(texts) >= 64 and not set(texts) & set(calibration_texts())
    chars = sorted(len(t) for t in texts)
    [one] = real_pick(texts, 1)
    assert len(texts[one]) == chars[len(chars) // 2]  # batch 1 is the median text
    eight = real_pick(texts, 8)
    assert eight == sorted(eight) and len(set(eight)) == 8  # eight texts, in the set's order
    picked = sorted(len(texts[i]) for i in eight)
    assert picked[0] <= chars[len(chars) // 8] and picked[-1] >= chars[len(chars) * 7 // 8]  # short and long
    assert len(real_pick(texts, len(texts) + 5)) == len(texts) + 5  # larger than the set: texts repeat


def test_seq_values_for_the_command_line():
    assert parse_seqs("16, 128,real") == [16, 128, REAL_SEQ] and parse_seqs("REAL") == [REAL_SEQ]
    assert seq_name(REAL_SEQ) == "real" and seq_name(128) == "128"
    for bad in ("0", "-1", "1.5", "long", ""):
        with pytest.raises(InvalidOptionError):
            parse_seqs(bad)


def test_bare_onnx_without_tokenizer_gets_approximate_real_lengths(fp32, tmp_path):
    from optpipe.perf.harness import open_model

    shutil.copy(fp32 / "model.onnx", tmp_path / "model.onnx")
    model = open_model(tmp_path / "model.onnx", threads=1)
    [work] = workloads(tmp_path / "model.onnx", model.sessions, 4, REAL_SEQ)
    assert work.label == "real-approx" and work.feed["input_ids"].shape == (4, work.seq) == (4, max(work.lengths))
    model.sessions["model.onnx"].run(None, work.feed)


def test_compare_times_real_lengths(fp32):
    from optpipe import compare

    ratio = compare(fp32, fp32, seq=REAL_SEQ, batch=2, threads=1, seconds=1)
    assert ratio.rounds >= 2 and ratio.low <= ratio.ratio <= ratio.high


def test_bench_times_real_lengths_beside_padded(fp32):
    """Runs once optpipe/perf/harness.py's bench() takes "real" (its BenchRow carries the workload's label)."""
    from optpipe import bench
    from optpipe.perf.harness import BenchRow

    if "label" not in BenchRow.__dataclass_fields__:
        pytest.skip("bench() does not take seq 'real' yet (optpipe/perf/harness.py)")
    result = bench([fp32], [2], [16, "real"], threads=1, runs=3)
    padded, real = result.rows
    assert (padded.workload, padded.label, padded.seq) == ("forward", "", 16)
    [work] = workloads(fp32, open_artifact(fp32, threads=1).sessions, 2, REAL_SEQ)
    assert (real.workload, real.label, real.seq) == ("forward", "real", work.seq)
    assert result.settings["seqs"] == [16, "real"]


def test_a_seq_given_as_text_is_a_length(fp32):
    model = open_artifact(fp32, threads=1)
    [work] = workloads(fp32, model.sessions, 2, "24")
    assert (work.seq, work.label, work.feed["input_ids"].shape) == (24, "", (2, 24))
