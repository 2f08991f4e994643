"""Fixtures for training tests: one tiny GLM-4-shaped model (hidden 64, 2 layers, real tokenizer)
per session, a 20-conversation dataset, and a config builder."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

# 20 short, distinct question/answer pairs: small enough to memorise in a few dozen steps.
KEYS = ["red", "blue", "green", "black", "white", "pink", "gold", "gray", "brown", "orange",
        "cat", "dog", "horse", "bird", "fish", "sheep", "mouse", "wolf", "bear", "duck"]
# One distinct single-token key word per question (digits split into several tokens and are slower to learn).
QA = [(f"Code word for {KEYS[i]}?", ans) for i, ans in enumerate(
    ["apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "piano", "lemon", "comet",
     "forest", "silver", "candle", "harbor", "violet", "rocket", "garden", "winter", "falcon", "meadow"])]


@pytest.fixture(scope="session")
def qa_pairs() -> list[tuple[str, str]]:
    return QA


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, glm4_tokenizer_dir) -> Path:
    from glmtune.models.tiny import build_tiny_glm4
    return build_tiny_glm4(tmp_path_factory.mktemp("tiny") / "glm4", glm4_tokenizer_dir)


@pytest.fixture(scope="session")
def qa_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "qa.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for q, a in QA:
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": a}]}) + "\n")
    return path


@pytest.fixture
def make_cfg(tiny_model, qa_file, tmp_path):
    """make_cfg(out_name, **{"train.lr": 1e-2, ...}) -> validated TrainConfig for the tiny model."""
    from glmtune.train.config import load_config

    base = {"model": {"path": str(tiny_model), "dtype": "fp32"},
            "data": {"datasets": [str(qa_file)], "cutoff_len": 64},
            "method": {"name": "lora", "r": 8, "alpha": 16},
            "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "scheduler": "constant", "seed": 0},
            "output": {"dir": str(tmp_path / "out"), "plot": False, "tensorboard": False}}

    def make(out_name: str = "out", **over):
        raw = copy.deepcopy(base)
        raw["output"]["dir"] = str(tmp_path / out_name)
        return load_config(raw, [f"{k}={json.dumps(v)}" for k, v in over.items()])
    return make
