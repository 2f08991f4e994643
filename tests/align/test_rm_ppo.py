"""Reward model: held-out pairwise accuracy above chance; then PPO (TRL's RLOO) end to end with the
starter kit's `similarity` reward plus that reward model, logging per-reward means and KL."""
from __future__ import annotations

import math

import pytest

from glmtune.align import run_alignment


@pytest.fixture(scope="module")
def rm_run(tiny_model, align_data, tmp_path_factory):
    cfg = {"model": {"path": str(tiny_model), "dtype": "fp32"},
           "data": {"datasets": [str(align_data["pairs"])], "dev": str(align_data["pairs_dev"]), "cutoff_len": 64},
           "method": {"name": "lora", "r": 8, "alpha": 16},
           "train": {"max_steps": 8, "batch_size": 8, "lr": 2e-2, "scheduler": "constant", "seed": 0},
           "output": {"dir": str(tmp_path_factory.mktemp("rm") / "run"), "plot": True, "tensorboard": False}}
    return run_alignment("rm", cfg)


def test_reward_model_heldout_accuracy_above_chance(rm_run):
    acc = [r["eval_accuracy"] for r in rm_run.metrics if "eval_accuracy" in r]
    print("held-out RM accuracy", acc)
    assert acc[-1] >= 0.75, acc
    assert (rm_run.adapter_path / "adapter_config.json").exists()


def test_ppo_similarity_and_reward_model_end_to_end(rm_run, align_cfg, align_data):
    from glmtune.align.rewards import load_reward_model
    load_reward_model(str(rm_run.adapter_path))  # the folder reloads as a scalar scorer
    cfg = align_cfg([align_data["gold"]], out="ppo",
                    **{"train.max_steps": 2, "train.batch_size": 8, "align.num_generations": 4,
                       "align.max_new_tokens": 4, "align.kl_coef": 0.05,
                       "align.rewards": [{"name": "similarity"},
                                         {"name": "reward_model", "weight": 0.5,
                                          "options": {"path": str(rm_run.adapter_path)}}]})
    res = run_alignment("ppo", cfg)
    assert type(res.trainer).__name__ == "GlmtuneRLOOTrainer"
    logged = [r for r in res.metrics if "reward" in r]
    assert len(logged) == 2
    for r in logged:
        for key in ("rewards/similarity/mean", "rewards/reward_model/mean", "kl", "reward_std"):
            assert math.isfinite(r[key]), (key, r)
    assert (res.adapter_path / "adapter_config.json").exists()
