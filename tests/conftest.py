"""Shared fixtures: models and artifacts are built once per test session, with a private pass cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import models


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Keep tests off the user's cache; passes are still cached within the session, as in real use."""
    path = tmp_path_factory.mktemp("optpipe-cache")
    old = os.environ.get("OPTPIPE_CACHE")
    os.environ["OPTPIPE_CACHE"] = str(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    yield path
    if old is None:
        os.environ.pop("OPTPIPE_CACHE", None)
    else:
        os.environ["OPTPIPE_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return models.tiny_bert(tmp_path_factory.mktemp("tiny-bert") / "model")


@pytest.fixture(scope="session")
def bundled_int8(tmp_path_factory):
    """The bundled all-MiniLM-L6-v2 through cpu-int8, once per session."""
    from optpipe import optimize

    return optimize(None, target="cpu-int8", output=tmp_path_factory.mktemp("bundled") / "int8")


@pytest.fixture(scope="session")
def bundled_fp32(tmp_path_factory):
    from optpipe import optimize

    return optimize(None, target="cpu-fp32", output=tmp_path_factory.mktemp("bundled") / "fp32")


# Architectures (issue 3): one tiny model per architecture and head, built once per session.
@pytest.fixture(scope="session")
def arch_dirs(tmp_path_factory):
    """Lazily built model dirs by name: arch_dirs("gpt2"), arch_dirs("roberta-token-classification") ..."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            arch, _, head = name.partition("-")
            builder = getattr(models, f"tiny_{arch}")
            path = tmp_path_factory.mktemp(name) / "model"
            built[name] = builder(path, head=head) if head else builder(path)
        return built[name]

    return get


@pytest.fixture(scope="session")
def slowed_pair(tiny_bert_dir, tmp_path_factory):
    """A tiny fp32 artifact and a copy with ~170 MFLOP of injected MatMul work (several times slower)."""
    from optpipe import optimize
    from optpipe.perf.slowdown import slowed_copy

    root = tmp_path_factory.mktemp("gate")
    fp32 = optimize(str(tiny_bert_dir), "cpu-fp32", root / "fp32").path
    return fp32, slowed_copy(fp32, root / "slow", matmuls=40)
