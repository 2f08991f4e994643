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


# ---------------------------------------------------------------- the topic task, trained once through the CLI

@pytest.fixture(scope="session")
def topic_split(tmp_path_factory) -> dict:
    """{"train", "test": records, "train_file", "test_file": JSONL paths} (see topic_task.py)."""
    from topic_task import topic_records

    from glmtune.io import write_jsonl_atomic

    train, test = topic_records()
    folder = tmp_path_factory.mktemp("topics")
    write_jsonl_atomic(folder / "train.jsonl", train)
    write_jsonl_atomic(folder / "test.jsonl", test)
    return {"train": train, "test": test, "train_file": folder / "train.jsonl", "test_file": folder / "test.jsonl"}


# lr 1e-3: LoRA on a 135M model with 46 steps needs a large step size; r=8 on all projections.
# data.template is left out on purpose: training must take it from the model folder.
TOPIC_CONFIG = {"model": {"dtype": "fp32"},
                "data": {"cutoff_len": 128},
                "method": {"name": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"},
                "train": {"epochs": 2, "batch_size": 8, "lr": 1e-3, "warmup_ratio": 0.1, "seed": 0},
                "output": {"plot": False, "tensorboard": False}}


@pytest.fixture(scope="session")
def topic_run(smollm2_dir, topic_split, tmp_path_factory) -> dict:
    """`glmtune train CONFIG.yaml` (LoRA, 2 epochs = 46 steps) on the imported SmolLM2, as a subprocess."""
    import time

    import yaml
    from topic_task import glmtune

    folder = tmp_path_factory.mktemp("topic-run")
    config = {**TOPIC_CONFIG, "model": {**TOPIC_CONFIG["model"], "path": str(smollm2_dir)},
              "data": {**TOPIC_CONFIG["data"], "datasets": [str(topic_split["train_file"])]},
              "output": {**TOPIC_CONFIG["output"], "dir": str(folder / "run")}}
    (folder / "topics.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    t0 = time.time()
    # ~1.5 min on 2 idle cores; CPU contention from other jobs slows torch's threads many times over
    proc = glmtune("train", folder / "topics.yaml", "--set", "train.seed=0", timeout=1800)
    return {"dir": folder / "run", "adapter": folder / "run" / "final", "config": folder / "topics.yaml",
            "seconds": time.time() - t0, "output": proc.stdout + proc.stderr}


@pytest.fixture(scope="session")
def topic_merged(topic_run, tmp_path_factory) -> Path:
    """`glmtune export`: the adapter merged into its base (recorded in the adapter's glmtune.json)."""
    from topic_task import glmtune

    out = tmp_path_factory.mktemp("topic-merged") / "smollm2-topics"
    glmtune("export", "--adapter", topic_run["adapter"], "--out", out)
    return out
