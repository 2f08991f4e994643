"""Superseded (bench/archive/README.md): a record of how the H100 figures of bench/RESULTS.md sessions 1-3 were measured, on a bench-side model set-up; current figures come from bench/train_product.py, which drives `glmtune train`.

Shared pieces of the GPU benches (issue 6): GLM-4-9B's shape, one model build per process, the seed
recipe's setup (mirrors bench/seed_recipe_baseline.py, which stays a verbatim copy) and glmtune's.

Debug on a CPU: every bench takes `--tiny` (hidden 256, 2 layers, real vocabulary) and runs without
CUDA (no varlen / liger there: they fall back to SDPA / no liger, noted in the JSON line).
"""
from __future__ import annotations

import json
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repo

GLM4_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]


def add_model_args(p) -> None:
    p.add_argument("--layers", type=int, default=40)
    p.add_argument("--tiny", action="store_true", help="debug shape: hidden 256, 2 layers (CPU is fine)")
    p.add_argument("--cache-dir", default=os.environ.get("GLMTUNE_BENCH_CACHE", "/tmp/glmtune_bench_models"),
                   help="QLoRA loads the random bf16 model from disk: it is saved here once and reused")


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def glm4_config(layers: int = 40, tiny: bool = False, max_positions: int = 32768):
    """GLM-4-9B-0414's shape (as bench/seed_recipe_baseline.py), or the --tiny debug shape."""
    from transformers import Glm4Config

    shape = dict(hidden_size=4096, intermediate_size=13696, num_attention_heads=32, num_key_value_heads=2,
                 head_dim=128)
    if tiny:
        shape = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=64)
        layers = min(layers, 2)
    return Glm4Config(**shape, num_hidden_layers=layers, vocab_size=151552, max_position_embeddings=max_positions,
                      rms_norm_eps=1.5625e-07, partial_rotary_factor=0.5, attention_bias=True,
                      tie_word_embeddings=False, pad_token_id=151329, eos_token_id=151329)


def random_model(cfg):
    """Random bf16 weights, seeded like the seed recipe, built directly on the device."""
    from transformers import Glm4ForCausalLM

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device()):
            model = Glm4ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    return model


def saved_model_dir(cfg, cache_dir: str) -> str:
    """The random model saved once as safetensors (QLoRA quantises on load, as the seed recipe does)."""
    c = cfg.to_dict()
    key = f"glm4_h{c['hidden_size']}_l{c['num_hidden_layers']}"  # loaded with config=cfg: positions may differ
    path = os.path.join(cache_dir, key)
    if os.path.exists(os.path.join(path, "DONE")):
        return path
    tmp = path + f".tmp{os.getpid()}"
    model = random_model(cfg)
    model.save_pretrained(tmp, max_shard_size="5GB")
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    open(os.path.join(tmp, "DONE"), "w").close()
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def qlora_model(cfg, cache_dir: str, attn: str | None = None):
    from transformers import BitsAndBytesConfig, Glm4ForCausalLM

    path = saved_model_dir(cfg, cache_dir)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    extra = {"attn_implementation": attn} if attn else {}
    return Glm4ForCausalLM.from_pretrained(path, config=cfg, quantization_config=q, dtype=torch.bfloat16,
                                           device_map={"": 0}, **extra)


def is_oom(e: BaseException) -> bool:
    """torch.OutOfMemoryError, or an out-of-memory surfacing as a plain RuntimeError (cuBLAS, triton)."""
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e))


def seed_model(cfg, *, qlora: bool, cache_dir: str):
    """bench/seed_recipe_baseline.py's setup: PEFT LoRA r64/alpha128/dropout 0.05 on all linear layers,
    gradient checkpointing, SDPA, fp32 adapters (PEFT default); QLoRA through prepare_model_for_kbit_training."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if qlora:
        model = qlora_model(cfg, cache_dir, attn="sdpa")
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model = random_model(cfg)
        model.config._attn_implementation = "sdpa"
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=128, lora_dropout=0.05, task_type="CAUSAL_LM",
                                             target_modules=GLM4_TARGETS))
    model.train()
    return model


def glmtune_model(cfg, *, qlora: bool, cache_dir: str, attn: str = "varlen", liger: str = "flce",
                  ckpt: bool = True, compile: bool = False, bf16_adapters: bool = True, fused_lora: bool = False,
                  dynamic: bool = True, notes: dict | None = None):
    """glmtune's levers (what run_training does with speed: attention varlen, liger, compile, adapter_dtype
    model, fused_lora): liger patched before the build, varlen attention, non-reentrant checkpointing, LoRA
    r64/alpha128 dropout 0 on the same modules. Levers that can't run here (CPU debug) fall back, noted in
    `notes`."""
    from peft import LoraConfig, get_peft_model

    from glmtune.models import speed

    notes = {} if notes is None else notes
    if liger != "none":
        why = "no CUDA" if not torch.cuda.is_available() else speed.liger_support("glm4")
        if why:
            notes["liger"] = f"off ({why})"
            liger = "none"
        else:
            speed.apply_liger("glm4", fused_linear_cross_entropy=True, rms_norm=liger == "all", swiglu=liger == "all")
    if attn == "varlen" and not speed.varlen_available():
        notes["attn"] = "sdpa (varlen needs CUDA + torch.nn.attention.varlen)"
        attn = "sdpa"
    impl = speed.register_varlen_attention() if attn == "varlen" else attn
    model = qlora_model(cfg, cache_dir) if qlora else random_model(cfg)
    model.config._attn_implementation = impl
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lcfg = LoraConfig(r=64, lora_alpha=128, lora_dropout=0.0, task_type="CAUSAL_LM", target_modules=GLM4_TARGETS)
    model = get_peft_model(model, lcfg, autocast_adapter_dtype=not bf16_adapters)
    if bf16_adapters:  # PEFT may keep fp32 adapters next to a 4-bit base: the fused path wants bf16
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    model.train()
    if fused_lora:
        from glmtune.models.fused_lora import fuse_lora
        notes["fused_lora"] = fuse_lora(model)
    if compile:
        speed.compile_decoder_layers(model, dynamic=dynamic)
    return model, impl, liger


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)
