"""Superseded (bench/archive/README.md): a record of how the H100 figures of bench/RESULTS.md sessions 1-3 were measured, on a bench-side model set-up; current figures come from bench/train_product.py, which drives `glmtune train`.

One glmtune training configuration on the GPU (a worker of bench/train_throughput.py).

Same model shape and sequence stream as bench/seed_recipe_baseline.py: GLM-4-9B-0414's shape with
random bf16 weights; lengths ~ U[300, 1100) drawn from default_rng(1) four at a time, exactly the
seed's batches of 4, in the same order. glmtune processes them padding-free: `--pack` sequences per
packed row, varlen FlashAttention, gradients accumulated over `--accum` rows, loss = mean over the
step's target tokens.

Effective batch (sequences per optimizer step) = pack x accum. The default accum keeps it at the
seed's 4 for pack <= 4 (pack 2 -> 2 rows, pack 1 -> 4 rows); pack 8 / 16 need 8 / 16 sequences per
step (1 row), i.e. 2x / 4x the seed's batch, so those runs take half / a quarter of the seed's
optimizer steps over the same sequences. tokens/s counts real tokens, so it compares directly; the
per-step optimizer cost (LoRA: ~0.1 s of the step) is amortised over more tokens there.

Rows mode (`--rows T`): the same stream packed best-fit (16-sequence lookahead) into rows of exactly T
tokens (tail padded; padding is not counted as tokens), `--rows-per-step` rows per optimizer step,
through glmtune.train.graphs.GraphedDecoder: the decoder blocks as CUDA graphs (`--graph`) or the
same code eagerly. `--fused-lora`: glmtune.models.fused_lora on every LoRA linear and the MLPs.

Prints one JSON line (with "error" on failure, e.g. out of memory).
    python3 bench/archive/glmtune_worker.py --pack 8 --ckpt [--qlora] [--accum N] [--tiny]
    python3 bench/archive/glmtune_worker.py --rows 2048 --graph --fused-lora [--compile] [--qlora]
"""
import argparse, json, math, time

import numpy as np
import torch

import benchlib as B

p = argparse.ArgumentParser()
B.add_model_args(p)
p.add_argument("--steps", type=int, default=8, help="timed work, in seed batches of 4 sequences (8 = 32 sequences)")
p.add_argument("--pack", type=int, default=4, help="sequences per packed row")
p.add_argument("--accum", type=int, default=0, help="rows per optimizer step (0: ceil(4 / pack))")
p.add_argument("--attn", default="varlen", choices=["varlen", "sdpa", "flex_attention"])
p.add_argument("--liger", default="all", choices=["all", "flce", "none"])
p.add_argument("--compile", action="store_true")
p.add_argument("--ckpt", action="store_true")
p.add_argument("--qlora", action="store_true")
p.add_argument("--fp32-adapters", action="store_true", help="PEFT's default fp32 LoRA weights (default: bf16)")
p.add_argument("--fused-lora", action="store_true", help="glmtune.models.fused_lora (fused LoRA linears + SwiGLU)")
p.add_argument("--rows", type=int, default=0, help="rows mode: fixed rows of this many tokens (best-fit packed)")
p.add_argument("--rows-per-step", type=int, default=2, help="rows mode: rows per optimizer step")
p.add_argument("--graph", action="store_true", help="rows mode: decoder blocks as CUDA graphs")
p.add_argument("--max-segments", type=int, default=0, help="rows mode: sequences (+ padding) a row may hold "
               "(0: rows // 300 + 1, as the stream's sequences have >= 300 tokens)")
p.add_argument("--loss-chunk", type=int, default=256, help="rows mode: tokens per chunk of the chunked LM-head loss "
               "(0: whole logits)")
p.add_argument("--profile", default="", help="after timing, profile 2 steps (torch.profiler) into this file")
p.add_argument("--check", action="store_true", help="varlen vs SDPA attention check and loss parity vs the seed's loss")
args = p.parse_args()

from glmtune.models import speed  # noqa: E402

accum = args.accum or math.ceil(4 / args.pack)
seqs_per_step = args.pack * accum
res = dict(recipe="glmtune", pack=args.pack, accum=accum, seqs_per_step=seqs_per_step, attn=args.attn,
           liger=args.liger, compile=args.compile, ckpt=args.ckpt, qlora=args.qlora,
           adapters="fp32" if args.fp32_adapters else "bf16", layers=2 if args.tiny else args.layers,
           fused_lora=args.fused_lora)
