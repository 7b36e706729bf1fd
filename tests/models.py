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


def bert_tokenizer(segment_ids: bool = True):
    """segment_ids=False: no token_type_ids, as DistilBERT's, RoBERTa's and generators' own tokenizers do."""
    from transformers import AutoTokenizer

    if segment_ids:
        return AutoTokenizer.from_pretrained(bundled_model_dir())
    return AutoTokenizer.from_pretrained(bundled_model_dir(), model_input_names=["input_ids", "attention_mask"])


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


def _special_ids(tokenizer) -> dict[str, int]:
    """The BERT WordPiece vocabulary has no bos/eos: [CLS] starts, [SEP] ends, [PAD] pads (id 0)."""
    return {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.cls_token_id,
            "eos_token_id": tokenizer.sep_token_id}


def _encoder(path: Path, config_cls: str, base: str, seq: str, tok: str, head: str, seed: int,
             segment_ids: bool = False, **kwargs) -> Path:
    import transformers

    torch.manual_seed(seed)
    tokenizer = bert_tokenizer(segment_ids=segment_ids)
    config = getattr(transformers, config_cls)(vocab_size=tokenizer.vocab_size, num_labels=3, **kwargs)
    cls = {"base": base, "sequence-classification": seq, "token-classification": tok}[head]
    model = getattr(transformers, cls)(config)
    _spread_weights(model)
    return _save(model, tokenizer, path)


def tiny_distilbert(path: Path, head: str = "base", seed: int = 0, segment_ids: bool = False) -> Path:
    """A 2-layer DistilBERT (dim 64, 4 heads). segment_ids=True saves it with a tokenizer that emits token_type_ids
    (a BERT tokenizer saved beside DistilBERT weights, common on the Hub), which its forward does not take."""
    return _encoder(path, "DistilBertConfig", "DistilBertModel", "DistilBertForSequenceClassification",
                    "DistilBertForTokenClassification", head, seed, segment_ids, dim=64, n_layers=2, n_heads=4,
                    hidden_dim=128, max_position_embeddings=256, pad_token_id=0)


def tiny_roberta(path: Path, head: str = "base", seed: int = 0) -> Path:
    """A 2-layer RoBERTa (hidden 64, 4 heads). Positions start after padding_idx, hence max_position + 2."""
    return _encoder(path, "RobertaConfig", "RobertaModel", "RobertaForSequenceClassification",
                    "RobertaForTokenClassification", head, seed, hidden_size=64, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=128, max_position_embeddings=258, type_vocab_size=1,
                    pad_token_id=0)


def tiny_electra(path: Path, head: str = "base", seed: int = 0) -> Path:
    """A 2-layer ELECTRA discriminator (hidden 64, 4 heads; embedding size = hidden, so no projection)."""
    return _encoder(path, "ElectraConfig", "ElectraModel", "ElectraForSequenceClassification",
                    "ElectraForTokenClassification", head, seed, True, embedding_size=64, hidden_size=64,
                    num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, max_position_embeddings=256,
                    pad_token_id=0)


def tiny_mpnet(path: Path, head: str = "base", seed: int = 0) -> Path:
    """A 2-layer MPNet (hidden 64, 4 heads): relative position buckets in attention, no token_type_ids;
    all-mpnet-base-v2's architecture. Positions start after padding_idx, hence max_position + 2."""
    return _encoder(path, "MPNetConfig", "MPNetModel", "MPNetForSequenceClassification",
                    "MPNetForTokenClassification", head, seed, hidden_size=64, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=128, max_position_embeddings=258, pad_token_id=0)


def tiny_albert(path: Path, head: str = "base", seed: int = 0) -> Path:
    """A 2-layer ALBERT (hidden 64, 4 heads, embeddings 32 projected up): one set of layer weights shared by
    both layers."""
    return _encoder(path, "AlbertConfig", "AlbertModel", "AlbertForSequenceClassification",
                    "AlbertForTokenClassification", head, seed, True, embedding_size=32, hidden_size=64,
                    num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, max_position_embeddings=256,
                    pad_token_id=0)


def _fit(model, tokenizer, steps: int) -> None:
    """A few hundred Adam steps on the calibration texts (never the validation texts).

    An untrained generator's next-token logits are nearly flat (top-1/top-2 gap ~0.1 for a logit std of 0.8), so
    any INT8 noise flips its argmax and agreement says nothing. Trained models are peaky; so is this one after
    fitting, which makes the INT8 next-token and greedy checks test the quantizer rather than the tie-breaking.
    """
    from optpipe.data.texts import calibration_texts

    texts = list(calibration_texts())
    enc = tokenizer(texts, padding=True, truncation=True, max_length=24, return_tensors="pt",
                    return_token_type_ids=False)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        pick = torch.randperm(len(texts), generator=generator)[:8]  # small batches: 2 cores, 30k-token vocab
        optimizer.zero_grad()
        model(input_ids=enc["input_ids"][pick], attention_mask=enc["attention_mask"][pick],
              labels=labels[pick]).loss.backward()
        optimizer.step()
    model.eval()


