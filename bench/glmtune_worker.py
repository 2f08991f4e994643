"""One glmtune training configuration on the GPU (a worker of bench/train_throughput.py).

Same model shape, lengths and optimizer steps as bench/seed_recipe_baseline.py: GLM-4-9B-0414's
shape with random bf16 weights; each optimizer step sees 4 sequences with lengths ~ U[300, 1100)
from default_rng(1). glmtune processes them padding-free: `--pack` sequences per packed row, varlen
FlashAttention, gradients accumulated over the rows, loss = mean over the step's target tokens.
Prints one JSON line.
"""
import argparse, contextlib, json, time

import numpy as np
import torch

p = argparse.ArgumentParser()
p.add_argument("--layers", type=int, default=40)
p.add_argument("--steps", type=int, default=8)
p.add_argument("--pack", type=int, default=4)
p.add_argument("--attn", default="varlen", choices=["varlen", "sdpa", "flex_attention"])
p.add_argument("--liger", default="all", choices=["all", "flce", "none"])
p.add_argument("--compile", action="store_true")
p.add_argument("--ckpt", action="store_true")
p.add_argument("--qlora", action="store_true")
p.add_argument("--check", action="store_true", help="varlen vs SDPA attention check and loss parity vs the seed's loss")
args = p.parse_args()

from peft import LoraConfig, get_peft_model
from transformers import Glm4Config, Glm4ForCausalLM

from glmtune.models import speed

if args.liger != "none":
    speed.apply_liger("glm4", fused_linear_cross_entropy=True, rms_norm=args.liger == "all",
                      swiglu=args.liger == "all")
attn = speed.register_varlen_attention() if args.attn == "varlen" else args.attn

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
    import tempfile
    from transformers import BitsAndBytesConfig
    path = tempfile.mkdtemp()
    model.save_pretrained(path, max_shard_size="5GB"); del model; torch.cuda.empty_cache()
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = Glm4ForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.bfloat16,
                                            device_map={"": 0})
model.config._attn_implementation = attn
if args.ckpt:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
lcfg = LoraConfig(r=64, lora_alpha=128, lora_dropout=0.0, task_type="CAUSAL_LM",
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"])
# bf16 adapters: peft's default fp32 adapters cast every LoRA input to fp32 (measured: -23% tokens/s, +12 GiB)
model = get_peft_model(model, lcfg, autocast_adapter_dtype=False)
model.train()
if args.compile:
    speed.compile_decoder_layers(model)
opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=2e-4, fused=True)
rng = np.random.default_rng(1)


def micro_batches(lens):
    for i in range(0, len(lens), args.pack):
        g = lens[i:i + args.pack]
        ids = torch.randint(0, cfg.vocab_size, (1, sum(g)), device="cuda")
        pos = torch.cat([torch.arange(n, device="cuda") for n in g]).unsqueeze(0)
        labels = ids.clone()
        labels[0, torch.as_tensor(np.cumsum([0] + g[:-1]), device="cuda")] = -100  # no cross-sequence targets
        extra = speed.cu_seqlens_kwargs(g, "cuda") if attn == speed.VARLEN_IMPL else {}
        yield g, ids, pos, labels, extra


def step(lens=None):
    lens = lens or [int(x) for x in rng.integers(300, 1100, size=4)]
    targets = sum(lens) - len(lens)
    total_loss = 0.0
    for g, ids, pos, labels, extra in micro_batches(lens):
        out = model(input_ids=ids, position_ids=pos, labels=labels, **extra)
        part = out.loss * (sum(g) - len(g)) / targets  # mean over the whole step's targets
        part.backward()
        total_loss += part.detach()
    opt.step(); opt.zero_grad(set_to_none=True)
    return sum(lens), total_loss


res = dict(recipe="glmtune", pack=args.pack, attn=args.attn, liger=args.liger, compile=args.compile,
           ckpt=args.ckpt, qlora=args.qlora, layers=args.layers)
if args.check:
    # 1) varlen attention vs SDPA per sequence (the reference), bf16, on random q/k/v
    from torch.nn.functional import scaled_dot_product_attention as sdpa
    lens = [300, 517, 1099]
    T = sum(lens)
    qh, kh = torch.randn(1, 32, T, 128, device="cuda", dtype=torch.bfloat16), torch.randn(1, 2, T, 128, device="cuda", dtype=torch.bfloat16)
    vh = torch.randn(1, 2, T, 128, device="cuda", dtype=torch.bfloat16)
    got, _ = speed.varlen_attention_forward(None, qh, kh, vh, None, scaling=128 ** -0.5, **speed.cu_seqlens_kwargs(lens, "cuda"))
    refs, s = [], 0
    for n in lens:
        refs.append(sdpa(qh[:, :, s:s + n], kh[:, :, s:s + n].repeat_interleave(16, 1), vh[:, :, s:s + n].repeat_interleave(16, 1), is_causal=True).transpose(1, 2))
        s += n
    res["varlen_vs_sdpa_maxabs"] = float((got.float() - torch.cat(refs, 1).float()).abs().max())
    # 2) loss parity: the seed's padded batch loss (HF loss, SDPA) vs glmtune's packed loss, same weights
    lens = [int(x) for x in np.random.default_rng(7).integers(300, 1100, size=4)]
    torch.manual_seed(3)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), device="cuda") for n in lens]
    L = max(lens)
    ids = torch.full((4, L), 151329, device="cuda"); mask = torch.zeros(4, L, dtype=torch.long, device="cuda")
    for i, sq in enumerate(seqs):
        ids[i, :len(sq)] = sq; mask[i, :len(sq)] = 1
    model.eval()
    with torch.no_grad():
        model.config._attn_implementation = "sdpa"
        hidden = model.base_model.model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = model.base_model.model.lm_head(hidden).float()
        lab = ids.masked_fill(mask == 0, -100)
        seed_loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1), ignore_index=-100)
        model.config._attn_implementation = attn
        packed = torch.cat(seqs).unsqueeze(0)
        pos = torch.cat([torch.arange(n, device="cuda") for n in lens]).unsqueeze(0)
        plab = packed.clone(); plab[0, torch.as_tensor(np.cumsum([0] + lens[:-1]), device="cuda")] = -100
        extra = speed.cu_seqlens_kwargs(lens, "cuda") if attn == speed.VARLEN_IMPL else {}
        ours = model(input_ids=packed, position_ids=pos, labels=plab, **extra).loss.float()
    model.train()
    res["seed_loss"], res["glmtune_loss"] = float(seed_loss), float(ours)
    res["loss_rel_diff"] = abs(float(ours) / float(seed_loss) - 1)

for _ in range(3):
    step()
torch.cuda.synchronize()
torch.cuda.reset_peak_memory_stats()
for _ in range(2):
    step()
times, real = [], 0
for _ in range(args.steps):
    torch.cuda.synchronize(); t = time.time(); n, _ = step(); torch.cuda.synchronize()
    times.append(time.time() - t); real += n
res.update(tokens_per_s=round(real / sum(times)), peak_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 2))
print(json.dumps(res), flush=True)
