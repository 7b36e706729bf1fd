"""optpipe tune on tiny models: the candidate table, the search's choice, the published winner, --eval and errors.

Speed is measured (short windows) but never asserted: only the search's consistency with its own measurements."""

from __future__ import annotations

import json

import pytest

from optpipe import Artifact, tune
from optpipe.errors import EvalDataError, TuningFailedError
from optpipe.tune.search import Recipe
from tests import models
from tests.test_cli import assert_one_line_error, optpipe

STATUSES = {"winner", "accepted", "rejected", "not evaluated", "failed"}


@pytest.fixture(scope="module")
def tuned(tiny_bert_dir, tmp_path_factory):
    return tune(str(tiny_bert_dir), max_loss=0.01, output=tmp_path_factory.mktemp("tune") / "tiny", seconds=1)


def test_every_candidate_is_in_the_table_with_a_verdict(tuned):
    table = tuned.artifact.manifest["tuning"]["candidates"]
    assert len(table) == len(tuned.candidates) >= 10  # 8 recipes + 2 reusing the sensitivity ranking
    assert {row["status"] for row in table} <= STATUSES
    assert [row["status"] for row in table].count("winner") == 1
    labels = {row["recipe"] for row in table}
    assert {"static qdq, sensitive float", "dynamic", "dynamic, unfused", "dynamic, per-tensor",
            "dynamic, sensitive float", "static qoperator, sensitive float"} <= labels
    for row in table:
        assert row["why"] and row["bytes"] > 0 and row["latency_ratio"] > 0
        assert row["ratio_low"] <= row["latency_ratio"] <= row["ratio_high"]


def test_winner_is_the_fastest_candidate_within_budget(tuned):
    winner = tuned.winner
    # built for the base target's ISA numerics (cpu-int8: portable, 7-bit weights), as every candidate was
    manifest = tuned.artifact.manifest
    assert manifest["target"]["isa"] == "portable" and "reduce_range=true" in manifest["pipeline"]
    assert winner.loss is not None and winner.loss <= 0.01
    # the full table: every candidate has a measured loss, and the verdict follows from it
    for c in tuned.candidates:
        assert c.loss is not None and c.score is not None
        assert (c.status == "rejected") == (c.loss > 0.01)
        assert c.loss == pytest.approx(1 - c.score, abs=1e-6)
    # fastest first: everything measured faster than the winner was rejected, every other accepted one is slower
    for c in tuned.candidates:
        if c.latency_ratio < winner.latency_ratio:
            assert c.status == "rejected"
        if c.status == "accepted":
            assert c.latency_ratio >= winner.latency_ratio and "slower than the winner" in c.why


def test_winner_is_published_like_run(tuned):
    art = Artifact.load(tuned.artifact.path)
    m = art.manifest
    assert m["pipeline"] == tuned.winner.pipeline and m["target"]["name"] == "cpu-int8-tuned"
    assert m["validation"]["passed"] and art.verify() == []
    assert m["tuning"]["max_loss"] == 0.01 and m["tuning"]["engine"] == "neural_compressor.common.base_tuning"
    assert abs(1 - m["validation"]["metrics"]["mean_cosine"] - tuned.winner.loss) < 1e-4


def test_impossible_budget_publishes_nothing(tiny_bert_dir, tmp_path):
    few = [Recipe("dynamic", True, {"mode": "dynamic"}), Recipe("static qdq", True, {"mode": "static", "op_types": ["MatMul"]})]
    with pytest.raises(TuningFailedError, match="no candidate recipe is within --max-loss 0.0"):
        tune(str(tiny_bert_dir), max_loss=0.0, output=tmp_path / "none", seconds=0.5, recipes=few)
    assert list(tmp_path.iterdir()) == []


def test_quick_leaves_slower_candidates_unscored(tiny_bert_dir, tmp_path):
    # Every candidate meets a budget of 0.9 (cosine >= 0.1), so the first one scored (the fastest measured) wins and a quick
    # search must not score the slower one.
    few = [Recipe("dynamic", True, {"mode": "dynamic"}), Recipe("dynamic, unfused", False, {"mode": "dynamic"})]
    result = tune(str(tiny_bert_dir), max_loss=0.9, output=tmp_path / "quick", seconds=0.5, recipes=few,
                  score_all=False)
    (other,) = [c for c in result.candidates if c.status != "winner"]
    assert other.latency_ratio >= result.winner.latency_ratio
    assert other.status == "not evaluated" and other.loss is None


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    return models.tiny_bert(tmp_path_factory.mktemp("tiny-cls") / "model", head="sequence-classification")


def test_eval_file_scores_classifier_accuracy(classifier_dir, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = [f"Sample number {i} talks about {'good' if i % 2 else 'bad'} things." for i in range(12)]
    tokenizer = AutoTokenizer.from_pretrained(classifier_dir)
    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    with torch.no_grad():
        predicted = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.argmax(-1).tolist()
    # 9 labels agree with the PyTorch model, 3 do not: its accuracy is 0.75; names and ids both accepted
    labels = [p if i >= 3 else (p + 1) % 3 for i, p in enumerate(predicted)]
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("\n".join(json.dumps({"text": t, "label": f"LABEL_{l}" if i % 2 else l})
                                   for i, (t, l) in enumerate(zip(texts, labels))))
    few = [Recipe("dynamic", True, {"mode": "dynamic"}), Recipe("static qdq", True, {"mode": "static", "op_types": ["MatMul"]})]
    result = tune(str(classifier_dir), max_loss=0.2, output=tmp_path / "cls", eval_file=eval_file, seconds=0.5,
                  recipes=few)
    tuning = result.artifact.manifest["tuning"]
    assert tuning["metric"] == "accuracy" and tuning["baseline"] == pytest.approx(0.75)
    assert result.winner.loss <= 0.2 and result.winner.score == pytest.approx(0.75 * (1 - result.winner.loss))


def test_eval_file_errors(classifier_dir, tiny_bert_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hello", "label": "LABEL_9"}\n')
    with pytest.raises(EvalDataError, match="unknown label 'LABEL_9'"):
        tune(str(classifier_dir), output=tmp_path / "a", eval_file=bad, seconds=0.5)
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "hello", "label": 0}\n')
    with pytest.raises(EvalDataError, match="task is 'feature-extraction'"):
        tune(str(tiny_bert_dir), output=tmp_path / "b", eval_file=good, seconds=0.5)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_prints_the_table_and_errors_in_one_line(tuned, tiny_bert_dir, tmp_path):
    # the fixture filled the pass cache: the CLI rebuilds nothing, it re-times and re-scores
    result = optpipe("tune", str(tiny_bert_dir), "--seconds", "0.5", "-o", str(tmp_path / "cli"))
    assert result.returncode == 0, result.stderr
    assert "latency/fp32" in result.stdout and "winner:" in result.stdout and "cpu-int8-tuned" in result.stdout
    assert (tmp_path / "cli" / "manifest.json").is_file()
    missing = optpipe("tune", str(tiny_bert_dir), "--eval", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "x"))
    assert_one_line_error(missing, "does not exist")
