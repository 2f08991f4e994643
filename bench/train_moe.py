"""Mixture-of-experts LoRA on one GPU (issue 25, section 4): `glmtune train` beside the plain recipe.

    python3 bench/train_moe.py --out $OUT [--layers 47] [--steps 16] [--variants "NAME: --set k=v ...; ..."]
    python3 bench/train_moe.py --dry-run --out /tmp/moe_dry     # CPU: tiny Glm4MoeLite, 3 steps per run

1. Writes, once, a Glm4MoeLite folder of GLM-4.7-Flash's shape (hidden 2048, 47 layers, MLA attention,
   64 routed experts top-4 + 1 shared, vocab 154880: ~31B parameters, ~3.3B active per token) with
   random bf16 weights, glmtune's bundled GLM-4 tokenizer and 600 synthetic conversations of
   U[300, 1100) tokens (bench/train_product.py's). ~62 GB: --model-dir must have the room (the script
   checks; /dev/shm works on a 128 GiB host); --layers N writes a shallower model of the same widths.
2. `plain`: the recipe a user writes today, in a subprocess: transformers (grouped_mm experts, its
   default), PEFT LoRA with parameter targeting (the same targets as glmtune: attention, dense and
   shared MLPs, routed experts; r16), padded batches of 4, gradient checkpointing, bf16 autocast with
   fp32 adapters, torch AdamW.
3. `glmtune train CONFIG --set ...` per variant (same data, batch 4, same LoRA), read back from its
   metrics.jsonl: tokens/s (all non-pad input tokens, median after the warm-up) and peak memory.
Each run prints one JSON line; then a markdown table with tokens/s, peak memory, the ratio to the
plain recipe and the active-parameter FLOPs utilisation: 6 x active parameters (no embeddings) x
tokens/s over the GPU's dense bf16 peak (--peak-tflops, H200: 989). LoRA skips the frozen weights'
gradients, so 4 x N of the 6 x N is the work done: the column is the usual MFU convention.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from train_product import parse_variants, run_glmtune, write_records  # noqa: E402

# GLM-4.7-Flash (zai-org/GLM-4.7-Flash config.json) = transformers' Glm4MoeLiteConfig defaults
FLASH = dict(vocab_size=154880, hidden_size=2048, intermediate_size=10240, moe_intermediate_size=1536,
             num_hidden_layers=47, num_attention_heads=20, num_key_value_heads=20, n_shared_experts=1,
             n_routed_experts=64, routed_scaling_factor=1.8, kv_lora_rank=512, q_lora_rank=768,
             qk_rope_head_dim=64, v_head_dim=256, qk_nope_head_dim=192, n_group=1, topk_group=1,
             num_experts_per_tok=4, norm_topk_prob=True, max_position_embeddings=202752, rms_norm_eps=1e-5,
             tie_word_embeddings=False, pad_token_id=151329, eos_token_id=[151329, 151336, 151338])
TINY = dict(FLASH, vocab_size=151552, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
            num_experts_per_tok=2, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8, v_head_dim=16,
            qk_nope_head_dim=16)
LORA = dict(r=16, alpha=32)
DEFAULT_VARIANTS = (
    "glmtune-auto: ;"                                      # every lever at auto (fp32 adapters)
    "glmtune-fast: --set speed.adapter_dtype=model;"       # + fused LoRA on the linears (bf16 adapters)
    "glmtune-fast-gc: --set speed.adapter_dtype=model --set train.gradient_checkpointing=true"
)


def flash_config(layers: int, tiny: bool):
    from transformers import Glm4MoeLiteConfig

    shape = dict(TINY if tiny else FLASH)
    shape["num_hidden_layers"] = min(layers, shape["num_hidden_layers"]) if tiny else layers
    shape["mlp_layer_types"] = ["dense"] + ["sparse"] * (shape["num_hidden_layers"] - 1)
    return Glm4MoeLiteConfig(**shape)


def param_counts(config) -> dict:
    """Total and active parameters (routed experts count k/E; embeddings left out of active)."""
    import torch
    from transformers import Glm4MoeLiteForCausalLM

    with torch.device("meta"):
        model = Glm4MoeLiteForCausalLM(config)
    total = experts = embed = 0
    for name, p in model.named_parameters():
        total += p.numel()
        experts += p.numel() if ".mlp.experts." in name else 0
        embed += p.numel() if "embed_tokens" in name else 0
    share = config.num_experts_per_tok / config.n_routed_experts
    return {"total": total, "active": int(total - embed - experts * (1 - share))}


def write_model_folder(path: Path, config, tiny: bool) -> Path:
    """Random bf16 weights (fp32 for the CPU dry run), built on the GPU layer by layer and saved once."""
    import torch
    from transformers import Glm4MoeLiteForCausalLM

    from glmtune.models.folder import write_glmtune_meta
    from glmtune.models.tokenizer import load_tokenizer

    if (path / "glmtune.json").exists():
        return path
    need = param_counts(config)["total"] * (4 if tiny else 2) * 1.02
    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free
    if free < need:
        sys.exit(f"error: {path.parent} has {free / 2**30:.0f} GiB free, the model needs {need / 2**30:.0f} GiB. "
                 f"Fix: --model-dir on a bigger disk (e.g. /dev/shm/...), or --layers N for a shallower model")
    torch.manual_seed(0)
    dtype = torch.float32 if tiny else torch.bfloat16
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Glm4MoeLiteForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():  # route over the experts (the configs' 0.02 router ties at sigmoid(0) = 0.5)
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.2)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="5GB")
    del model
    # the runs that follow are other processes: hand this one's ~60 GB of GPU memory back first
    import gc
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    load_tokenizer(REPO / "glmtune/resources/tokenizers/glm4").save_pretrained(tmp)
    write_glmtune_meta(tmp, template="glm4")
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def write_short_records(path: Path, n: int) -> Path:
    """The dry run's data: n short conversations (a CPU computes 151,552-way logits for every token)."""
    from glmtune.io import write_jsonl_atomic

    words = "red blue green cat dog bird stone river cloud lemon piano ocean".split()
    write_jsonl_atomic(path, [{"messages": [{"role": "user", "content": " ".join(words[(i + j) % 12] for j in range(8 + i % 9))},
                                            {"role": "assistant", "content": words[i % 12]}]} for i in range(n)])
    return path


