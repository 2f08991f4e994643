"""`glmtune train --nproc 2` (accelerate launch, gloo on CPU) gives the loss curve of one process
with the doubled batch: the loss is normalised by the trained tokens of all processes together."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from glmtune.train import run_training
from glmtune.train.monitor import read_metrics



def test_two_process_ddp_matches_single_process(make_cfg, tmp_path):
    over = {"train.max_steps": 3, "train.grad_accum": 2, "train.lr": 1e-2}
    single = run_training(make_cfg("one", **{**over, "train.batch_size": 4}))
    cfg = make_cfg("two", **{**over, "train.batch_size": 2})
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1", "GLMTUNE_MASTER_PORT": "29561"}
    proc = subprocess.run([sys.executable, "-m", "glmtune.cli.main", "train", str(path), "--nproc", "2"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = [m["loss"] for m in single.metrics if "loss" in m]
    b = [m["loss"] for m in read_metrics(tmp_path / "two" / "metrics.jsonl") if "loss" in m]
    assert len(a) == len(b) == 3
    assert all(abs(x - y) < 1e-4 for x, y in zip(a, b)), (a, b)
