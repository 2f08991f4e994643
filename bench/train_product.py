"""`glmtune train` as a user runs it, beside the seed recipe, in one device call (issue 15).

    python3 bench/train_product.py --out $OUT [--only lora|qlora|all] [--variants "NAME: --set k=v ...; ..."]
                                   [--layers 40] [--steps 24] [--records 600] [--tiny]

1. Writes, once, a GLM-4-9B-0414-shaped model folder with random bf16 weights (same FLOPs and memory
   as the real weights; the shape of ../shared/bench/seed_recipe_baseline.py) plus glmtune's bundled
   GLM-4 tokenizer, and 600 synthetic conversations of U[300, 1100) tokens (the seed's lengths).
2. Runs the seed recipe (bench/seed_with_reserved.py, unchanged seed + reserved memory) for LoRA and/or QLoRA.
3. Runs `python -m glmtune.cli.main train CONFIG --set ...` for each variant: a YAML config with
   LoRA r64/alpha128 on all linear layers, batch 4, `train_on: everything`, and reads tokens/s and peak
   memory back from the run's metrics.jsonl (the median over logging windows after the warm-up).
Nothing here builds or steps a model for glmtune: the figure is what `glmtune train` prints.
Prints one JSON line per run and a markdown table; raw logs land in --out.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

DEFAULT_VARIANTS = {
    "lora": [
        "preset-auto: ",  # what a preset user gets: every speed lever left at auto
        "fast: --set method.dropout=0 --set speed.adapter_dtype=model",
    ],
    "qlora": [
        "qlora-fast: --set method.name=qlora --set method.dropout=0 --set speed.adapter_dtype=model "
        "--set train.gradient_checkpointing=true",
    ],
}


def glm4_9b_config(layers: int, tiny: bool):
    from transformers import Glm4Config

    shape = dict(hidden_size=4096, intermediate_size=13696, num_attention_heads=32, num_key_value_heads=2,
                 head_dim=128)
    if tiny:  # CPU dry run of the bench itself
        shape = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=16)
        layers = 2
    return Glm4Config(**shape, num_hidden_layers=layers, vocab_size=151552, max_position_embeddings=32768,
                      rms_norm_eps=1.5625e-07, partial_rotary_factor=0.5, attention_bias=True,
                      tie_word_embeddings=False, pad_token_id=151329, eos_token_id=[151329, 151336, 151338])


def write_model_folder(path: Path, layers: int, tiny: bool) -> Path:
    """Random bf16 weights, built on the GPU (seconds) and saved once; reused by every run."""
    import torch
    from transformers import Glm4ForCausalLM

    from glmtune.models.folder import write_glmtune_meta
    from glmtune.models.tokenizer import load_tokenizer

    if (path / "glmtune.json").exists():
        return path
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = Glm4ForCausalLM(glm4_9b_config(layers, tiny))
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(path, max_shard_size="5GB")
    del model
    load_tokenizer(REPO / "glmtune/resources/tokenizers/glm4").save_pretrained(path)
    write_glmtune_meta(path, template="glm4")
    return path


def write_records(path: Path, model_dir: Path, n: int, seed: int = 1) -> Path:
    """n conversations whose encoded length is U[300, 1100) tokens: a user turn of random text and a
    short answer. Text is decoded from random ordinary-token ids, so its length in tokens is close to
    the number of ids drawn."""
    import numpy as np

    from glmtune.io import write_jsonl_atomic
    from glmtune.models.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    rng = np.random.default_rng(seed)
    lo, hi = 1000, 100000  # ordinary BPE tokens, far from the special ids
    records = []
    for length in rng.integers(300, 1100, size=n):
        user = tok.decode(rng.integers(lo, hi, size=int(length) - 40).tolist())
        answer = tok.decode(rng.integers(lo, hi, size=24).tolist())
        records.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})
    write_jsonl_atomic(path, records)
    return path


def write_config(path: Path, model_dir: Path, data: Path, steps: int) -> Path:
    import yaml

    cfg = {
        "model": {"path": str(model_dir), "dtype": "bf16"},
        "data": {"datasets": [str(data)], "cutoff_len": 1152, "train_on": "everything"},
        "method": {"name": "lora", "r": 64, "alpha": 128, "dropout": 0.05, "target_modules": "all-linear"},
        "train": {"max_steps": steps, "batch_size": 4, "lr": 2e-4, "log_every": 1},
        "output": {"dir": "REPLACED", "plot": False, "tensorboard": False},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def summarize_metrics(metrics: Path, warmup: int) -> dict:
    rows = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()] if metrics.exists() else []
    rows = [r for r in rows if "loss" in r]
    steady = rows[warmup:] or rows
    if not steady:
        return {"error": "no metrics"}
    out = {"steps": len(rows), "final_loss": round(rows[-1]["loss"], 4),
           "losses": [round(r["loss"], 4) for r in rows[:20]]}  # the curve, to compare runs at one global batch
    for key in ("input_tokens_per_s", "tokens_per_s"):
        vals = [r[key] for r in steady if r.get(key) is not None]
        if vals:
            out[key] = round(statistics.median(vals), 1)
    for key in ("peak_mem_allocated_gib", "peak_mem_reserved_gib"):
        vals = [r[key] for r in rows if r.get(key) is not None]
        if vals:
            out[key] = max(vals)
    return out


def run_glmtune(name: str, args: str, config: Path, out_dir: Path, timeout: int, warmup: int) -> dict:
    run_dir = out_dir / f"run_{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "glmtune.cli.main", "train", str(config), "--set", f"output.dir={run_dir}",
           *args.split()]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    log = out_dir / f"log_{name}.txt"
    with open(log, "w") as f:
        # its own session: on a timeout the whole tree goes (`--nproc N` runs accelerate's launcher and
        # N workers, which would go on writing into a folder this script is about to delete)
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = "timeout"
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    result = {"recipe": "glmtune train", "variant": name, "args": args, "rc": rc,
              "wall_s": round(time.time() - t0, 1), **summarize_metrics(run_dir / "metrics.jsonl", warmup)}
    speed_lines = [l for l in log.read_text(errors="replace").splitlines() if "speed" in l.lower()][:4]
    result["speed_log"] = speed_lines
    if rc != 0:
        result["log_tail"] = log.read_text(errors="replace").splitlines()[-5:]
    if (run_dir / "metrics.jsonl").exists():
        shutil.copy(run_dir / "metrics.jsonl", out_dir / f"metrics_{name}.jsonl")
    if (run_dir / "profile.txt").exists():  # output.profile_steps: keep the report, not the (large) trace
        shutil.copy(run_dir / "profile.txt", out_dir / f"profile_{name}.txt")
        result["profile"] = (run_dir / "profile.txt").read_text().splitlines()[:2]
    shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints of a 9B model: tens of GB per run
    return result


def run_seed(qlora: bool, layers: int, timeout: int) -> dict:
    cmd = [sys.executable, str(HERE / "seed_with_reserved.py"), "--layers", str(layers)] + (["--qlora"] if qlora else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
        if lines:
            return {"recipe": "seed", "qlora": qlora, **json.loads(lines[-1])}
        return {"recipe": "seed", "qlora": qlora, "error": (out.stderr.strip().splitlines() or ["?"])[-1][:300]}
    except subprocess.TimeoutExpired:
        return {"recipe": "seed", "qlora": qlora, "error": f"timeout {timeout}s"}


def parse_variants(text: str) -> list[tuple[str, str]]:
    pairs = []
    for item in text.split(";"):
        if item.strip():
            name, _, args = item.partition(":")
            pairs.append((name.strip(), args.strip()))
    return pairs


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/glmtune_bench"))
    p.add_argument("--only", choices=["lora", "qlora", "all"], default="all")
    p.add_argument("--variants", default="", help="'NAME: ARGS; NAME: ARGS' (qlora variants name method.name=qlora)")
    p.add_argument("--layers", type=int, default=40)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--warmup", type=int, default=6, help="logged steps left out of the median (compile, capture)")
    p.add_argument("--records", type=int, default=600)
    p.add_argument("--timeout", type=int, default=300)
    p.add_argument("--seed-groups", default="lora,qlora", help="groups that run the seed recipe ('' = none)")
    p.add_argument("--tiny", action="store_true", help="CPU dry run: a 2-layer model of the same family")
    p.add_argument("--model-dir", default="/tmp/glmtune_bench_glm4_9b")
    args = p.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.model_dir + ("_tiny" if args.tiny else ""))
    t0 = time.time()
    model_dir = write_model_folder(work, args.layers, args.tiny)
    data = write_records(work / "records.jsonl", model_dir, args.records)
    config = write_config(work / "bench.yaml", model_dir, data, args.steps)
    print(json.dumps({"setup_s": round(time.time() - t0, 1), "model": str(model_dir)}), flush=True)

    groups = ["lora", "qlora"] if args.only == "all" else [args.only]
    custom = parse_variants(args.variants)
    rows = []
    for group in groups:
        qlora = group == "qlora"
        variants = ([v for v in custom if ("method.name=qlora" in v[1]) == qlora] if custom
                    else parse_variants(";".join(DEFAULT_VARIANTS[group])))
        if not variants:
            continue
        seed = run_seed(qlora, args.layers, args.timeout) if group in args.seed_groups and not args.tiny else {}
        if seed:
            print(json.dumps(seed), flush=True)
            rows.append(seed)
        for name, vargs in variants:
            r = run_glmtune(name, vargs, config, out, args.timeout, args.warmup)
            tps = r.get("input_tokens_per_s", r.get("tokens_per_s"))
            if tps and seed.get("tokens_per_s"):
                r["ratio"] = round(tps / seed["tokens_per_s"], 2)
            print(json.dumps(r), flush=True)
            rows.append(r)

    with open(out / "train_product.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print("\n| recipe | variant | tokens/s (all input tokens) | peak allocated GiB | peak reserved GiB | vs seed |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        tps = r.get("input_tokens_per_s", r.get("tokens_per_s", r.get("error", "")))
        alloc = r.get("peak_mem_allocated_gib", r.get("peak_GiB", ""))
        resv = r.get("peak_mem_reserved_gib", r.get("reserved_GiB", ""))
        ratio = r.get("ratio", "1.00" if r.get("recipe") == "seed" and "tokens_per_s" in r else "")
        name = r.get("variant", "qlora" if r.get("qlora") else "lora")
        print(f"| {r['recipe']} | {name} | {tps} | {alloc} | {resv} | {ratio} |")


if __name__ == "__main__":
    main()
