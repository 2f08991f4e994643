"""Mixture-of-experts facts (glmtune.models.moe): which weights get LoRA and why PEFT's module names
cannot say it, the router's balance loss on hand-computed values, and its hooks."""
from __future__ import annotations

import pytest
import torch

from glmtune.errors import ConfigError
from glmtune.models.moe import EXPERT_PARAMS, MLP_PARAMS, RouterBalance, balance_loss, is_moe, lora_spec


def tiny(lite: bool = False):
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM, Glm4MoeLiteConfig, Glm4MoeLiteForCausalLM

    from glmtune.models.tiny import TINY_GLM4_MOE, TINY_GLM4_MOE_LITE

    shape = dict(TINY_GLM4_MOE_LITE if lite else TINY_GLM4_MOE, vocab_size=128, pad_token_id=0, eos_token_id=1)
    shape.pop("partial_rotary_factor", None)
    torch.manual_seed(0)
    return (Glm4MoeLiteForCausalLM(Glm4MoeLiteConfig(**shape)) if lite
            else Glm4MoeForCausalLM(Glm4MoeConfig(**shape)))


def test_lora_spec_per_architecture():
    assert lora_spec(tiny(), "auto") == (["q_proj", "k_proj", "v_proj", "o_proj"], [*MLP_PARAMS, *EXPERT_PARAMS])
    # MLA (GLM-4.7-Flash): low-rank q and compressed kv projections
    assert lora_spec(tiny(lite=True), "all-linear")[0] == ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa",
                                                           "kv_b_proj", "o_proj"]
    assert lora_spec(tiny(), ["q_proj", "down_proj", "experts"]) == (["q_proj"], ["down_proj.weight", *EXPERT_PARAMS])
    with pytest.raises(ConfigError, match=r"no module named \['qkv'\].*experts"):
        lora_spec(tiny(), ["qkv"])


def test_peft_module_names_would_miss_the_mlps():
    """Why MLP linears are parameter targets: on transformers 5, PEFT rewrites the module names
    gate_proj / up_proj / down_proj (and gate, the router) of a glm4_moe model into the fused expert
    parameters (and the router weight): its v4-checkpoint conversion. If this starts failing, PEFT changed that
    rewrite and glmtune.models.moe can go back to module names."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny(), LoraConfig(r=4, target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"]))
    adapted = {n.removeprefix("base_model.model.").split(".lora_A")[0] for n, _ in model.named_parameters()
               if "lora_A" in n}
    assert "model.layers.0.mlp.gate_proj" not in adapted           # the dense MLP lost its LoRA
    assert "model.layers.1.mlp.shared_experts.down_proj" not in adapted
    assert "model.layers.1.mlp.experts" in adapted                 # rewritten to the fused experts

    from glmtune.models.peft_setup import moe_lora_config
    from glmtune.train.config import MethodSection

    ours = get_peft_model(tiny(), moe_lora_config(tiny(), MethodSection()))
    adapted = {n.removeprefix("base_model.model.").split(".lora_A")[0] for n, _ in ours.named_parameters()
               if "lora_A" in n}
    for name in ("model.layers.0.mlp.gate_proj", "model.layers.1.mlp.shared_experts.down_proj",
                 "model.layers.1.mlp.experts", "model.layers.2.mlp.experts.base_layer", "model.layers.2.self_attn.q_proj"):
        assert name in adapted, name
    assert not any(".mlp.gate." in n or n.endswith(".mlp.gate") for n in adapted)  # the router is not adapted
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_balance_loss_hand_values():
    big = 20.0  # sigmoid(20) = 1 - 2e-9: one expert takes all of a token's score
    one_sided = torch.tensor([[big, -big], [big, -big]])
    both_on_0 = balance_loss(one_sided, torch.tensor([[0], [0]]), 2)
    assert abs(float(both_on_0) - 2.0) < 1e-6        # worst case: E / K
    even = balance_loss(torch.tensor([[big, -big], [-big, big]]), torch.tensor([[0], [1]]), 2)
    assert abs(float(even) - 1.0) < 1e-6             # f = (1, 1), P = (.5, .5)
    # 3 tokens, E = 3, K = 2, equal scores: P_i = 1/3, f = E/(K T) * counts = 3/6 * (3, 2, 1)
    flat = balance_loss(torch.zeros(3, 3), torch.tensor([[0, 1], [0, 1], [0, 2]]), 3)
    assert abs(float(flat) - (0.5 * (3 + 2 + 1) / 3)) < 1e-6
    # a token mask counts only its True tokens (a graphed row's padding is routed too)
    g = torch.Generator().manual_seed(0)
    logits, idx = torch.randn(6, 4, generator=g), torch.randint(0, 4, (6, 2), generator=g)
    keep = torch.tensor([True, False, True, True, False, True])
    masked = balance_loss(logits, idx, 4, keep)
    assert abs(float(masked) - float(balance_loss(logits[keep], idx[keep], 4))) < 1e-6
    assert abs(float(masked) - float(balance_loss(logits, idx, 4))) > 1e-3


def test_router_balance_hooks_count_training_forwards_only():
    model = tiny()
    assert is_moe(model)
    balance = RouterBalance(model)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    model.train()
    model(input_ids=ids)
    assert int(balance.count) == 2  # two MoE layers
    total = balance.total
    value = balance.read()
    assert 1.0 <= value <= 8 / 2 and int(balance.count) == 0 and balance.read() is None
    # the same tensors are added to in place from then on (what a captured CUDA graph replays)
    model(input_ids=ids)
    assert balance.total is total and abs(balance.read() - value) < 1e-6
    model(input_ids=ids)
    balance.reset()
    assert balance.read() is None
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert balance.read() is None
    balance.remove()
    model.train()
    model(input_ids=ids)
    assert balance.read() is None
