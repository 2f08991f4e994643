# Copied verbatim from ../shared/bench/seed_recipe_baseline.py so it travels to the device with the repo.
"""The recipe users run today, as a yardstick: transformers + PEFT LoRA (r=64, alpha=128, dropout 0.05,
all linear layers), batches padded to the longest, gradient checkpointing, AdamW, bf16.

Model: GLM-4-9B-0414's shape (Glm4ForCausalLM) with random bf16 weights -- the same FLOPs and memory
as the real weights. Sequence lengths are drawn uniformly from [300, 1100) tokens, like CMCC-34
dialogues behind a system prompt that lists the 34 intents.

Usage on the GPU machine:  python3 seed_recipe_baseline.py [--layers 40] [--qlora] [--steps 8]
Prints one JSON line: real (non-pad) tokens per second and peak GPU memory.
QLoRA needs bitsandbytes (carry its wheel). Measured on one H100 80GB (torch 2.11, transformers 5.17,
peft 0.21): LoRA 1709 tok/s, 29.7 GiB peak; QLoRA nf4 1741 tok/s, 20.8 GiB peak.
"""
import argparse, json, tempfile, time

import numpy as np
import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import Glm4Config, Glm4ForCausalLM

p = argparse.ArgumentParser()
p.add_argument("--layers", type=int, default=40)
p.add_argument("--qlora", action="store_true")
p.add_argument("--steps", type=int, default=8)
p.add_argument("--batch", type=int, default=4)
args = p.parse_args()

cfg = Glm4Config(hidden_size=4096, intermediate_size=13696, num_hidden_layers=args.layers,
                 num_attention_heads=32, num_key_value_heads=2, head_dim=128, vocab_size=151552,
                 max_position_embeddings=32768, rms_norm_eps=1.5625e-07, partial_rotary_factor=0.5,
                 attention_bias=True, tie_word_embeddings=False, pad_token_id=151329, eos_token_id=151329)
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)
with torch.device("cuda"):
    model = Glm4ForCausalLM(cfg)
torch.set_default_dtype(torch.float32)
if args.qlora:
    from transformers import BitsAndBytesConfig
    path = tempfile.mkdtemp()
    model.save_pretrained(path, max_shard_size="5GB"); del model; torch.cuda.empty_cache()
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = Glm4ForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.bfloat16,
                                            device_map={"": 0}, attn_implementation="sdpa")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
else:
    model.config._attn_implementation = "sdpa"
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
model = get_peft_model(model, LoraConfig(r=64, lora_alpha=128, lora_dropout=0.05, task_type="CAUSAL_LM",
                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]))
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
rng = np.random.default_rng(1)
torch.cuda.reset_peak_memory_stats()
times, real = [], 0
for step in range(args.steps + 3):
    lens = [int(x) for x in rng.integers(300, 1100, size=args.batch)]
    L = max(lens)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, L), device="cuda")
    mask = torch.zeros(args.batch, L, dtype=torch.long, device="cuda")
    for i, n in enumerate(lens):
        mask[i, :n] = 1
    torch.cuda.synchronize(); t = time.time()
    loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    if step >= 3:
        times.append(time.time() - t); real += sum(lens)
print(json.dumps(dict(recipe="seed", qlora=args.qlora, layers=args.layers, batch=args.batch,
                      tokens_per_s=round(real / sum(times)),
                      peak_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 2))))
