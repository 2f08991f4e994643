"""Fixtures for the data tests that need a model: the trained tiny GLM-4 shared with tests/infer and tests/serve."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "infer"))
from tiny_trained import trained_tiny_glm4  # noqa: E402  (trained once, cached on disk)


@pytest.fixture(scope="session")
def trained_glm4_dir(tmp_path_factory, glm4_tokenizer_dir):
    return trained_tiny_glm4(tmp_path_factory.mktemp("trained"), glm4_tokenizer_dir)
