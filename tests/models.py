"""Tiny real models built from transformers configs with random weights (fixed seed), saved with a tokenizer.

The tokenizer is the bundled MiniLM's WordPiece vocabulary, so inputs are real tokenized text; the model's
vocab_size matches it. Weights are scaled up from the default init so outputs are not near-constant.
"""

from __future__ import annotations

from pathlib import Path

import torch

from optpipe.source import bundled_model_dir


def _save(model, tokenizer, path: Path) -> Path:
    model.eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _spread_weights(model, std: float = 0.08) -> None:
    """The default 0.02 init makes tiny random encoders collapse to near-identical outputs."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, std)


def bert_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundled_model_dir())


def tiny_bert(path: Path, head: str = "base", seed: int = 0) -> Path:
    """A 2-layer BERT (hidden 64, 4 heads): head is 'base', 'sequence-classification' or 'token-classification'."""
    from transformers import (BertConfig, BertForSequenceClassification, BertForTokenClassification, BertModel)

    torch.manual_seed(seed)
    tokenizer = bert_tokenizer()
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=256, num_labels=3)
    cls = {"base": BertModel, "sequence-classification": BertForSequenceClassification,
           "token-classification": BertForTokenClassification}[head]
    model = cls(config)
    _spread_weights(model)
    return _save(model, tokenizer, path)
