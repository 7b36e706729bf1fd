"""PyTorch reference calls feed only the inputs a model's forward takes (issue 12): a DistilBERT saved with a BERT
tokenizer, which emits token_type_ids, goes through `optpipe run` and publishes with validation passed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from optpipe.source import model_inputs
from tests import models


@pytest.fixture(scope="module")
def segment_distilbert(tmp_path_factory):
    """DistilBERT dirs by head, saved with a tokenizer that emits token_type_ids."""
    built = {}

    def get(head: str):
        if head not in built:
            built[head] = models.tiny_distilbert(tmp_path_factory.mktemp(f"distilbert-{head}") / "model", head=head,
                                                 segment_ids=True)
        return built[head]

    return get


def test_model_inputs_keeps_what_forward_takes():
    from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel

    enc = {"input_ids": np.ones((2, 3), np.int64), "token_type_ids": np.zeros((2, 3), np.int64),
           "attention_mask": np.ones((2, 3), np.int64)}
    tiny = {"vocab_size": 10, "max_position_embeddings": 8}
    distil = DistilBertModel(DistilBertConfig(dim=8, n_layers=1, n_heads=2, hidden_dim=8, **tiny))
    bert = BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8, **tiny))
    kept = model_inputs(distil, enc)
    assert set(kept) == {"input_ids", "attention_mask"}
    assert all(isinstance(v, torch.Tensor) for v in kept.values())
    assert set(model_inputs(bert, enc)) == set(enc)

    class TakesAll(torch.nn.Module):
        def forward(self, input_ids, **kwargs):
            return input_ids

    as_torch = {k: torch.from_numpy(v) for k, v in enc.items()}
    kept = model_inputs(TakesAll(), as_torch)
    assert set(kept) == set(enc) and kept["input_ids"] is as_torch["input_ids"]


@pytest.mark.parametrize("head,task,metric", [("base", "feature-extraction", "min_cosine"),
                                              ("sequence-classification", "text-classification", "top1_agreement")])
def test_distilbert_with_token_type_ids_tokenizer_publishes(segment_distilbert, tmp_path, head, task, metric):
    from transformers import AutoTokenizer

    model_dir = segment_distilbert(head)
    assert "token_type_ids" in AutoTokenizer.from_pretrained(model_dir)(["a text"])  # the case of issue 12
    out = tmp_path / "artifact"
    result = subprocess.run([sys.executable, "-m", "optpipe", "run", str(model_dir), "--target", "cpu-fp32",
                             "-o", str(out)], capture_output=True, text=True, env=os.environ.copy(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    validation = manifest["validation"]
    assert manifest["source"]["task"] == task
    assert validation["passed"] and not validation["failures"], validation
    assert validation["metrics"][metric] >= validation["thresholds"][metric]


def test_accuracy_scorer_on_distilbert_with_token_type_ids(segment_distilbert, tmp_path):
    """`optpipe tune --eval` scores the PyTorch classifier through the same helper."""
    from optpipe import optimize
    from optpipe.pipeline import ModelFiles
    from optpipe.source import resolve_source
    from optpipe.tune.evaluate import accuracy_scorer

    model_dir = segment_distilbert("sequence-classification")
    texts = ["The river rose after three days of rain.", "She sold the old piano to a school.", "A quiet street."]
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps({"text": t, "label": i % 3}) + "\n" for i, t in enumerate(texts * 2)))
    scorer = accuracy_scorer(resolve_source(str(model_dir)), eval_file)
    artifact = optimize(str(model_dir), target="cpu-fp32", output=tmp_path / "artifact")
    assert scorer.score(ModelFiles(artifact.path, "onnx", tuple(artifact.manifest["components"]))) == scorer.baseline
