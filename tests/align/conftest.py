"""Fixtures for alignment tests: a tiny GLM-4-shaped model, a toy task, config builders.

The toy task: a prompt of two filler words and a key word; the key decides the answer
(red -> apple, blue -> river). Held-out prompts use new filler combinations, so a policy that
learns the rule (attend to the key) improves on them; one that memorises prompts does not.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from toy_task import KEYS, other, toy_prompts, write_jsonl


@pytest.fixture(scope="session")
def align_data(tmp_path_factory) -> dict[str, Path]:
    """pairs/pairs_dev (preference), labels/labels_dev (classification with answers), gold (starter kit)."""
    d = tmp_path_factory.mktemp("align-data")
    files = {}
    for name, n, seed in (("pairs", 32, 1), ("pairs_dev", 8, 2)):
        files[name] = write_jsonl(d / f"{name}.jsonl", [{"prompt": p, "chosen": KEYS[k], "rejected": other(k)}
                                                        for p, k in toy_prompts(n, seed)])
    for name, n, seed in (("labels", 32, 3), ("labels_dev", 8, 4)):
        files[name] = write_jsonl(d / f"{name}.jsonl", [
            {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": KEYS[k]}], "label": k}
            for p, k in toy_prompts(n, seed)])
    files["gold"] = write_jsonl(d / "gold.jsonl", [
        {"conversations": [{"from": "human", "value": p}], "gold_answers": [KEYS[k], f"the {KEYS[k]}"],
         "bad_answers": [other(k)]} for p, k in toy_prompts(16, 5)])
    return files


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, glm4_tokenizer_dir) -> Path:
    from glmtune.models.tiny import build_tiny_glm4
    return build_tiny_glm4(tmp_path_factory.mktemp("tiny") / "glm4", glm4_tokenizer_dir)


@pytest.fixture(scope="session")
def label_head_model(tmp_path_factory, tiny_model) -> Path:
    """The tiny model with an LM head that only ever says one of the toy answers, and barely knows which.

    Stands in for an SFT'd classifier that has learnt the answer format and a weak hint of the rule:
    along the mean direction m of the final hidden state, the answers' first tokens get logit ~+50 and
    every other token ~-50 (the answers hold all the probability mass, also after LoRA moves the hidden
    state; with +-20 the mass leaked to the other 151k tokens after ~5 steps and the reward collapsed);
    along the direction d that separates red from blue prompts, apple and river get a small +-eps,
    so the start is only a little better than chance (~0.6 held-out reward)."""
    import torch
    from transformers import AutoModelForCausalLM

    from glmtune.models.tokenizer import load_tokenizer
    from glmtune.templates import get_template

    out = tmp_path_factory.mktemp("label-head") / "glm4"
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    tok, tpl = load_tokenizer(tiny_model), get_template("glm4")
    probe = toy_prompts(32, 9)  # seeds distinct from every train/dev split
    with torch.no_grad():
        hidden = torch.stack([model.model(input_ids=torch.tensor([tpl.encode_prompt(tok, [
            {"role": "user", "content": p}])])).last_hidden_state[0, -1] for p, _ in probe])
        red = torch.tensor([k == "red" for _, k in probe])
        m = hidden.mean(0)
        d = hidden[red].mean(0) - hidden[~red].mean(0)
        head = model.lm_head.weight
        head.copy_(-50 * m / m.norm() ** 2)  # every other token: logit ~ -50
        for answer, sign in ((KEYS["red"], 1), (KEYS["blue"], -1)):
            head[tok.encode(answer, add_special_tokens=False)[0]] = 50 * m / m.norm() ** 2 + sign * 0.3 * d / d.norm() ** 2
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "glmtune.json").write_text(json.dumps({"template": "glm4"}))
    return out


@pytest.fixture(scope="session")
def sft_adapter(tmp_path_factory, tiny_model, align_data) -> Path:
    """An SFT LoRA adapter from `glmtune train` (2 steps: it only has to be a real training output)."""
    from glmtune.train import run_training
    out = tmp_path_factory.mktemp("sft") / "run"
    res = run_training({"model": {"path": str(tiny_model), "dtype": "fp32"},
                        "data": {"datasets": [str(align_data["labels"])], "cutoff_len": 64},
                        "method": {"name": "lora", "r": 8, "alpha": 16},
                        "train": {"max_steps": 2, "batch_size": 8, "lr": 1e-2, "seed": 0},
                        "output": {"dir": str(out), "plot": False, "tensorboard": False}})
    return res.adapter_path


@pytest.fixture
def align_cfg(tiny_model, tmp_path):
    """align_cfg(model=..., **{"train.lr": ...}) -> a config dict for run_alignment."""
    def make(datasets, *, dev=None, model=None, out="out", **over) -> dict:
        raw = {"model": {"path": str(model or tiny_model), "dtype": "fp32"},
               "data": {"datasets": [str(p) for p in datasets], "cutoff_len": 64},
               "method": {"name": "lora", "r": 8, "alpha": 16},
               "train": {"max_steps": 4, "batch_size": 8, "lr": 1e-2, "scheduler": "constant", "seed": 0},
               "output": {"dir": str(tmp_path / out), "plot": True, "tensorboard": False}}
        if dev:
            raw["data"]["dev"] = str(dev)
        raw = copy.deepcopy(raw)
        for key, value in over.items():
            node = raw
            *path, last = key.split(".")
            for k in path:
                node = node.setdefault(k, {})
            node[last] = value
        return raw
    return make
