"""Real pretrained models from the `real` extra (pip install -e ".[real]"), imported once per session.

These tests are opt-in (`pytest -m real_model tests/real`); each model fixture skips with the install
command when its PyPI package is missing, so the suite also runs on a machine with only one of them.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from glmtune.errors import GlmtuneError


def packaged(name: str) -> list[Path]:
    from glmtune.models.gguf import find_packaged_gguf

    try:
        return find_packaged_gguf(name)
    except GlmtuneError as e:
        pytest.skip(str(e))


def _import(name: str, tmp_path_factory) -> tuple[Path, object]:
    from glmtune.models.gguf import import_gguf

    out = tmp_path_factory.mktemp("real") / name
    # fp32: CPU matmuls are fastest in fp32, and greedy comparisons need no bf16 rounding ties.
    report = import_gguf(packaged(name), out, dtype="fp32")
    return out, report


@pytest.fixture(scope="session")
def smollm2_import(tmp_path_factory):
    return _import("smollm2", tmp_path_factory)


@pytest.fixture(scope="session")
def qwen_coder_import(tmp_path_factory):
    return _import("qwen2.5-coder-0.5b", tmp_path_factory)


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_import) -> Path:
    return smollm2_import[0]


@pytest.fixture(scope="session")
def qwen_coder_dir(qwen_coder_import) -> Path:
    return qwen_coder_import[0]


@pytest.fixture(scope="session")
def packaged_gguf():
    """`packaged_gguf(name)` -> the GGUF path(s) of an installed model, or skip with the install hint."""
    return packaged


@pytest.fixture(scope="session")
def read_meta():
    return lambda model_dir: json.loads((Path(model_dir) / "glmtune.json").read_text())
