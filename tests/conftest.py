"""Shared fixtures: real tokenizer folders from ../shared/data, offline hub, small tmp dirs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GLMTUNE_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_dir(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not found (set GLMTUNE_SHARED_DATA to the shared/data folder)")
    return path


@pytest.fixture(scope="session")
def glm4_tokenizer_dir() -> Path:
    return shared_dir("glm4-tokenizer")


@pytest.fixture(scope="session")
def chatglm3_tokenizer_dir() -> Path:
    return shared_dir("chatglm3-tokenizer")


@pytest.fixture(scope="session")
def chatglm2_tokenizer_dir() -> Path:
    return shared_dir("chatglm2-tokenizer")


@pytest.fixture(scope="session")
def tiny_vl_dir(tmp_path_factory) -> Path:
    """A tiny random vision-language folder (LLaVA: Qwen2 text + SigLIP 384 px, processor, tokenizer)."""
    from glmtune.models.tiny import build_tiny_vl
    return build_tiny_vl(tmp_path_factory.mktemp("vl") / "tiny-vl")

