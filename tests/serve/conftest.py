"""Fixtures for serving tests: the trained tiny GLM-4 (shared with tests/infer) and live servers."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "infer"))
from tiny_trained import trained_tiny_glm4  # noqa: E402  (one module, so the model is trained once)

from live_server import LiveServer, free_port  # noqa: E402,F401  (the serve tests import them from here)

API_KEY = "sk-glmtune-test"


@pytest.fixture(scope="session")
def trained_glm4_dir(tmp_path_factory, glm4_tokenizer_dir):
    return trained_tiny_glm4(tmp_path_factory.mktemp("trained"), glm4_tokenizer_dir)
