"""`glmtune train --nproc 2` (accelerate launch, gloo on CPU) gives the loss curve of one process
with the doubled batch: the loss is normalised by the trained tokens of all processes together."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from math import isclose

import pytest
import yaml

from glmtune.train import run_training
from glmtune.train.monitor import read_metrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_single_process(make_cfg, tmp_path):
    over = {"train.max_steps": 3, "train.grad_accum": 2, "train.lr": 1e-2}
    single = run_training(make_cfg("one", **{**over, "train.batch_size": 4}))
    cfg = make_cfg("two", **{**over, "train.batch_size": 2})
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    # the launch flags of one node (tests/train/test_multinode.py launches two nodes with them; the
    # $GLMTUNE_MASTER_PORT default is test_exit_codes.py's)
    proc = subprocess.run([sys.executable, "-m", "glmtune.cli.main", "train", str(path), "--nproc", "2", "--nnodes", "1",
                           "--master-addr", "127.0.0.1", "--master-port", str(free_port())],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = [m["loss"] for m in single.metrics if "loss" in m]
    rows = read_metrics(tmp_path / "two" / "metrics.jsonl")
    b = [m["loss"] for m in rows if "loss" in m]
    assert len(a) == len(b) == 3
    # fp32 losses near 12: 1e-6 relative is a few float32 ulps (one process sums the batch's token losses
    # in one reduction, two processes in two)
    assert all(isclose(x, y, rel_tol=1e-6) for x, y in zip(a, b)), (a, b)
    # written once: one final adapter, one metrics line per step
    assert (tmp_path / "two" / "final" / "adapter_model.safetensors").exists()
    assert [m["step"] for m in rows] == [1, 2, 3]
