"""Superseded (bench/archive/README.md): a record of how the H100 figures of bench/RESULTS.md sessions 1-3 were measured, on a bench-side model set-up; current figures come from bench/train_product.py, which drives `glmtune train`.

Where does GLM-4-9B LoRA SFT time go, and what does each lever give? (issue 6, first device call)

One configuration per process (clean peak-memory numbers). Same model shape and length
distribution as bench/seed_recipe_baseline.py: Glm4ForCausalLM with GLM-4-9B-0414's shape, random
bf16 weights, 4 sequences per optimizer step with lengths ~ U[300, 1100) from default_rng(1).
A step's 4 sequences are processed as micro-batches of `--pack` sequences packed into one row
(no padding; position ids restart per sequence so transformers builds a block-diagonal mask),
with gradients accumulated, so every variant takes the same optimizer steps as the seed recipe.

Usage (device): python3 bench/archive/profile_levers.py --pack 2 --adapter bf16 --liger [--ckpt] [--profile]
Prints one JSON line: tokens/s, peak GiB, and (with --profile) the top CUDA kernels.
"""
import argparse, json, time

import numpy as np
import torch

p = argparse.ArgumentParser()
p.add_argument("--layers", type=int, default=40)
p.add_argument("--steps", type=int, default=8)
p.add_argument("--pack", type=int, default=4, help="sequences per micro-batch (4 = whole step in one row)")
p.add_argument("--adapter", choices=["fp32", "bf16", "fp32-autocast"], default="fp32",
               help="fp32: peft default (input cast to fp32 per LoRA call); bf16: adapters in bf16; "
                    "fp32-autocast: fp32 master adapters, bf16 autocast, no input casting")
p.add_argument("--liger", action="store_true")
p.add_argument("--ckpt", action="store_true")
p.add_argument("--attn", default="sdpa")
p.add_argument("--dropout", type=float, default=0.0)
p.add_argument("--fused-adam", action="store_true")
p.add_argument("--profile", action="store_true")
p.add_argument("--qlora", action="store_true")
args = p.parse_args()

from transformers import Glm4Config, Glm4ForCausalLM
from peft import LoraConfig, get_peft_model

if args.liger:
    from liger_kernel.transformers import apply_liger_kernel_to_glm4
    apply_liger_kernel_to_glm4(rope=False, cross_entropy=False, fused_linear_cross_entropy=True,
                               rms_norm=True, swiglu=True)

cfg = Glm4Config(hidden_size=4096, intermediate_size=13696, num_hidden_layers=args.layers,
                 num_attention_heads=32, num_key_value_heads=2, head_dim=128, vocab_size=151552,
                 max_position_embeddings=32768, rms_norm_eps=1.5625e-07, partial_rotary_factor=0.5,
                 attention_bias=True, tie_word_embeddings=False, pad_token_id=151329, eos_token_id=151329)
cfg._attn_implementation = args.attn
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)
with torch.device("cuda"):
    model = Glm4ForCausalLM(cfg)
torch.set_default_dtype(torch.float32)
if args.qlora:
    import tempfile
    from transformers import BitsAndBytesConfig
    from peft import prepare_model_for_kbit_training
    path = tempfile.mkdtemp()
    model.save_pretrained(path, max_shard_size="5GB"); del model; torch.cuda.empty_cache()
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = Glm4ForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.bfloat16,
                                            device_map={"": 0}, attn_implementation=args.attn)
    # prepare_model_for_kbit_training upcasts norms/embeddings to fp32 (memory + time); we only
    # need input grads for checkpointing, so do the minimum by hand.
    if args.ckpt:
        model.enable_input_require_grads()
if args.ckpt:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
lcfg = LoraConfig(r=64, lora_alpha=128, lora_dropout=args.dropout, task_type="CAUSAL_LM",
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"])
model = get_peft_model(model, lcfg, autocast_adapter_dtype=(args.adapter != "bf16"))
if args.adapter == "bf16":
    for n, prm in model.named_parameters():
        if prm.requires_grad:
            prm.data = prm.data.to(torch.bfloat16)
model.train()
params = [q for q in model.parameters() if q.requires_grad]
opt = torch.optim.AdamW(params, lr=2e-4, fused=args.fused_adam or None)

import contextlib
def ctx():
    if args.adapter == "fp32-autocast":
        from peft.helpers import disable_input_dtype_casting
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast("cuda", dtype=torch.bfloat16))
        stack.enter_context(disable_input_dtype_casting(model))
        return stack
    return contextlib.nullcontext()

rng = np.random.default_rng(1)
torch.cuda.reset_peak_memory_stats()

def step():
    lens = [int(x) for x in rng.integers(300, 1100, size=4)]
    total = sum(lens)
    groups = [lens[i:i + args.pack] for i in range(0, 4, args.pack)]
    for g in groups:
        L = sum(g)
        ids = torch.randint(0, cfg.vocab_size, (1, L), device="cuda")
        pos = torch.cat([torch.arange(n, device="cuda") for n in g]).unsqueeze(0)
        labels = ids.clone()
        starts = np.cumsum([0] + g[:-1])
        labels[0, torch.as_tensor(starts, device="cuda")] = -100  # no prediction across sequences
        with ctx():
            out = model(input_ids=ids, position_ids=pos, labels=labels)
        # the model's loss is a mean over this micro-batch's targets; weight by its share of the step
        (out.loss * (L - len(g)) / (total - 4)).backward()
    opt.step(); opt.zero_grad(set_to_none=True)
    return total

for _ in range(3):
    step()
torch.cuda.synchronize()
times, real = [], 0
for _ in range(args.steps):
    t = time.time(); n = step(); torch.cuda.synchronize(); times.append(time.time() - t); real += n
res = dict(recipe="glmtune-levers", pack=args.pack, adapter=args.adapter, liger=args.liger, ckpt=args.ckpt,
           attn=args.attn, dropout=args.dropout, fused_adam=args.fused_adam, qlora=args.qlora,
           layers=args.layers, tokens_per_s=round(real / sum(times)),
           peak_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 2))
if args.profile:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.time(); step(); torch.cuda.synchronize(); wall = time.time() - t
    ka = prof.key_averages()
    cuda_total = sum(e.self_device_time_total for e in ka) / 1e3
    res["profile_wall_ms"] = round(wall * 1e3, 1)
    res["profile_gpu_busy_ms"] = round(cuda_total, 1)
    print(ka.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70))
print(json.dumps(res), flush=True)
