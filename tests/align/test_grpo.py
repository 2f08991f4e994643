"""GRPO with the `label` reward on the toy task: the held-out mean reward rises (fixed seed).

One-token answers (max_new_tokens 1) from a head that only says apple or river (conftest
label_head_model): 8 prompts x 4 completions per step, 8 steps, KL 0.1 to the start; the held-out reward is TRL's
eval_reward (8 dev prompts x 4 samples) at step 0 and at the end."""
from __future__ import annotations

import math

from glmtune.align import run_alignment


def _eval_rewards(metrics: list[dict]) -> list[float]:
    return [r["eval_reward"] for r in metrics if "eval_reward" in r]


def test_grpo_label_reward_rises_on_heldout(align_cfg, align_data, label_head_model):
    cfg = align_cfg([align_data["labels"]], dev=align_data["labels_dev"], model=label_head_model, out="grpo",
                    **{"train.max_steps": 8, "train.batch_size": 32, "train.lr": 5e-3,
                       "align.num_generations": 4, "align.max_new_tokens": 1, "align.kl_coef": 0.1,
                       "align.rewards": [{"name": "label"}]})
    res = run_alignment("grpo", cfg)
    before, *_, after = _eval_rewards(res.metrics)
    train = [r["reward"] for r in res.metrics if "reward" in r]
    print("held-out reward", before, "->", after, "train", train)
    assert 0.4 < before < 0.75  # near chance: the head knows the answers, barely the rule
    assert after >= before + 0.15, (before, after)  # measured: 0.5625 -> 0.875
    assert all(math.isfinite(r.get("loss", 0.0)) for r in res.metrics)
    assert (res.output_dir / "reward.png").stat().st_size > 0
    assert (res.adapter_path / "adapter_config.json").exists()
