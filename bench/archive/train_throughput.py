"""Superseded (bench/archive/README.md): a record of how the H100 figures of bench/RESULTS.md sessions 1-3 were measured, on a bench-side model set-up; current figures come from bench/train_product.py, which drives `glmtune train`.

Seed recipe vs glmtune, side by side in one device call (issue 6).

    python3 bench/archive/train_throughput.py [--only lora|qlora|all] [--preset pack|levers] [--variants "A;B"] [--layers 40]

Each configuration runs in its own process (clean peak memory): the seed recipe first
(bench/seed_recipe_baseline.py, batch 4), then each glmtune variant (bench/glmtune_worker.py args).
Prints each JSON line as it arrives, then a markdown table with tokens/s, peak GiB and the ratio to
the seed recipe. A variant that fails (out of memory, timeout) prints a line with "error" and the
run goes on.

Presets (variants per group; `--variants` replaces them, split by --qlora into the two groups):
  pack   (call 4): pack 8 / 16 sequences per row with checkpointing; QLoRA also pack 4 without it.
  levers (call 2/3): the single-lever table of bench/RESULTS.md calls 2 and 3.
Sequences per optimizer step = pack x accum (see bench/glmtune_worker.py): pack 8 / 16 step over
8 / 16 sequences, 2x / 4x the seed's batch of 4, over the same sequence stream.
"""
import argparse, json, os, shutil, subprocess, sys, tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PRESETS = {
    "pack": {
        "lora": ["--pack 8 --attn varlen --liger flce --compile --ckpt",
                 "--pack 16 --attn varlen --liger flce --compile --ckpt"],
        "qlora": ["--qlora --pack 8 --attn varlen --liger flce --compile --ckpt",
                  "--qlora --pack 16 --attn varlen --liger flce --compile --ckpt",
                  "--qlora --pack 4 --attn varlen --liger flce --compile"],
    },
    "levers": {
        "lora": ["--pack 4 --attn varlen --liger all --check",
                 "--pack 4 --attn varlen --liger flce --compile",
                 "--pack 2 --attn varlen --liger flce --compile",
                 "--pack 4 --attn varlen --liger flce --compile --ckpt"],
        "qlora": ["--qlora --pack 4 --attn varlen --liger flce --compile --ckpt"],
    },
}

p = argparse.ArgumentParser()
p.add_argument("--only", choices=["lora", "qlora", "all"], default="all")
p.add_argument("--preset", choices=sorted(PRESETS), default="pack")
p.add_argument("--layers", type=int, default=40)
p.add_argument("--timeout", type=int, default=200, help="seconds per configuration (process)")
p.add_argument("--variants", default="", help="semicolon-separated worker arg lists to run instead of the preset")
p.add_argument("--no-seed", action="store_true", help="skip the seed recipe (no ratio column)")
p.add_argument("--extra", default="", help="args added to every worker and seed call (e.g. --tiny for a CPU dry run)")
args = p.parse_args()


def run(cmd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(HERE)),
                                                        os.environ.get("PYTHONPATH", "")])}
    tmp = tempfile.mkdtemp(prefix="glmtune_bench_")
    env["TMPDIR"] = tmp  # the seed's QLoRA saves its 18 GB model under tempfile.mkdtemp(): removed after
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
        lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
        if lines:
            return json.loads(lines[-1])
        err = (out.stderr.strip().splitlines() or ["no output"])[-1][:300]
        if "OutOfMemoryError" in out.stderr or "out of memory" in out.stderr:
            err = "out of memory: " + err
        return {"cmd": " ".join(cmd[1:]), "error": err}
    except subprocess.TimeoutExpired:
        return {"cmd": " ".join(cmd[1:]), "error": f"timeout {args.timeout}s"}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


rows = []
extra = args.extra.split()
for group in (["lora", "qlora"] if args.only == "all" else [args.only]):
    qlora = group == "qlora"
    variants = PRESETS[args.preset][group]
    if args.variants:
        variants = [v.strip() for v in args.variants.split(";") if v.strip() and ("--qlora" in v) == qlora]
    if not variants:
        continue
    seed = {}
    if not args.no_seed:
        seed_cmd = [sys.executable, os.path.join(os.path.dirname(HERE), "seed_with_reserved.py"), "--layers", str(args.layers)]
        seed = run(seed_cmd + (["--qlora"] if qlora else []))
        seed.setdefault("recipe", "seed"); seed.setdefault("qlora", qlora)
        print(json.dumps(seed), flush=True); rows.append(seed)
    for v in variants:
        r = run([sys.executable, os.path.join(HERE, "glmtune_worker.py"), "--layers", str(args.layers), *v.split(), *extra])
        r["args"] = v
        r.setdefault("recipe", "glmtune"); r.setdefault("qlora", qlora)
        if "tokens_per_s" in r and "tokens_per_s" in seed:
            r["ratio"] = round(r["tokens_per_s"] / seed["tokens_per_s"], 2)
        print(json.dumps(r), flush=True); rows.append(r)
print("\n| recipe | args | seqs or rows/step | tokens/s | peak GiB (allocated) | reserved GiB | ratio vs seed |\n"
      "|---|---|---|---|---|---|---|")
for r in rows:
    per_step = (f"{r['rows_per_step']} x {r['rows']} tokens" if "rows" in r else r.get("seqs_per_step", r.get("batch", "")))
    print(f"| {r.get('recipe', '?')}{' qlora' if r.get('qlora') else ''} | {r.get('args', '')} | "
          f"{per_step} | {r.get('tokens_per_s', r.get('error', ''))} | "
          f"{r.get('peak_GiB', '')} | {r.get('reserved_GiB', '')} | "
          f"{r.get('ratio', '1.00' if r.get('recipe') == 'seed' and 'tokens_per_s' in r else '')} |")
