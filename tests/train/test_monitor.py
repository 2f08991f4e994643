"""What a user watches: the speed line names only levers that engaged (fused LoRA counts the layers
that really run fused), the progress shows input tok/s and prints plain lines off a terminal."""
from __future__ import annotations

import io
import sys
from pathlib import Path

import torch

from glmtune.train.monitor import progress_bar
from glmtune.train.speed import SpeedLevers, SpeedPlan

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from test_fused_lora import tiny_peft  # noqa: E402


def test_progress_prints_a_line_per_metrics_row_off_a_terminal():
    out = io.StringIO()  # not a TTY, like a log file or CI
    row = {"loss": 1.23456, "lr": 1e-4, "input_tokens_per_s": 12345.6}
    with progress_bar(True, 10, 0, stream=out) as progress:
        progress.update(5, row)
        progress.update(10, {**row, "loss": 0.5})
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("train 5/10 loss 1.2346 lr 1.00e-04 12,346 input tok/s")
    assert lines[1].startswith("train 10/10 loss 0.5000")
    quiet = io.StringIO()
    with progress_bar(False, 10, 0, stream=quiet) as progress:  # other processes print nothing
        progress.update(5, row)
    assert quiet.getvalue() == ""


def test_fused_lora_counts_only_layers_that_run_fused(make_cfg):
    cfg = make_cfg()
    fp32 = tiny_peft("glm4")                       # adapters and base fp32: every LoRA layer fuses
    levers = SpeedLevers(SpeedPlan(packing=True, fused_lora=True), cfg)
    levers.on_model(fp32)
    assert levers.applied.fused_layers == (12, 12) and levers.applied.summary() == (
        "speed: packed rows (model attention), fused LoRA (12 of 12 LoRA layers)")
    levers.undo()
    assert not any(hasattr(m, "_glmtune_peft_forward") for m in fp32.modules())

    mixed = tiny_peft("glm4", dtype=torch.bfloat16)   # bf16 base ...
    for name, p in mixed.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()                  # ... fp32 adapters (PEFT's default autocast)
    levers = SpeedLevers(SpeedPlan(packing=True, fused_lora=True), cfg)
    levers.on_model(mixed)
    assert not levers.applied.fused_lora and levers.applied.summary() == "speed: packed rows (model attention)"
    assert levers.applied.notes == ("speed.fused_lora -> off (0 of 12 LoRA layers can run fused)",)
    assert levers.plan.fused_lora  # the plan is what was decided, unchanged
    levers.undo()


def test_profile_steps_writes_a_report_of_those_steps(make_cfg):
    """output.profile_steps: N profiles N steps after the warm-up (CPU here: host time only) and the
    run's losses do not change for it."""
    from glmtune.train import run_training

    over = {"train.max_steps": 8, "train.batch_size": 2}
    plain = run_training(make_cfg("plain", **over))
    prof = run_training(make_cfg("prof", **over, **{"output.profile_steps": 2}))
    report = (prof.output_dir / "profile.txt").read_text()
    assert report.startswith("profiled 2 optimizer steps:") and "by host time:" in report
    assert "GPU busy" not in report and (prof.output_dir / "profile_trace.json").stat().st_size > 1000
    assert not (plain.output_dir / "profile.txt").exists()
    assert [m["loss"] for m in plain.metrics if "loss" in m] == [m["loss"] for m in prof.metrics if "loss" in m]


def test_device_busy_merges_overlapping_spans():
    from types import SimpleNamespace as NS

    from glmtune.train.profile import device_busy_s

    def ev(a, b, dev="DeviceType.CUDA"):
        return NS(time_range=NS(start=a, end=b), device_type=dev)

    events = [ev(0, 10), ev(5, 12), ev(20, 30), ev(0, 100, "DeviceType.CPU")]
    assert device_busy_s(events) == (12 + 10) / 1e6
