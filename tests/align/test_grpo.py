"""GRPO with the `label` reward on the toy task: the held-out reward rises (fixed seed).

One-token answers (max_new_tokens 1) from a head that only says apple or river (conftest
label_head_model): 8 prompts x 4 completions per step, 8 steps, KL 0.1 to the start. The held-out
reward is measured exactly: the policy's mean probability of the right answer's token on the dev
prompts, before (the base) and after (base + the saved adapter): the expected label reward.
TRL's own eval_reward (8 dev prompts x 4 samples) is logged at step 0 and at the end too, but a
32-sample estimate moves by ~0.1 with the sampler's random stream (measured on this task: the
expected reward after training was 0.73-0.75 in five runs, engine and transformers rollouts alike,
while the sampled eval_reward read 0.62-0.88), so the test asserts on the exact value."""
from __future__ import annotations

import math

from glmtune.align import run_alignment
from toy_task import KEYS, toy_prompts


def _eval_rewards(metrics: list[dict]) -> list[float]:
    return [r["eval_reward"] for r in metrics if "eval_reward" in r]


def _expected_label_reward(model_dir, adapter=None) -> float:
    """Mean probability of the right answer's first token over the dev prompts (conftest labels_dev)."""
    import torch

    from glmtune.models.loading import load_model
    from glmtune.models.tokenizer import load_tokenizer
    from glmtune.templates import get_template

    model = load_model(str(model_dir), dtype="float32").eval()
    if adapter is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, str(adapter))
    tok, tpl = load_tokenizer(model_dir), get_template("glm4")
    total, dev = 0.0, toy_prompts(8, 4)
    with torch.no_grad():
        for prompt, key in dev:
            ids = tpl.encode_prompt(tok, [{"role": "user", "content": prompt}])
            probs = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1], -1)
            total += float(probs[tok.encode(KEYS[key], add_special_tokens=False)[0]])
    return total / len(dev)


def test_grpo_label_reward_rises_on_heldout(align_cfg, align_data, label_head_model):
    cfg = align_cfg([align_data["labels"]], dev=align_data["labels_dev"], model=label_head_model, out="grpo",
                    **{"train.max_steps": 8, "train.batch_size": 32, "train.lr": 5e-3,
                       "align.num_generations": 4, "align.max_new_tokens": 1, "align.kl_coef": 0.1,
                       "align.rewards": [{"name": "label"}]})
    res = run_alignment("grpo", cfg)
    before = _expected_label_reward(label_head_model)
    after = _expected_label_reward(label_head_model, res.adapter_path)
    sampled = _eval_rewards(res.metrics)
    train = [r["reward"] for r in res.metrics if "reward" in r]
    print("held-out expected reward", before, "->", after, "sampled", sampled, "train", train)
    assert 0.5 < before < 0.6  # near chance: the head knows the answers, barely the rule (measured 0.546)
    assert after >= before + 0.15, (before, after)  # measured: 0.546 -> 0.75
    assert len(sampled) == 2 and all(0 <= r <= 1 for r in sampled)
    assert all(math.isfinite(r.get("loss", 0.0)) for r in res.metrics)
    assert (res.output_dir / "reward.png").stat().st_size > 0
    assert (res.adapter_path / "adapter_config.json").exists()
