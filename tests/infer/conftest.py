"""Fixtures for inference tests: a trained tiny GLM-4, a random one, and how to run the CLI."""
from __future__ import annotations

import sys

import pytest

from tiny_trained import trained_tiny_glm4


@pytest.fixture(scope="session")
def trained_glm4_dir(tmp_path_factory, glm4_tokenizer_dir):
    return trained_tiny_glm4(tmp_path_factory.mktemp("trained"), glm4_tokenizer_dir)


@pytest.fixture(scope="session")
def trained_predictor(trained_glm4_dir):
    from glmtune import Predictor
    return Predictor(trained_glm4_dir, max_new_tokens=24)


@pytest.fixture(scope="session")
def random_glm4_dir(tmp_path_factory, glm4_tokenizer_dir):
    from glmtune.models.tiny import build_tiny_glm4
    return build_tiny_glm4(tmp_path_factory.mktemp("random") / "tiny-glm4", glm4_tokenizer_dir, seed=1)


@pytest.fixture(scope="session")
def glmtune_cmd():
    """The real entry point, as a user runs it."""
    return [sys.executable, "-m", "glmtune"]