def _generator(model, tokenizer, path: Path, std: float, steps: int = 0) -> Path:
    from transformers import GenerationConfig

    _spread_weights(model, std)
    if steps:
        _fit(model, tokenizer, steps)
    ids = _special_ids(tokenizer)
    model.generation_config = GenerationConfig(**ids, decoder_start_token_id=model.config.decoder_start_token_id
                                               if model.config.is_encoder_decoder else None)
    return _save(model, tokenizer, path)


def tiny_gpt2(path: Path, seed: int = 0, std: float = 0.05, steps: int = 30) -> Path:
    """A 2-layer GPT-2 (n_embd 64, 4 heads; lm_head tied to the embeddings, as GPT-2 always is)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    tokenizer = bert_tokenizer(segment_ids=False)
    config = GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                        **_special_ids(tokenizer))
    return _generator(GPT2LMHeadModel(config), tokenizer, path, std, steps)


def tiny_llama(path: Path, seed: int = 0, std: float = 0.05, steps: int = 30) -> Path:
    """A 2-layer Llama (hidden 64, 4 query heads / 2 kv heads: grouped-query attention, RMSNorm, rotary)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = bert_tokenizer(segment_ids=False)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False, **_special_ids(tokenizer))
    return _generator(LlamaForCausalLM(config), tokenizer, path, std, steps)


def tiny_t5(path: Path, seed: int = 0, std: float = 0.05, steps: int = 30) -> Path:
    """A 2+2-layer T5 (d_model 64, 4 heads). T5 starts decoding from the pad token."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = bert_tokenizer(segment_ids=False)
    ids = _special_ids(tokenizer)
    config = T5Config(vocab_size=tokenizer.vocab_size, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                      num_decoder_layers=2, num_heads=4, decoder_start_token_id=ids["pad_token_id"],
                      tie_word_embeddings=False, **ids)
    return _generator(T5ForConditionalGeneration(config), tokenizer, path, std, steps)


def tiny_bart(path: Path, seed: int = 0, std: float = 0.05, steps: int = 30) -> Path:
    """A 2+2-layer BART (d_model 64, 4 heads), decoding from eos as BART does."""
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = bert_tokenizer(segment_ids=False)
    ids = _special_ids(tokenizer)
    config = BartConfig(vocab_size=tokenizer.vocab_size, d_model=64, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                        decoder_ffn_dim=128, max_position_embeddings=256, decoder_start_token_id=ids["eos_token_id"],
                        forced_eos_token_id=None, **ids)
    return _generator(BartForConditionalGeneration(config), tokenizer, path, std, steps)


def tiny_ctrl(path: Path, seed: int = 0) -> Path:
    """A 1-layer CTRL: a real Transformers causal LM that optimum-onnx 0.1.0 has no ONNX export config for."""
    from transformers import CTRLConfig, CTRLLMHeadModel

    torch.manual_seed(seed)
    tokenizer = bert_tokenizer(segment_ids=False)
    config = CTRLConfig(vocab_size=tokenizer.vocab_size, n_embd=32, n_layer=1, n_head=2, dff=64, n_positions=64)
    return _save(CTRLLMHeadModel(config), tokenizer, path)


def tiny_qwen2(path: Path, seed: int = 0, std: float = 0.05, steps: int = 30) -> Path:
    """A 2-layer Qwen2 (hidden 64, 4 query heads / 2 kv heads, q/k/v biases; lm_head tied to the embeddings)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    tokenizer = bert_tokenizer(segment_ids=False)
    config = Qwen2Config(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True, **_special_ids(tokenizer))
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # the default init leaves biases at zero, which would not test them
        for name, param in model.named_parameters():
            if name.endswith("proj.bias"):
                param.normal_(0.0, 0.5)
    return _generator(model, tokenizer, path, std, steps)


def tiny_mistral(path: Path, seed: int = 0, std: float = 0.05, steps: int = 30, sliding_window: int = 6) -> Path:
    """A 2-layer Mistral (hidden 64, 4 query heads / 2 kv heads) whose sliding window is shorter than the texts."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    tokenizer = bert_tokenizer(segment_ids=False)
    config = MistralConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=256, sliding_window=sliding_window, tie_word_embeddings=False,
                           **_special_ids(tokenizer))
    return _generator(MistralForCausalLM(config), tokenizer, path, std, steps)