if args.rows:
    args.max_segments = args.max_segments or args.rows // 300 + 1
    res.update(rows=args.rows, rows_per_step=args.rows_per_step, graph=args.graph, max_segments=args.max_segments,
               loss_chunk=args.loss_chunk)
    for k in ("pack", "accum", "seqs_per_step"):
        res.pop(k)
notes = {}
dev = B.device()
try:
    cfg = B.glm4_config(args.layers, args.tiny)
    model, attn, liger = B.glmtune_model(cfg, qlora=args.qlora, cache_dir=args.cache_dir, attn=args.attn,
                                         liger=args.liger, ckpt=args.ckpt, compile=args.compile,
                                         bf16_adapters=not args.fp32_adapters, fused_lora=args.fused_lora,
                                         dynamic=not args.rows, notes=notes)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=2e-4,
                            fused=torch.cuda.is_available())
    rng = np.random.default_rng(1)
    pending: list[int] = []

    def next_lengths(n):
        """The next n sequence lengths of the seed's stream (drawn in its batches of 4)."""
        while len(pending) < n:
            pending.extend(int(x) for x in rng.integers(300, 1100, size=4))
        out = pending[:n]
        del pending[:n]
        return out

    def micro_batches(lens):
        for i in range(0, len(lens), args.pack):
            g = lens[i:i + args.pack]
            ids = torch.randint(0, cfg.vocab_size, (1, sum(g)), device=dev)
            pos = torch.cat([torch.arange(n, device=dev) for n in g]).unsqueeze(0)
            labels = ids.clone()
            labels[0, torch.as_tensor(np.cumsum([0] + g[:-1]), device=dev)] = -100  # no cross-sequence targets
            extra = speed.cu_seqlens_kwargs(g, dev) if attn == speed.VARLEN_IMPL else {}
            yield g, ids, pos, labels, extra

    def step():
        lens = next_lengths(seqs_per_step)
        targets = sum(lens) - len(lens)
        total_loss = 0.0
        for g, ids, pos, labels, extra in micro_batches(lens):
            out = model(input_ids=ids, position_ids=pos, labels=labels, **extra)
            part = out.loss * (sum(g) - len(g)) / targets  # mean over the whole step's targets
            part.backward()
            total_loss += part.detach()
        opt.step(); opt.zero_grad(set_to_none=True)
        return sum(lens), total_loss

    if args.rows:
        from glmtune.train.graphs import GraphedDecoder, fixed_row
        from glmtune.train.data import pack_rows_best_fit

        t0 = time.time()
        if args.graph:  # graph memory is taken at capture (the pool's tensors are not "allocated" later)
            B.sync(); B.reset_peak()
        dec = GraphedDecoder(model, tokens=args.rows, max_segments=args.max_segments, graph=args.graph,
                             varlen=attn == speed.VARLEN_IMPL, loss_chunk=args.loss_chunk)
        res["setup_s"] = round(time.time() - t0, 1)
        if attn == speed.VARLEN_IMPL:
            res["varlen_gqa"] = ("enable_gqa" if speed._varlen_call_options()["_gqa"] else
                                 "kv heads shared" if speed._KV_HEADS_SHARED else "kv heads expanded")

        def length_stream():
            while True:
                yield from next_lengths(4)

        stream_lens: list[int] = []  # lengths by stream index (the packer yields indices)

        def tracked():
            for n in length_stream():
                stream_lens.append(n)
                yield n

        row_iter = pack_rows_best_fit(tracked(), args.rows, lookahead=16)

        def step():
            rows = [[stream_lens[i] for i in next(row_iter)] for _ in range(args.rows_per_step)]
            targets = sum(n - 1 for r in rows for n in r)
            total_loss = 0.0
            for lens in rows:
                seqs = [torch.randint(0, cfg.vocab_size, (n,)).tolist() for n in lens]
                ids, labels, pos = (torch.tensor([x], device=dev) for x in fixed_row(seqs, None, args.rows, 151329))
                loss, _ = dec.loss_sum(ids, labels, pos, lens)
                part = loss / targets
                part.backward()
                total_loss += part.detach()
            opt.step(); opt.zero_grad(set_to_none=True)
            return sum(map(sum, rows)), total_loss

    if args.check:
        # 1) varlen attention vs SDPA per sequence (the reference), bf16, on random q/k/v
        from torch.nn.functional import scaled_dot_product_attention as sdpa
        H, KV, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        lens = [300, 517, 1099]
        T = sum(lens)
        qh = torch.randn(1, H, T, D, device=dev, dtype=torch.bfloat16)
        kh, vh = (torch.randn(1, KV, T, D, device=dev, dtype=torch.bfloat16) for _ in range(2))
        if attn == speed.VARLEN_IMPL:
            got, _ = speed.varlen_attention_forward(None, qh, kh, vh, None, scaling=D ** -0.5,
                                                    **speed.cu_seqlens_kwargs(lens, dev))
            refs, s = [], 0
            for n in lens:
                refs.append(sdpa(qh[:, :, s:s + n], kh[:, :, s:s + n].repeat_interleave(H // KV, 1),
                                 vh[:, :, s:s + n].repeat_interleave(H // KV, 1), is_causal=True).transpose(1, 2))
                s += n
            res["varlen_vs_sdpa_maxabs"] = float((got.float() - torch.cat(refs, 1).float()).abs().max())
        # 2) loss parity: the seed's padded batch loss (HF loss, SDPA) vs glmtune's packed loss, same weights
        lens = [int(x) for x in np.random.default_rng(7).integers(300, 1100, size=4)]
        torch.manual_seed(3)
        seqs = [torch.randint(0, cfg.vocab_size, (n,), device=dev) for n in lens]
        L = max(lens)
        ids = torch.full((4, L), 151329, device=dev); mask = torch.zeros(4, L, dtype=torch.long, device=dev)
        for i, sq in enumerate(seqs):
            ids[i, :len(sq)] = sq; mask[i, :len(sq)] = 1
        model.eval()
        with torch.no_grad():
            model.config._attn_implementation = "sdpa"
            hidden = model.base_model.model.model(input_ids=ids, attention_mask=mask).last_hidden_state
            logits = model.base_model.model.lm_head(hidden).float()
            lab = ids.masked_fill(mask == 0, -100)
            seed_loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                          lab[:, 1:].reshape(-1), ignore_index=-100)
            model.config._attn_implementation = attn
            packed = torch.cat(seqs).unsqueeze(0)
            pos = torch.cat([torch.arange(n, device=dev) for n in lens]).unsqueeze(0)
            plab = packed.clone(); plab[0, torch.as_tensor(np.cumsum([0] + lens[:-1]), device=dev)] = -100
            extra = speed.cu_seqlens_kwargs(lens, dev) if attn == speed.VARLEN_IMPL else {}
            ours = model(input_ids=packed, position_ids=pos, labels=plab, **extra).loss.float()
        model.train()
        res["seed_loss"], res["glmtune_loss"] = float(seed_loss), float(ours)
        res["loss_rel_diff"] = abs(float(ours) / float(seed_loss) - 1)

    # warm-up (compile, allocator, optimizer state): >= 2 steps and >= 12 sequences
    for _ in range(max(2, math.ceil(12 / seqs_per_step))):
        step()
    B.sync()
    if not (args.rows and args.graph):
        B.reset_peak()
    n_steps = max(2, math.ceil(args.steps * 4 / seqs_per_step))
    times, issue, real = [], [], 0
    for _ in range(n_steps):
        B.sync(); t = time.time(); n, _ = step(); issue.append(time.time() - t); B.sync()
        times.append(time.time() - t); real += n
    # issue_s: when the CPU had issued the whole step (before waiting for the GPU); close to step_s =
    # CPU-bound. (liger's loss synchronises once per row, so it is an upper bound on the CPU's share.)
    res.update(tokens_per_s=round(real / sum(times)), peak_GiB=B.peak_gib(), timed_steps=n_steps,
               timed_tokens=real, step_s=round(sum(times) / n_steps, 3), issue_s=round(sum(issue) / n_steps, 3))
    if torch.cuda.is_available():
        res["reserved_GiB"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                step()
            B.sync()
        with open(args.profile, "w") as f:
            f.write(json.dumps(res) + "\n")
            f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=45, max_name_column_width=90))
except (torch.OutOfMemoryError, RuntimeError) as e:
    if not B.is_oom(e):
        raise
    res.update(error=f"out of memory: {str(e).splitlines()[0][:200]}", peak_GiB=B.peak_gib())
if notes:
    res["fallbacks"] = notes
if dev != "cuda":
    res["device"] = dev
B.emit(res)
