"""KTO, ORPO, SimPO (and DPO with a precomputed reference) with a fresh LoRA on the toy task's answer
head (conftest label_head_model: it says apple or river and barely knows which): TRL's trainers train
glmtune's ids, and the held-out margin log p(chosen) - log p(rejected) (summed over the answer's tokens, the policy itself)
rises; the result is a training-output folder."""
from __future__ import annotations

import json
import math

import pytest
import torch

from glmtune.align import run_alignment


def heldout_margin(model, rows) -> float:
    """Mean over pairs of log p(chosen | prompt) - log p(rejected | prompt) under `model`."""
    model.eval()
    device = next(model.parameters()).device

    def logp(prompt, answer):
        ids = torch.tensor([prompt + answer], device=device)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
        return torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt):, None]).sum().item()

    return sum(logp(r["prompt_ids"], r["chosen_ids"]) - logp(r["prompt_ids"], r["rejected_ids"])
               for r in rows) / len(rows)


def _dev_rows(tiny_model, align_data):
    from glmtune.align.data import preference_rows
    from glmtune.data.readers import read_records
    from glmtune.models.tokenizer import load_tokenizer
    from glmtune.templates import get_template
    return preference_rows(read_records(align_data["pairs_dev"]), get_template("glm4"), load_tokenizer(tiny_model),
                           cutoff_len=64, on_overflow="error")


@pytest.mark.parametrize("algorithm, align, lr, trainer", [   # measured margins: -0.43 -> kto 0.72, orpo 4.2,
    ("kto", {"beta": 0.5}, 1e-2, "GlmtuneKTOTrainer"),        # simpo 5.0, dpo 13.2 (it overshoots at 1e-2)
    ("orpo", {"beta": 0.5}, 1e-2, "GlmtuneORPOTrainer"),
    ("simpo", {"beta": 2.0, "simpo_gamma": 0.5}, 1e-2, "GlmtuneCPOTrainer"),
    # packed DPO with the reference log-probs precomputed (test_dpo.py runs the once-per-batch reference)
    ("dpo", {"beta": 0.5, "precompute_reference": True}, 2e-3, "GlmtunePackedDPOTrainer"),
])
def test_preference_method_raises_heldout_margin(algorithm, align, lr, trainer, align_data, label_head_model,
                                                 tmp_path):
    from transformers import AutoModelForCausalLM

    dev = _dev_rows(label_head_model, align_data)
    before = heldout_margin(AutoModelForCausalLM.from_pretrained(label_head_model, dtype=torch.float32), dev)
    cfg = {"model": {"path": str(label_head_model), "dtype": "fp32"},
           "data": {"datasets": [str(align_data["pairs"])], "dev": str(align_data["pairs_dev"]), "cutoff_len": 64},
           "method": {"name": "lora", "r": 8, "alpha": 16},
           "train": {"max_steps": 6, "batch_size": 8, "lr": lr, "scheduler": "constant", "seed": 0},
           "output": {"dir": str(tmp_path / algorithm), "plot": False, "tensorboard": False}, "align": align}
    res = run_alignment(algorithm, cfg)
    assert type(res.trainer).__name__ == trainer
    if algorithm == "dpo":
        assert "ref_chosen_logps" in res.trainer.train_dataset.column_names
    policy = res.trainer.accelerator.unwrap_model(res.trainer.model)
    assert list(policy.peft_config) == ["default"]  # no frozen "ref" copy of a fresh LoRA (it is the base)
    after = heldout_margin(policy, dev)
    print(algorithm, "held-out margin", before, "->", after)
    assert after > before + 0.5, (before, after)
    losses = [r["loss"] for r in res.metrics if "loss" in r]
    assert losses and all(math.isfinite(x) for x in losses)
    meta = json.loads((res.adapter_path / "glmtune.json").read_text())
    assert (meta["algorithm"], meta["template"], meta["method"]) == (algorithm, "glm4", "lora")
    assert not (res.adapter_path / "ref").exists()
