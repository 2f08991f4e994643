"""Every shipped preset (configs/*.yaml) trains: `glmtune train PRESET --set ...` with the tiny model in
place of the 6-9B one and the preset's own dataset names resolved through the shipped ./datasets.yaml
(registered samples under glmtune/resources/sample/). The swaps are only what a 2-core CPU needs."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[2]
PRESETS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))


def cpu_swaps(preset: dict, tiny_model: Path, out: Path) -> list[str]:
    sets = [f"model.path={tiny_model}", "model.dtype=fp32", "train.max_steps=2", "train.batch_size=2",
            "train.grad_accum=1", "data.max_samples=16", f"output.dir={out}", "output.plot=false",
            "output.tensorboard=false"]
    if preset["data"].get("template") not in (None, "glm4"):
        sets.append("data.template=glm4")  # the tiny model is GLM-4-shaped with the GLM-4 tokenizer
    if preset["model"].get("trust_remote_code"):
        sets.append("model.trust_remote_code=false")  # the tiny folder ships no modelling code
    if preset["method"]["name"] == "qlora" and not torch.cuda.is_available():
        sets.append("method.name=lora")  # nf4 weights need bitsandbytes on CUDA
    return sets


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_trains_two_steps(preset, tiny_model, tmp_path, monkeypatch):
    from glmtune.cli.main import app, register_commands
    from glmtune.train.monitor import read_metrics

    monkeypatch.chdir(REPO)  # the README runs presets from the checkout: ./datasets.yaml names their data
    register_commands()
    raw = yaml.safe_load((REPO / "configs" / preset).read_text(encoding="utf-8"))
    out = tmp_path / "run"
    args = ["train", f"configs/{preset}"]
    for s in cpu_swaps(raw, tiny_model, out):
        args += ["--set", s]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, (res.output, res.exception)
    losses = [m["loss"] for m in read_metrics(out / "metrics.jsonl") if "loss" in m]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert (out / "final").is_dir() and yaml.safe_load((out / "config.yaml").read_text())["data"]["datasets"] == \
        raw["data"]["datasets"]


def test_preset_dataset_names_resolve_through_the_shipped_registry(monkeypatch):
    from glmtune.data.registry import load_dataset

    monkeypatch.chdir(REPO)
    for preset in PRESETS:
        data = yaml.safe_load((REPO / "configs" / preset).read_text(encoding="utf-8"))["data"]
        for name in data["datasets"] + ([data["dev"]] if data.get("dev") else []):
            records = load_dataset(name)
            assert len(records) >= 9 and all(r["messages"][-1]["role"] == "assistant" for r in records), name
