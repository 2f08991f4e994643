"""DPO and GRPO with LoRA on the GLM-4-9B shape: `glmtune align` vs TRL, same data, same GPU run.

    python3 bench/align_throughput.py [--steps 10] [--warmup 2] [--layers 40] [--tiny] [--only dpo|grpo|all]
                                      [--rank 64] [--batch 8] [--who glmtune,trl]
                                      [--out bench/results/align_throughput.jsonl]

Builds a random bf16 GLM-4-9B-shaped model folder (bench/benchlib.py, saved once under --cache-dir,
with glmtune's GLM-4 tokenizer and glmtune.json) and a synthetic task (prompts of ~200 tokens,
answers of ~64), then runs each configuration in its own process (clean peak memory):

  glmtune-dpo          `glmtune align dpo` (run_alignment) as shipped: packed pairs (prompt once per pair;
                       align.pack_attention auto = FlashAttention varlen with the prompt's keys shared by
                       both answers on CUDA, the block mask elsewhere), reference log-probs once per batch
                       (adapters off), LoRA r{--rank} on every linear layer
  glmtune-dpo-mask     the same with align.pack_attention: mask (SDPA with a (rows, 1, T, T) block mask)
  glmtune-dpo-bf16     glmtune-dpo with align.adapter_dtype: model (bf16 LoRA weights: no fp32 copy of each
                       adapted activation; AdamW on bf16 weights), train's speed.adapter_dtype lever; with
                       it train's fused LoRA layers engage (the run prints "fused LoRA: N of N ...")
  glmtune-dpo-padded   the same with align.packing: false (TRL's padded collator): the packing gain alone
  trl-dpo              DPOTrainer(model=folder, DPOConfig, peft_config=LoraConfig r{--rank} on the same
                       layers), same batch and checkpointing: equal adapter and batch
  trl-dpo-defaults     DPOTrainer with TRL's defaults (LoraConfig q_proj/v_proj r8, its checkpointing on)
  glmtune-grpo         `glmtune align grpo` with a `format` reward, LoRA r{--rank} on every linear layer,
                       rollouts through glmtune's generation engine on the policy being trained
                       (align.rollouts: engine: static KV cache, CUDA-graphed decode, the LoRA read in place)
  glmtune-grpo-generate  the same with align.rollouts: generate (TRL's transformers generate): the
                       engine's gain alone
  trl-grpo             GRPOTrainer(model=folder, GRPOConfig defaults, LoraConfig defaults), same reward
  trl-grpo-equal       GRPOTrainer with glmtune-grpo's settings: LoRA r{--rank} on the same layers, KL 0.05
                       (glmtune's align.kl_coef; TRL's default is 0: no reference forward), same batch,
                       generations, completion length and checkpointing: equal settings

DPO tokens are TRL's `num_tokens` on both sides (the padded batch's attention mask: the prompt counted
for chosen and rejected alike), so glmtune's packing is measured as time, never as a different count.
Each worker prints one JSON line: tokens/s (num_tokens / train_runtime, the first steps included), the
steady figures (`steady_tokens_per_s`, `steady_s_per_step`: the steps after the first --warmup ones,
timed at each optimizer step's end after a CUDA sync, on both sides alike: first-step costs such as
kernel compilation and allocator growth are large next to a 6-layer step), every step's seconds,
peak GiB (glmtune-grpo*: also rollout_s, the mean seconds per step spent generating).
All lines go to --out (raw output) and a markdown table to stdout. `--tiny` runs the same on a CPU
(hidden 256, 2 layers, fp32): a check that every row runs, not a speed figure.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
# PEFT has no default LoRA targets for GLM-4 (its table covers llama-style names by model type), so
# TRL's "defaults" get PEFT's usual llama choice: the query and value projections.
TRL_LORA_TARGETS = ["q_proj", "v_proj"]
# every linear layer of a GLM-4 block: what glmtune's method.target_modules auto picks (peft_setup.LORA_TARGETS)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
WORDS = ("alpha beta gamma delta river stone cloud tiger maple ocean piano lemon comet forest silver candle "
         "harbor violet rocket garden winter falcon meadow").split()


def build_model_dir(args) -> str:
    """The random GLM-4-9B-shape weights (benchlib) + GLM-4 tokenizer + glmtune.json: a glmtune model folder."""
    import benchlib

    from glmtune.models.folder import write_glmtune_meta
    from glmtune.models.tokenizer import load_tokenizer

    cfg = benchlib.glm4_config(layers=args.layers, tiny=args.tiny)
    path = benchlib.saved_model_dir(cfg, args.cache_dir)
    if not os.path.exists(os.path.join(path, "glmtune.json")):
        tok_dir = os.path.join(os.path.dirname(HERE), "glmtune", "resources", "tokenizers", "glm4")
        load_tokenizer(tok_dir).save_pretrained(path)
        write_glmtune_meta(path, template="glm4")
    return path


def build_data(out_dir: str, n: int = 256) -> dict[str, str]:
    """Pairs (prompt ~200 words, answers ~64 words) and prompt-only rows with a reference answer."""
    rng = random.Random(0)
    os.makedirs(out_dir, exist_ok=True)
    text = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    pairs, prompts = os.path.join(out_dir, "pairs.jsonl"), os.path.join(out_dir, "prompts.jsonl")
    with open(pairs, "w") as f, open(prompts, "w") as g:
        for _ in range(n):
            p = text(200)
            f.write(json.dumps({"prompt": p, "chosen": text(64), "rejected": text(64)}) + "\n")
            g.write(json.dumps({"prompt": p, "references": [text(64)]}) + "\n")
    return {"pairs": pairs, "prompts": prompts}


def _cfg(args, model_dir, data, algo, variant: str = "") -> dict:
    import torch
    cfg = {"model": {"path": model_dir, "dtype": "bf16" if torch.cuda.is_available() else "fp32"},
           "data": {"datasets": [data["pairs"] if algo == "dpo" else data["prompts"]], "cutoff_len": 1024},
           "method": {"name": "lora", "r": args.rank, "alpha": 2 * args.rank},
           "train": {"max_steps": args.steps, "batch_size": args.batch, "lr": 1e-5, "seed": 0,
                     "gradient_checkpointing": args.checkpointing},
           "output": {"dir": os.path.join(args.work, args.worker or f"glmtune-{algo}"), "plot": False,
                      "tensorboard": False}}
    if algo == "dpo":
        cfg["align"] = {"padded": {"packing": False}, "mask": {"pack_attention": "mask"},
                        "bf16": {"adapter_dtype": "model"}, "": {}}[variant]
    else:
        cfg["align"] = {"num_generations": args.generations, "max_new_tokens": args.new_tokens,
                        "rollouts": "generate" if variant == "generate" else "engine",
                        "rewards": [{"name": "format", "options": {"pattern": "[a-z ]+"}}]}
    return cfg


def _step_clock() -> list[float]:
    """Wall-clock stamps at the start of training and at the end of every optimizer step, after a CUDA
    sync: transformers' CallbackHandler patched in this worker process, so both sides are timed alike."""
    import torch
    from transformers.trainer_callback import CallbackHandler

    stamps: list[float] = []

    def stamped(hook):
        def call(self, args, state, control, **kw):
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            stamps.append(time.perf_counter())
            return hook(self, args, state, control, **kw)
        return call

    CallbackHandler.on_train_begin = stamped(CallbackHandler.on_train_begin)
    CallbackHandler.on_step_end = stamped(CallbackHandler.on_step_end)
    return stamps


