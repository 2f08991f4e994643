"""SIGKILL a training process mid-run, resume from `latest`, and get the uninterrupted run's adapter."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch
import yaml
from safetensors.torch import load_file

from glmtune.train import run_training
from glmtune.train.checkpoint import list_checkpoints


def test_sigkill_then_resume_matches_uninterrupted(make_cfg, tmp_path):
    over = {"train.max_steps": 8, "train.grad_accum": 2, "train.batch_size": 3, "train.scheduler": "cosine",
            "train.warmup_ratio": 0.25, "train.weight_decay": 0.1, "method.dropout": 0.1,  # dropout: RNG must resume too
            "output.save_every": 2, "output.keep_last": 2}
    ref = run_training(make_cfg("ref", **over))

    cfg = make_cfg("killed", **over)
    cfg_path = tmp_path / "killed.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-c", f"from glmtune.train import run_training; "
                             f"run_training({str(cfg_path)!r})"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = tmp_path / "killed"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if any(p.name == "checkpoint-4" for p in list_checkpoints(out)):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists()

    resumed = run_training(cfg, resume="latest")
    a = load_file(ref.adapter_path / "adapter_model.safetensors")
    b = load_file(resumed.adapter_path / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6)
    # the metrics file reads as one run: each step once, same losses as the reference
    steps = [m["step"] for m in resumed.metrics if "loss" in m]
    assert steps == list(range(1, 9))
    ref_losses = [m["loss"] for m in ref.metrics if "loss" in m]
    assert all(abs(x - y) < 1e-6 for x, y in zip(ref_losses, [m["loss"] for m in resumed.metrics if "loss" in m]))
    assert len(list_checkpoints(out)) == 2  # keep_last
