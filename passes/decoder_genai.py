"""genai_config.json for a graph written by decoder_graph: the schema onnxruntime-genai's model builder writes
(onnxruntime_genai/models/builders/base.py, make_genai_config, 0.18.0)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from optpipe.errors import UnsupportedModelError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                    "tokenizer.model", "merges.txt", "vocab.json", "added_tokens.json", "generation_config.json",
                    "config.json", "chat_template.jinja")


def _special_ids(config, generation, tokenizer) -> tuple[int, int | list[int], int]:
    def resolve(attribute):
        for source in (generation, config, tokenizer):
            value = getattr(source, attribute, None) if source is not None else None
            if value is not None:
                return value
        return None

    bos, eos, pad = resolve("bos_token_id"), resolve("eos_token_id"), resolve("pad_token_id")
    if eos is None:
        raise UnsupportedModelError("unsupported model: no eos_token_id in config.json, generation_config.json "
                                    "or the tokenizer; onnxruntime-genai needs one to stop")
    first_eos = eos[0] if isinstance(eos, list) else eos
    return (1 if bos is None else bos), eos, (first_eos if pad is None else pad)


def write_genai_config(model_dir: Path, out_dir: Path, onnx_name: str = "model.onnx") -> Path:
    """Write out_dir/genai_config.json (and copy the tokenizer files beside it) for the graph `onnx_name`."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = AutoConfig.from_pretrained(model_dir)
    try:
        generation = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        generation = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError):
        tokenizer = None
    bos, eos, pad = _special_ids(config, generation, tokenizer)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    context = getattr(config, "seq_length", None) or config.max_position_embeddings
    search_defaults = {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "repetition_penalty": 1.0,
                       "temperature": 1.0, "top_k": 50, "top_p": 1.0, "length_penalty": 1.0,
                       "no_repeat_ngram_size": 0, "diversity_penalty": 0.0}
    search = {key: (getattr(generation, key, None) if getattr(generation, key, None) is not None else default)
              for key, default in search_defaults.items()}
    genai = {
        "model": {
            "bos_token_id": bos,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": onnx_name,
                "head_size": head_dim,
                "hidden_size": config.hidden_size,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": config.num_attention_heads,
                "num_hidden_layers": config.num_hidden_layers,
                "num_key_value_heads": config.num_key_value_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": config.model_type,
            "vocab_size": config.vocab_size,
        },
        "search": {**search, "early_stopping": True, "max_length": context, "min_length": 0,
                   # GroupQueryAttention writes the new keys into the past buffer when both are one tensor
                   "past_present_share_buffer": True},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "genai_config.json"
    path.write_text(json.dumps(genai, indent=4) + "\n")
    for name in _TOKENIZER_FILES:
        if (model_dir / name).exists() and not (out_dir / name).exists():
            shutil.copy2(model_dir / name, out_dir / name)
    return path