def write_config(path: Path, model_dir: Path, data: Path, steps: int, tiny: bool) -> Path:
    import yaml

    cfg = {
        "model": {"path": str(model_dir), "dtype": "fp32" if tiny else "bf16"},
        "data": {"datasets": [str(data)], "cutoff_len": 1152, "train_on": "everything"},
        "method": {"name": "lora", "r": LORA["r"], "alpha": LORA["alpha"], "dropout": 0.0, "target_modules": "auto"},
        "train": {"max_steps": steps, "batch_size": 4, "lr": 2e-4, "log_every": 1},
        "output": {"dir": "REPLACED", "plot": False, "tensorboard": False},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------------
# the plain recipe (run as `train_moe.py plain ...` in its own process: its memory is its own)

def plain_recipe(model_dir: str, data: str, steps: int, warmup: int, batch: int = 4, cutoff: int = 1152) -> dict:
    import random

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from glmtune.models.tokenizer import load_tokenizer
    from glmtune.templates import get_template

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32,
                                                 device_map=dev)
    model.config.use_cache = False
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    kw = "activation_checkpointing_kwargs" if hasattr(model, "activation_checkpointing_enable") else \
        "gradient_checkpointing_kwargs"
    enable(**{kw: {"use_reentrant": False}})
    model.enable_input_require_grads()
    # what the PEFT docs show for fused MoE experts; the linears by module name where PEFT keeps them
    # (its transformers-5 conversion turns module names gate_proj/up_proj/down_proj into the experts)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
                      target_parameters=["gate_proj.weight", "up_proj.weight", "down_proj.weight",
                                         "mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    model = get_peft_model(model, lora)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    tok, tpl = load_tokenizer(model_dir), get_template("glm4")
    records = [json.loads(line) for line in open(data, encoding="utf-8")]
    encs = [tpl.encode(tok, r["messages"], train_on="everything") for r in records]
    random.Random(0).shuffle(encs)
    pad = tok.pad_token_id
    times, tokens, losses = [], [], []
    model.train()
    for step in range(steps):
        chunk = encs[step * batch:(step + 1) * batch]
        width = min(max(len(e.input_ids) for e in chunk), cutoff)
        ids = torch.tensor([e.input_ids[:width] + [pad] * (width - len(e.input_ids[:width])) for e in chunk])
        labels = torch.tensor([e.labels[:width] + [-100] * (width - len(e.labels[:width])) for e in chunk])
        mask = torch.tensor([[1] * min(len(e.input_ids), width) + [0] * (width - min(len(e.input_ids), width))
                             for e in chunk])
        if cuda:
            torch.cuda.synchronize()
        t0 = time.time()
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), labels=labels.to(dev)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.time() - t0)
        tokens.append(int(mask.sum()))
        losses.append(round(float(loss.detach()), 4))
    steady = list(range(min(warmup, steps - 1), steps))
    out = {"recipe": "plain", "variant": "transformers+peft (padded, checkpointing)", "steps": steps,
           "input_tokens_per_s": round(statistics.median(tokens[i] / times[i] for i in steady), 1),
           "losses": losses[:20], "final_loss": losses[-1]}
    if cuda:
        out["peak_mem_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out["peak_mem_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    return out


def run_plain(model_dir: Path, data: Path, steps: int, warmup: int, timeout: int, out_dir: Path) -> dict:
    cmd = [sys.executable, __file__, "plain", str(model_dir), str(data), str(steps), str(warmup)]
    log = out_dir / "log_plain.txt"
    try:
        with open(log, "w") as f:
            subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    except subprocess.TimeoutExpired:
        return {"recipe": "plain", "error": f"timeout {timeout}s"}
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith('{"recipe"')]
    if lines:
        return json.loads(lines[-1])
    return {"recipe": "plain", "error": (log.read_text(errors="replace").strip().splitlines() or ["?"])[-1][:300]}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "plain":
        model_dir, data, steps, warmup = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
        print(json.dumps(plain_recipe(model_dir, data, steps, warmup)), flush=True)
        return
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/glmtune_bench_moe"))
    p.add_argument("--layers", type=int, default=47)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--warmup", type=int, default=5, help="logged steps left out of the median (compile)")
    p.add_argument("--records", type=int, default=600)
    p.add_argument("--timeout", type=int, default=420, help="seconds per run")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help="'NAME: ARGS; NAME: ARGS' for glmtune train")
    p.add_argument("--no-plain", action="store_true", help="skip the plain recipe")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H200/H100: 989)")
    p.add_argument("--dry-run", "--tiny", action="store_true",
                   help="CPU: a tiny Glm4MoeLite (3 layers, 8 experts), 3 steps per run, 24 records")
    p.add_argument("--model-dir", default="/dev/shm/glmtune_bench_glm47_flash")
    args = p.parse_args()
    if args.dry_run:
        args.steps, args.warmup, args.records = 3, 1, 24
        args.model_dir = args.model_dir.replace("/dev/shm/", "/tmp/") + "_tiny"

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = flash_config(args.layers, args.dry_run)
    counts = param_counts(config)
    work = Path(args.model_dir + ("" if args.dry_run or args.layers == 47 else f"_l{args.layers}"))
    t0 = time.time()
    model_dir = write_model_folder(work, config, args.dry_run)
    data = (write_short_records(work / "records.jsonl", args.records) if args.dry_run
            else write_records(work / "records.jsonl", model_dir, args.records))
    cfg = write_config(work / "bench.yaml", model_dir, data, args.steps, args.dry_run)
    print(json.dumps({"setup_s": round(time.time() - t0, 1), "model": str(model_dir),
                      "params_total": counts["total"], "params_active": counts["active"],
                      "layers": config.num_hidden_layers}), flush=True)

    rows = []
    plain = {} if args.no_plain else run_plain(model_dir, data, args.steps, args.warmup, args.timeout, out)
    if plain:
        print(json.dumps(plain), flush=True)
        rows.append(plain)
    for name, vargs in parse_variants(args.variants):
        r = run_glmtune(name, vargs, cfg, out, args.timeout, args.warmup)
        if r.get("input_tokens_per_s") and plain.get("input_tokens_per_s"):
            r["ratio"] = round(r["input_tokens_per_s"] / plain["input_tokens_per_s"], 2)
        print(json.dumps(r), flush=True)
        rows.append(r)
    for r in rows:
        if r.get("input_tokens_per_s"):
            r["active_flops_util"] = round(6 * counts["active"] * r["input_tokens_per_s"] / (args.peak_tflops * 1e12), 4)

    with open(out / "train_moe.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"\nGlm4MoeLite, GLM-4.7-Flash widths, {config.num_hidden_layers} layers: {counts['total'] / 1e9:.2f}B "
          f"parameters, {counts['active'] / 1e9:.2f}B active; LoRA r{LORA['r']}, batch 4, {args.steps} steps")
    print("| recipe | variant | tokens/s | peak allocated GiB | peak reserved GiB | vs plain | active FLOPs util |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        tps = r.get("input_tokens_per_s", r.get("error", r.get("log_tail", "")))
        print(f"| {r['recipe']} | {r.get('variant', '')} | {tps} | {r.get('peak_mem_allocated_gib', '')} | "
              f"{r.get('peak_mem_reserved_gib', '')} | {r.get('ratio', '1.00' if r['recipe'] == 'plain' else '')} | "
              f"{r.get('active_flops_util', '')} |")


if __name__ == "__main__":
    main()
