"""Mixture-of-experts training through `glmtune train` on tiny Glm4Moe (GLM-4.5 layout) and
Glm4MoeLite (GLM-4.7-Flash, MLA) models: loss falls, the adapter holds the routed experts, the
router and base stay untouched, `export` merges the expert LoRA (merged logits = PEFT's), a SIGKILLed
run resumes bit-exactly, and the speed levers say what applies to MoE."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from glmtune.errors import ConfigError
from glmtune.train import export_merged, run_training
from glmtune.train.checkpoint import list_checkpoints
from glmtune.train.config import load_config
from glmtune.train.speed import resolve_speed

ARCHS = {"glm4_moe": False, "glm4_moe_lite": True}


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory, glm4_tokenizer_dir):
    from glmtune.models.tiny import build_tiny_glm4_moe
    root = tmp_path_factory.mktemp("moe")
    return {name: build_tiny_glm4_moe(root / name, glm4_tokenizer_dir, lite=lite) for name, lite in ARCHS.items()}


@pytest.fixture
def moe_cfg(moe_dirs, qa_file, tmp_path):
    def make(arch: str, out: str = "out", **over):
        raw = {"model": {"path": str(moe_dirs[arch]), "dtype": "fp32"},
               "data": {"datasets": [str(qa_file)], "cutoff_len": 64},
               "method": {"name": "lora", "r": 8, "alpha": 16},
               # the whole 20-conversation set in each step, so step losses compare like with like
               "train": {"max_steps": 5, "batch_size": 20, "lr": 5e-3, "scheduler": "constant", "seed": 0},
               "output": {"dir": str(tmp_path / out), "plot": False, "tensorboard": False}}
        return load_config(raw, [f"{k}={json.dumps(v)}" for k, v in over.items()])
    return make


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_moe_lora_trains_experts_and_exports(arch, moe_cfg, moe_dirs, tmp_path, capsys):
    from peft import PeftModel
    from rich.console import Console
    from transformers import AutoModelForCausalLM

    console = Console(file=sys.stdout, width=400)
    res = run_training(moe_cfg(arch), console=console, return_model=True)
    losses = [m["loss"] for m in res.metrics if "loss" in m]
    assert losses[-1] < losses[0] - 0.2 and losses == sorted(losses, reverse=True), losses
    # the router's balance loss is logged every step (1.0 = even load; at most E / K = 4)
    balance = [m["router_aux_loss"] for m in res.metrics if "loss" in m]
    assert len(balance) == len(losses) and all(1.0 <= b <= 4.0 for b in balance)
    printed = capsys.readouterr().out
    assert "grouped expert LoRA (2 MoE layers)" in printed and "fused LoRA" in printed

    adapter = load_file(res.adapter_path / "adapter_model.safetensors")
    for layer in (1, 2):  # both MoE layers: both fused expert parameters, trained (B moved off 0)
        for wrapped in ("experts", "experts.base_layer"):  # down_proj wraps gate_up_proj (PEFT's nesting)
            b = adapter[f"base_model.model.model.layers.{layer}.mlp.{wrapped}.lora_B.weight"]
            assert b.abs().max() > 0
        assert f"base_model.model.model.layers.{layer}.mlp.shared_experts.down_proj.lora_A.weight" in adapter
    assert "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight" in adapter  # the dense MLP
    assert not any(".mlp.gate." in k for k in adapter)  # the router is not adapted
    # transformers fuses the experts on load (the folder keeps the per-expert layout of real checkpoints)
    base = AutoModelForCausalLM.from_pretrained(moe_dirs[arch]).state_dict()
    assert "model.layers.1.mlp.experts.gate_up_proj" in base
    for n, p in res.model.get_base_model().named_parameters():
        if "lora_" not in n:
            assert torch.equal(p.detach(), base[n.replace(".base_layer", "")]), n  # experts, router, rest untouched

    out = export_merged(None, res.adapter_path, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    # a plain model folder again, in the checkpoint layout of the base
    assert set(load_file(out / "model.safetensors")) == set(load_file(moe_dirs[arch] / "model.safetensors"))
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(moe_dirs[arch]), str(res.adapter_path))
    ids = torch.randint(0, 151000, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits(merged, ids), logits(peft.eval(), ids), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits(merged, ids), logits(res.model, ids), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits(merged, ids), logits(AutoModelForCausalLM.from_pretrained(moe_dirs[arch]), ids),
                              atol=1e-4)


def test_expert_lora_lever_is_exact_in_training(moe_cfg, capsys):
    """The same run with the grouped expert LoRA (and fused norms) and with PEFT's forward: same losses,
    same adapter;
    and the router balance of padded batches."""
    on = run_training(moe_cfg("glm4_moe", "on", **{"train.max_steps": 2, "speed.fused_norm": True}))
    assert "fused RMSNorm (" in " ".join(capsys.readouterr().err.split())  # the norms' lever ran too
    off = run_training(moe_cfg("glm4_moe", "off", **{"train.max_steps": 2, "speed.expert_lora": False,
                                                     "speed.fused_lora": False}))
    for a, b in zip(on.metrics, off.metrics):
        assert abs(a["loss"] - b["loss"]) < 1e-5
    a, b = (load_file(r.adapter_path / "adapter_model.safetensors") for r in (on, off))
    assert any(".experts." in k for k in a)
    for k in a:  # AdamW divides by the gradients' own size: fp32 rounding of near-zero ones shows at ~1e-5
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=5e-5, msg=k)
    # padded batches route their padding too; the logged balance counts the real tokens only, so the
    # first step's equals the packed run's (same weights, same conversations)
    padded = run_training(moe_cfg("glm4_moe", "padded", **{"train.max_steps": 1, "data.packing": False}))
    x, y = (next(m["router_aux_loss"] for m in r.metrics if "loss" in m) for r in (on, padded))
    assert abs(x - y) < 5e-4, (x, y)  # with the padding counted: 0.0041 apart


def test_train_router_trains_it_in_full_and_saves_it(moe_cfg, moe_dirs):
    res = run_training(moe_cfg("glm4_moe", **{"method.train_router": True, "train.max_steps": 2}))
    adapter = load_file(res.adapter_path / "adapter_model.safetensors")
    base = load_file(moe_dirs["glm4_moe"] / "model.safetensors")
    router = {k: v for k, v in adapter.items() if ".mlp.gate." in k and k.endswith(".weight")}
    assert len(router) == 2  # one weight per MoE layer, as a PEFT modules_to_save copy (+ its bias buffer)
    for key, value in router.items():
        layer = key.split(".layers.")[1].split(".")[0]
        assert not torch.equal(value, base[f"model.layers.{layer}.mlp.gate.weight"])


def test_sigkill_then_resume_matches_uninterrupted(moe_cfg, tmp_path):
    over = {"train.max_steps": 6, "train.grad_accum": 2, "train.batch_size": 2, "train.scheduler": "cosine",
            "output.save_every": 2, "output.keep_last": 2}
    ref = run_training(moe_cfg("glm4_moe", "ref", **over))
    cfg = moe_cfg("glm4_moe", "killed", **over)
    cfg_path = tmp_path / "killed.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    proc = subprocess.Popen([sys.executable, "-c", f"from glmtune.train import run_training; "
                             f"run_training({str(cfg_path)!r})"], env={**os.environ, "PYTHONPATH": os.getcwd()},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = tmp_path / "killed"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any(p.name == "checkpoint-2" for p in list_checkpoints(out)):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = run_training(cfg, resume="latest")
    a = load_file(ref.adapter_path / "adapter_model.safetensors")
    b = load_file(resumed.adapter_path / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(".experts." in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [m["loss"] for m in resumed.metrics if "loss" in m] == [m["loss"] for m in ref.metrics if "loss" in m]


def test_speed_plan_for_moe(moe_cfg):
    cfg = moe_cfg("glm4_moe")
    plan = resolve_speed(cfg, cuda=True, varlen_problem=None, liger_problem=None)
    assert plan.expert_lora and plan.packing and plan.varlen is False  # fp32 here: no FlashAttention
    assert not plan.graphs  # fp32: no FlashAttention varlen, so no graphs
    bf16 = cfg.model_copy(update={"model": cfg.model.model_copy(update={"dtype": "bf16"})})
    graphed = resolve_speed(bf16, cuda=True, varlen_problem=None, liger_problem=None)
    assert graphed.graphs and graphed.graph_tokens == 2048 and graphed.expert_lora
    sharded = resolve_speed(cfg, cuda=True, varlen_problem=None, liger_problem=None, processes=2,
                            distributed="FSDP")
    assert not sharded.expert_lora and any("speed.expert_lora auto -> off" in n for n in sharded.notes)
    qlora = cfg.model_copy(update={"method": cfg.method.model_copy(update={"name": "qlora"})})
    qlora = resolve_speed(qlora, cuda=True, varlen_problem=None, liger_problem=None)
    assert any("only the attention linears are 4-bit" in n for n in qlora.notes)
    bf16_qlora = bf16.model_copy(update={"method": cfg.method.model_copy(update={"name": "qlora"})})
    plan = resolve_speed(bf16_qlora, cuda=True, varlen_problem=None, liger_problem=None)
    assert not plan.graphs and any("mixture-of-experts QLoRA: capture is opt-in" in n for n in plan.notes)
    dense = cfg.model_copy(update={"speed": cfg.speed.model_copy(update={"expert_lora": True})})
    with pytest.raises(ConfigError, match="speed.expert_lora=true runs LoRA on routed experts; this model has none"):
        resolve_speed(dense, cuda=False, moe=False)


def test_moe_config_errors(moe_cfg):
    with pytest.raises(ConfigError, match="method.dropout.*set method.dropout: 0"):
        run_training(moe_cfg("glm4_moe", **{"method.dropout": 0.1}))
    with pytest.raises(ConfigError, match="train_router does not apply to method prefix"):
        moe_cfg("glm4_moe", **{"method.name": "prefix", "method.train_router": True})
