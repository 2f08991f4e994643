"""Superseded (bench/archive/README.md): a record of how the H100 figures of bench/RESULTS.md sessions 1-3 were measured, on a bench-side model set-up; current figures come from bench/train_product.py, which drives `glmtune train`.

Longest sequence trainable at batch 1 (issue 6 goal: >= 4x the seed recipe's), GLM-4-9B's shape.

One process per recipe builds its model once, then climbs a ladder of lengths; each rung is one
forward + backward + optimizer step on one random sequence of that length. The climb stops at the
first rung that runs out of GPU memory (torch.OutOfMemoryError: caught, cache emptied). One JSON
line per rung (ok, seconds, peak GiB), then a summary line with the longest length that trained.

Recipes:
  seed     bench/seed_recipe_baseline.py's setup: PEFT LoRA r64/alpha128/dropout 0.05 on all linear
           layers (fp32 adapters), gradient checkpointing, SDPA, HF loss over full logits; QLoRA via
           prepare_model_for_kbit_training (as the seed script). The batch of 1 has no padding.
  glmtune  varlen FlashAttention, liger fused linear + cross-entropy (no logits), non-reentrant
           checkpointing, bf16 LoRA r64/alpha128, dropout 0 (speed.attention varlen, liger flce,
           adapter_dtype model, train.gradient_checkpointing in a glmtune config).

    python3 bench/archive/longest_seq.py --recipe glmtune [--qlora] [--lengths 4096,8192,...]
    python3 bench/archive/longest_seq.py --all --timeout 230     # the four recipes, one process each
    python3 bench/archive/longest_seq.py --recipe glmtune --tiny --lengths 64,128   # CPU dry run
"""
import argparse
import contextlib, gc, json, os, subprocess, sys, time

import torch

import benchlib as B

LADDER = [4096, 8192, 16384, 24576, 32768, 49152, 65536, 98304, 131072]

p = argparse.ArgumentParser()
B.add_model_args(p)
p.add_argument("--recipe", choices=["seed", "glmtune"], default="glmtune")
p.add_argument("--qlora", action="store_true")
p.add_argument("--lengths", default=",".join(map(str, LADDER)))
p.add_argument("--liger", default="flce", choices=["flce", "all", "none"], help="glmtune recipe only")
p.add_argument("--offload", action="store_true",
               help="glmtune: keep the tensors autograd saves (incl. each checkpointed layer's input) in pinned CPU memory")
p.add_argument("--all", action="store_true", help="run seed/glmtune x lora/qlora, one subprocess each")
p.add_argument("--timeout", type=int, default=230, help="with --all: seconds per recipe process")
p.add_argument("--fake-oom-at", type=int, default=0, help=argparse.SUPPRESS)  # dry-runs the OOM path on a CPU
args = p.parse_args()
lengths = [int(x) for x in args.lengths.split(",")]

if args.all:
    here = os.path.abspath(__file__)
    passthru = [a for a in sys.argv[1:] if a not in ("--all",)]
    # drop "--timeout N" from what the children get
    if "--timeout" in passthru:
        i = passthru.index("--timeout"); del passthru[i:i + 2]
    summary = []
    for recipe in ("seed", "glmtune"):
        for qlora in (False, True):
            cmd = [sys.executable, here, "--recipe", recipe, *(["--qlora"] if qlora else []), *passthru]
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
                if not lines:
                    lines = [json.dumps({"recipe": recipe, "qlora": qlora, "error": (out.stderr.strip().splitlines()
                                                                                     or ["no output"])[-1][:300]})]
            except subprocess.TimeoutExpired as e:
                so = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
                lines = [l for l in so.splitlines() if l.startswith("{")]
                lines.append(json.dumps({"recipe": recipe, "qlora": qlora, "error": f"timeout {args.timeout}s"}))
            for l in lines:
                print(l, flush=True)
            summary.append(json.loads(lines[-1]))
    print("\n| recipe | longest trained (tokens) | peak GiB there | first failure |\n|---|---|---|---|")
    for s in summary:
        print(f"| {s.get('recipe')}{' qlora' if s.get('qlora') else ''} | {s.get('longest_ok', s.get('error', ''))} | "
              f"{s.get('peak_GiB_at_longest', '')} | {s.get('first_failure', '')} |")
    sys.exit(0)

dev = B.device()
cfg = B.glm4_config(args.layers, args.tiny, max_positions=max(32768, max(lengths)))
notes = {}
if args.recipe == "seed":
    model = B.seed_model(cfg, qlora=args.qlora, cache_dir=args.cache_dir)
    impl, liger = "sdpa", "none"
else:
    model, impl, liger = B.glmtune_model(cfg, qlora=args.qlora, cache_dir=args.cache_dir, attn="varlen",
                                         liger=args.liger, ckpt=True, compile=False, bf16_adapters=True, notes=notes)
opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=2e-4)
base = dict(bench="longest_seq", recipe=args.recipe, qlora=args.qlora, layers=cfg.num_hidden_layers,
            hidden=cfg.hidden_size, attn=impl, liger=liger, offload=args.offload, **({"fallbacks": notes} if notes else {}),
            **({"device": dev} if dev != "cuda" else {}))


def train_step(n: int) -> float:
    from glmtune.models import speed

    if args.fake_oom_at and n >= args.fake_oom_at:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated by --fake-oom-at)")
    ids = torch.randint(0, cfg.vocab_size, (1, n), device=dev)
    if args.recipe == "seed":
        mask = torch.ones(1, n, dtype=torch.long, device=dev)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    else:
        extra = speed.cu_seqlens_kwargs([n], dev) if impl == speed.VARLEN_IMPL else {}
        pos = torch.arange(n, device=dev)[None]
        with (torch.autograd.graph.save_on_cpu(pin_memory=True) if args.offload else contextlib.nullcontext()):
            loss = model(input_ids=ids, position_ids=pos, labels=ids, **extra).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


longest, peak_at_longest, failure = 0, None, None
for n in lengths:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    B.reset_peak()
    t = time.time()
    try:
        loss = train_step(n)
        B.sync()
        row = dict(base, length=n, ok=True, seconds=round(time.time() - t, 2), peak_GiB=B.peak_gib(), loss=round(loss, 4))
        longest, peak_at_longest = n, row["peak_GiB"]
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not B.is_oom(e):
            raise
        failure = n
        row = dict(base, length=n, ok=False, error="out of memory", detail=str(e).splitlines()[0][:160],
                   peak_GiB=B.peak_gib())
    B.emit(row)
    if failure:
        opt.zero_grad(set_to_none=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        break
B.emit(dict(base, longest_ok=longest, peak_GiB_at_longest=peak_at_longest, first_failure=failure,
            ladder=lengths, gpu_GiB=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
            if torch.cuda.is_available() else None))
