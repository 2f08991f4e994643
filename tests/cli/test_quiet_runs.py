"""Normal runs print nothing a user cannot act on: no library deprecation warnings on stderr from
`glmtune train` (LoRA with gradient checkpointing), `predict` and `eval classify` with that adapter."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import yaml

# a warning's own line ("...: FutureWarning: ...", "[transformers] `x` is deprecated ...")
NOISE = re.compile(r"Warning\b|deprecated", re.IGNORECASE)


def start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "glmtune", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def stderr_of(proc: subprocess.Popen) -> str:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return err


def test_train_predict_eval_print_no_deprecation_warnings(tmp_path, glm4_tokenizer_dir):
    from glmtune.models.tiny import build_tiny_glm4

    model = build_tiny_glm4(tmp_path / "tiny", glm4_tokenizer_dir)
    data = tmp_path / "data.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"request {i}: {q}"}, {"role": "assistant", "content": a}],
             "label": a} for i, (q, a) in enumerate([("bill too high", "billing"), ("no signal", "network")] * 4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    config = tmp_path / "lora.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": str(model), "dtype": "fp32"},
        "data": {"datasets": [str(data)], "cutoff_len": 64},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "gradient_checkpointing": True},
        "output": {"dir": str(tmp_path / "out"), "plot": False, "tensorboard": False}}), encoding="utf-8")
    adapter = str(tmp_path / "out" / "final")
    stderr = {"train": stderr_of(start("train", str(config)))}
    # predict and eval only read the adapter: side by side, so their imports overlap on two cores
    readers = {
        "predict": start("predict", "--model", str(model), "--adapter", adapter, "--data", str(data),
                         "--out", str(tmp_path / "preds.jsonl"), "--max-new-tokens", "2"),
        "eval classify": start("eval", "classify", "--model", str(model), "--adapter", adapter, "--data", str(data),
                               "--out", str(tmp_path / "eval")),
    }
    stderr.update({cmd: stderr_of(proc) for cmd, proc in readers.items()})
    noise = {cmd: [line for line in err.splitlines() if NOISE.search(line)] for cmd, err in stderr.items()}
    assert noise == dict.fromkeys(stderr, []), noise
