import json

import pytest

from optpipe.errors import ModelNotFoundError, UnsupportedModelError
from optpipe.source import BUNDLED_MODEL_ID, resolve_source


def test_bundled_model_resolves_offline():
    source = resolve_source(None)
    assert source.model_id == BUNDLED_MODEL_ID
    assert source.task == "feature-extraction" and source.model_type == "bert"
    assert (source.path / "model.safetensors").is_file()
    assert len(source.content_hash) == 64


def test_local_directory(tiny_bert_dir):
    source = resolve_source(str(tiny_bert_dir))
    assert source.path == tiny_bert_dir.resolve()
    assert source.task == "feature-extraction"
    assert source.content_hash == resolve_source(str(tiny_bert_dir)).content_hash


def test_task_override(tiny_bert_dir):
    assert resolve_source(str(tiny_bert_dir), task="fill-mask").task == "fill-mask"


def test_missing_directory(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_source(str(tmp_path / "nope"))


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_source(str(tmp_path))


def test_config_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ModelNotFoundError, match="no weights"):
        resolve_source(str(tmp_path))


def test_uninferable_task(tmp_path, tiny_bert_dir):
    config = json.loads((tiny_bert_dir / "config.json").read_text())
    config["architectures"] = ["BertSomethingOdd"]
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config))
    (model / "model.safetensors").write_bytes((tiny_bert_dir / "model.safetensors").read_bytes())
    with pytest.raises(UnsupportedModelError, match="--task"):
        resolve_source(str(model))


def _offline_cache(monkeypatch, cache):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))


def test_hub_id_not_cached_offline_is_a_clear_error(monkeypatch, tmp_path):
    # The real hub resolution path, offline, with an empty cache: it must say what to do.
    _offline_cache(monkeypatch, tmp_path)
    with pytest.raises(ModelNotFoundError, match="local cache"):
        resolve_source("some-org/some-model-that-is-not-cached")


def test_hub_id_resolves_from_local_cache(monkeypatch, tmp_path, tiny_bert_dir):
    # Lay the tiny model out as a hub cache snapshot; the normal transformers resolution must find it offline.
    repo = tmp_path / "models--acme--tiny-bert"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in tiny_bert_dir.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    _offline_cache(monkeypatch, tmp_path)
    source = resolve_source("acme/tiny-bert")
    assert source.model_id == "acme/tiny-bert" and source.path == snapshot


def test_hub_download_takes_what_transformers_loads():
    """The patterns optpipe hands snapshot_download: the top-level config, weights and tokenizer files; no other
    runtimes' weights, no subfolders, no training state."""
    from huggingface_hub.utils import filter_repo_objects

    from optpipe.source import _DOWNLOAD_PATTERNS, _IGNORE_PATTERNS

    repo = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
            "special_tokens_map.json", "openvino_model.bin", "openvino/openvino_model.bin", "onnx/model.onnx",
            "1_Pooling/config.json", "training_args.bin", "README.md", "tf_model.h5"]
    kept = list(filter_repo_objects(repo, allow_patterns=_DOWNLOAD_PATTERNS, ignore_patterns=_IGNORE_PATTERNS))
    assert kept == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                    "special_tokens_map.json"]
