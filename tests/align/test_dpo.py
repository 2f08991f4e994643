"""DPO from an SFT adapter on the toy task: TRL trains glmtune's ids, the held-out margin rises,
the KL to the reference stays finite, and the result loads in Predictor."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from toy_task import write_jsonl
from glmtune.align import run_alignment


@pytest.fixture(scope="module")
def dpo_run(align_data, tiny_model, sft_adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo") / "run"
    cfg = {"model": {"path": str(tiny_model), "dtype": "fp32", "adapter": str(sft_adapter)},
           "data": {"datasets": [str(align_data["pairs"])], "dev": str(align_data["pairs_dev"]), "cutoff_len": 64},
           "method": {"name": "lora", "r": 8, "alpha": 16},
           "train": {"max_steps": 6, "batch_size": 8, "lr": 3e-2, "scheduler": "constant", "seed": 0},
           "output": {"dir": str(out), "plot": True, "tensorboard": True},
           "align": {"beta": 0.5}}
    return run_alignment("dpo", cfg)


def test_dpo_heldout_margin_rises_and_kl_finite(dpo_run):
    rows = dpo_run.metrics
    margins = [r["eval_rewards/margins"] for r in rows if "eval_rewards/margins" in r]
    assert margins[0] == pytest.approx(0.0, abs=1e-6)  # step 0: the policy is its reference
    assert margins[-1] > 0.02, margins
    kl = [r["eval_kl"] for r in rows if "eval_kl" in r]
    assert len(kl) == 1 and math.isfinite(kl[0]) and 0 < kl[0] < 5, kl
    assert any("loss" in r and math.isfinite(r["loss"]) for r in rows)
    for name in ("loss.png", "reward.png", "config.yaml", "metrics.jsonl"):
        assert (dpo_run.output_dir / name).stat().st_size > 0, name
    assert list((dpo_run.output_dir / "tensorboard").iterdir())


def test_trl_trains_glmtune_render_ids(dpo_run, align_data, tiny_model, tmp_path):
    """The collated ids of a pair's chosen side equal `glmtune data render --ids` of that conversation."""
    trainer = dpo_run.trainer
    row = trainer.train_dataset[0]
    batch = trainer.data_collator([row])
    chosen = [t for t, m in zip(batch["input_ids"][0].tolist(), batch["attention_mask"][0].tolist()) if m]
    first = json.loads(align_data["pairs"].read_text().splitlines()[0])
    conv = write_jsonl(tmp_path / "conv.jsonl", [{"messages": [{"role": "user", "content": first["prompt"]},
                                                               {"role": "assistant", "content": first["chosen"]}]}])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-m", "glmtune", "data", "render", str(conv), "--template", "glm4",
                          "--tokenizer", str(tiny_model), "--ids"], capture_output=True, text=True, env=env, check=True)
    assert chosen == json.loads(out.stdout)
    assert chosen[:2] == [151331, 151333]  # [gMASK]<sop>: GLM-4's prefix, from glmtune's template


def test_dpo_result_loads_in_predictor(dpo_run, tiny_model, sft_adapter):
    from safetensors.torch import load_file

    from glmtune import Predictor
    final = dpo_run.adapter_path
    assert not (final / "ref").exists()  # only the policy adapter, not TRL's frozen reference copy
    meta = json.loads((final / "glmtune.json").read_text())
    assert meta["template"] == "glm4" and meta["algorithm"] == "dpo"
    before, after = load_file(sft_adapter / "adapter_model.safetensors"), load_file(final / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    assert any(not (before[k] == after[k]).all() for k in before)  # the SFT adapter was trained further
    reply = Predictor(tiny_model, adapter=final, max_new_tokens=4).chat([{"role": "user", "content": "cat dog red"}])
    assert isinstance(reply, str)