def _steady(stamps: list[float], logs: list[dict], warmup: int) -> dict:
    """Steps after the first `warmup`: tokens/s from TRL's cumulative num_tokens, the median step time."""
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    tokens = {r["step"]: r["num_tokens"] for r in logs if "num_tokens" in r and "step" in r}
    out = {"step_s": [round(t, 3) for t in steps]}
    last = len(steps)
    if last > warmup and warmup in tokens and last in tokens:
        out["steady_tokens_per_s"] = round((tokens[last] - tokens[warmup]) / (stamps[last] - stamps[warmup]), 1)
        out["steady_s_per_step"] = round(sorted(steps[warmup:])[(last - warmup) // 2], 3)
    return out


def _checkpointing_field(config_cls) -> str:
    """TrainingArguments' checkpointing switch by its installed name (transformers 5.24 renamed it)."""
    fields = config_cls.__dataclass_fields__
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


def _format_reward(prompts, completions, **_):
    import re
    return [float(re.fullmatch("[a-z ]+", c.strip()) is not None) for c in completions]


def worker(args) -> dict:
    import torch

    model_dir, data = build_model_dir(args), build_data(os.path.join(args.work, "data"))
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    who, algo, *variant = args.worker.split("-")
    stamps = _step_clock()
    start = time.perf_counter()
    if who == "glmtune":
        from glmtune.align import run_alignment
        trainer = run_alignment(algo, _cfg(args, model_dir, data, algo, "-".join(variant))).trainer
    else:
        from datasets import load_dataset
        from peft import LoraConfig
        import trl
        cols = ["prompt", "chosen", "rejected"] if algo == "dpo" else ["prompt"]
        ds = load_dataset("json", data_files=data["pairs" if algo == "dpo" else "prompts"], split="train")
        ds = ds.select_columns(cols)
        common = dict(output_dir=os.path.join(args.work, args.worker), max_steps=args.steps, report_to="none",
                      per_device_train_batch_size=args.batch, logging_steps=1, save_strategy="no",
                      **({} if torch.cuda.is_available() else {"use_cpu": True}))  # --tiny CPU debug runs
        if algo == "dpo":
            if variant == ["defaults"]:
                conf, lora = trl.DPOConfig(**common), LoraConfig(task_type="CAUSAL_LM", target_modules=TRL_LORA_TARGETS)
            else:  # equal adapter, batch and checkpointing to glmtune-dpo
                conf = trl.DPOConfig(**common, **{_checkpointing_field(trl.DPOConfig): args.checkpointing})
                lora = LoraConfig(task_type="CAUSAL_LM", r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                  target_modules=ALL_LINEAR)
            trainer = trl.DPOTrainer(model=model_dir, args=conf, train_dataset=ds, peft_config=lora)
        else:
            rollout = dict(num_generations=args.generations, max_completion_length=args.new_tokens)
            if variant == ["equal"]:  # glmtune-grpo's adapter, KL, checkpointing
                conf = trl.GRPOConfig(**common, **rollout, beta=0.05,
                                      **{_checkpointing_field(trl.GRPOConfig): args.checkpointing})
                lora = LoraConfig(task_type="CAUSAL_LM", r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                  target_modules=ALL_LINEAR)
            else:
                conf, lora = trl.GRPOConfig(**common, **rollout), LoraConfig(task_type="CAUSAL_LM",
                                                                             target_modules=TRL_LORA_TARGETS)
            trainer = trl.GRPOTrainer(model=model_dir, reward_funcs=_format_reward, args=conf, train_dataset=ds,
                                      peft_config=lora)
        trainer.train()
    wall = time.perf_counter() - start
    logs = trainer.state.log_history
    runtime = next(r["train_runtime"] for r in logs if "train_runtime" in r)
    tokens = max(r.get("num_tokens", 0) for r in logs)
    rollout_s = [r["rollout/seconds"] for r in logs if "rollout/seconds" in r]  # glmtune's trainers log it
    return {"run": args.worker, "steps": trainer.state.global_step, "tokens": tokens,
            "train_runtime_s": round(runtime, 2), "tokens_per_s": round(tokens / runtime, 1),
            "s_per_step": round(runtime / max(trainer.state.global_step, 1), 3), "wall_s": round(wall, 1),
            **_steady(stamps, logs, args.warmup),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
            "batch": args.batch, "layers": args.layers, "tiny": args.tiny, "rank": args.rank,
            "checkpointing": args.checkpointing,
            **({"rollout_s": round(sum(rollout_s) / len(rollout_s), 3)} if rollout_s else {})}


def main() -> None:
    import benchlib

    p = argparse.ArgumentParser()
    benchlib.add_model_args(p)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the steady figures")
    p.add_argument("--batch", type=int, default=8, help="per-device batch (grpo: completions, a multiple of "
                                                         "--generations)")
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--rank", type=int, default=64, help="LoRA rank of the glmtune runs and trl-dpo (alpha 2 x rank)")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in glmtune-* and trl-dpo")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--only", choices=["dpo", "grpo", "all"], default="all")
    p.add_argument("--runs", default=None, help="comma-separated run names to keep (default: every run of --only/--who)")
    p.add_argument("--who", default="glmtune,trl", help="which side(s) to run: glmtune, trl or both")
    p.add_argument("--work", default="/tmp/glmtune_align_bench")
    p.add_argument("--out", default=os.path.join(HERE, "results", "align_throughput.jsonl"))
    p.add_argument("--timeout", type=int, default=1500)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    build_model_dir(args)  # once, before the workers
    variants = {"dpo": {"glmtune": ["glmtune-dpo", "glmtune-dpo-mask", "glmtune-dpo-padded", "glmtune-dpo-bf16"],
                        "trl": ["trl-dpo", "trl-dpo-defaults"]},
                "grpo": {"glmtune": ["glmtune-grpo", "glmtune-grpo-generate"], "trl": ["trl-grpo", "trl-grpo-equal"]}}
    runs = [run for algo in (["dpo", "grpo"] if args.only == "all" else [args.only])
            for who in ("glmtune", "trl") if who in args.who.split(",") for run in variants[algo][who]
            if args.runs is None or run in args.runs.split(",")]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    rows = []
    for run in runs:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", run] + sys.argv[1:]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            line = next((ln[7:] for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            row = json.loads(line) if line else {"run": run, "error": (proc.stderr or proc.stdout)[-1500:]}
        except subprocess.TimeoutExpired:
            row = {"run": run, "error": f"timeout after {args.timeout}s"}
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps({**row, "time": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
    print("\n| run | tokens/s | s/step | steady tokens/s | steady s/step | rollout s/step | peak GiB |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['run']} | {r.get('tokens_per_s', 'error')} | {r.get('s_per_step', '')} | "
              f"{r.get('steady_tokens_per_s', '')} | {r.get('steady_s_per_step', '')} | {r.get('rollout_s', '')} | "
              f"{r.get('peak_gib', '')} |")


if __name__ == "__main__":
    main()
