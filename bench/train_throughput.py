"""Seed recipe vs glmtune, side by side in one device call (issue 6).

    python3 bench/train_throughput.py [--only lora|qlora] [--layers 40] > table

Each configuration runs in its own process (clean peak memory). Prints each JSON line as it
arrives, then a markdown table with tokens/s, peak GiB and the ratio to the seed recipe.
"""
import argparse, json, os, subprocess, sys

HERE = os.path.dirname(os.path.abspath(__file__))
p = argparse.ArgumentParser()
p.add_argument("--only", choices=["lora", "qlora", "all"], default="all")
p.add_argument("--layers", type=int, default=40)
p.add_argument("--timeout", type=int, default=200)
p.add_argument("--variants", default="", help="semicolon-separated worker arg lists to run instead of the defaults")
args = p.parse_args()

LORA = ["--pack 4 --attn varlen --liger all --check",
        "--pack 4 --attn varlen --liger flce --compile",
        "--pack 2 --attn varlen --liger flce --compile",
        "--pack 4 --attn varlen --liger flce --compile --ckpt"]
QLORA = ["--qlora --pack 2 --attn varlen --liger flce --compile",
         "--qlora --pack 1 --attn varlen --liger flce --compile"]


def run(cmd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
        lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
        if lines:
            return json.loads(lines[-1])
        return {"cmd": " ".join(cmd[2:]), "error": (out.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    except subprocess.TimeoutExpired:
        return {"cmd": " ".join(cmd[2:]), "error": f"timeout {args.timeout}s"}


rows = []
groups = []
if args.only in ("lora", "all"):
    groups.append((["--layers", str(args.layers)], LORA))
if args.only in ("qlora", "all"):
    groups.append((["--layers", str(args.layers), "--qlora"], QLORA))
for seed_args, variants in groups:
    if args.variants:
        variants = [v for v in args.variants.split(";") if ("--qlora" in v) == ("--qlora" in seed_args)]
    seed = run([sys.executable, os.path.join(HERE, "seed_recipe_baseline.py"), *seed_args])
    print(json.dumps(seed), flush=True); rows.append(seed)
    for v in variants:
        r = run([sys.executable, os.path.join(HERE, "glmtune_worker.py"), "--layers", str(args.layers), *v.split()])
        r["args"] = v
        if "tokens_per_s" in r and "tokens_per_s" in seed:
            r["ratio"] = round(r["tokens_per_s"] / seed["tokens_per_s"], 2)
        print(json.dumps(r), flush=True); rows.append(r)
print("\n| recipe | args | tokens/s | peak GiB | ratio vs seed |\n|---|---|---|---|---|")
for r in rows:
    print(f"| {r.get('recipe', '?')}{' qlora' if r.get('qlora') else ''} | {r.get('args', '')} | "
          f"{r.get('tokens_per_s', r.get('error', ''))} | {r.get('peak_GiB', '')} | {r.get('ratio', '1.00' if r.get('recipe') == 'seed' else '')} |")
