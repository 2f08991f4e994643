"""Where the engine's time goes on one GPU (issue 24): decode-graph replay with separate and fused
q/k/v, prefill with and without its compiled regions, the prefill budget's effect on time to first
token, the decode step's kernels, and the GEMMs of one layer alone.

    python3 bench/engine_profile.py --compare-unfused --out $OUT/engine_profile.jsonl

Sections (all in one process, the model folder of bench/train_product.py, GLM-4-9B-0414 shape; the
engine as `glmtune serve` builds it: fused projections, compiled decode, graphs, compiled regions):
  replay    one decode-graph replay at 1 and 64 rows (with --compare-unfused: first on the model as
            loaded, then fused).
  prefill   one prompt (~200 tokens) and 25 prompts (~4,000 tokens) with max_new_tokens=1 through the
            engine: wall time = time to first token; one prefill forward's host time and wall time;
            with the prefill's compiled regions, then without.
  budget    64 requests x 128 tokens at prefill_tokens 4096 / 3072 / 2048: wall, tok/s, TTFT p50/p90.
  kernels   torch.profiler over 32 compiled decode steps (graphs off, so each kernel is seen) at 1 and
            64 rows: the top kernels by device time per step, and the step's total device time.
  gemms     each projection of one layer alone at 1 and 64 rows (CUDA events, 200 runs): ms and GB/s
            of its weight read, and q/k/v as one fused GEMM.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def emit(out: Path | None, row: dict) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if out is not None:
        with open(out, "a") as f:
            f.write(line + "\n")


class Prompts:
    """Distinct encoded prompts, each handed out once (a repeated prompt would hit the prefix cache)."""

    def __init__(self, ids: list):
        self.ids, self.next = ids, 0

    def fresh(self, n: int) -> list:
        out = self.ids[self.next:self.next + n]
        if len(out) < n:
            raise RuntimeError("out of distinct prompts")
        self.next += n
        return out


def timed_requests(engine, ids: list, max_new: int) -> dict:
    """Submit every prompt at once; wall time, tokens, and each request's time to first token."""
    first: dict[int, float] = {}
    t0 = time.perf_counter()

    def on_update(seq):
        if seq.tokens and id(seq) not in first:
            first[id(seq)] = time.perf_counter() - t0

    seqs = [engine.submit(p, max_new_tokens=max_new, on_update=on_update) for p in ids]
    for s in seqs:
        s.done.wait(300)
    wall = time.perf_counter() - t0
    ttft = sorted(first.values())
    total = sum(len(s.tokens) for s in seqs)
    return {"requests": len(ids), "new_tokens": total, "wall_s": round(wall, 4), "tok_per_s": round(total / wall, 1),
            "ttft_p50_s": round(statistics.median(ttft), 4) if ttft else None,
            "ttft_p90_s": round(ttft[int(0.9 * (len(ttft) - 1))], 4) if ttft else None}


def section_prefill(engine, ids, out):
    """Time to first token of 1 and 25 prompts, and one prefill forward's host time (the call's
    return) against its wall time (synchronised): host-bound when the two are close."""
    import torch

    runner = engine.runner
    regions = runner.regions
    for compiled in (True, False) if regions is not None else (False,):
        runner.regions = regions if compiled else None
        for n in (1, 25):
            batches = [ids.fresh(n) for _ in range(3)]  # unseen prompts: no prefix-cache hit
            rows = [timed_requests(engine, b, 1) for b in batches]
            emit(out, {"section": "prefill", "regions_compiled": compiled, "requests": n,
                       "prompt_tokens": sum(len(p) for p in batches[0]), "ttft_s": [r["wall_s"] for r in rows]})
            chunks = [(slot, p, 0, True) for slot, p in enumerate(ids.fresh(n))]
            with runner.lock, torch.inference_mode():
                for _ in range(3):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    runner._prefill_forward(chunks)
                    host = time.perf_counter() - t0
                    torch.cuda.synchronize()
                    wall = time.perf_counter() - t0
                emit(out, {"section": "prefill", "regions_compiled": compiled, "forward_of": n,
                           "tokens": sum(len(c[1]) for c in chunks), "host_ms": round(host * 1000, 2),
                           "wall_ms": round(wall * 1000, 2)})
    runner.regions = regions
    if regions is not None:
        emit(out, {"section": "prefill", "regions_failure": regions.failure, "note": engine.graphs_note})


def section_replay(engine, out, label: str):
    """Wall time of one decode-graph replay (CUDA events over 200 replays) at 1 and 64 rows, width 256."""
    import torch
    from serve_gpu import replay_ms

    runner = engine.runner
    rows = {}
    with runner.lock, torch.inference_mode():
        for b in (1, 64):
            key = (b, 256, False, False)
            graph = runner.graphs.get(key) or runner._capture(key)
            rows[f"replay_ms_{b}"] = round(replay_ms(graph, runs=200, warm=10), 4)
    emit(out, {"section": "replay", "model": label, **rows, "note": engine.graphs_note})


def section_budget(engine, ids, out, max_new):
    saved = engine.prefill_tokens
    try:
        for budget in (4096, 3072, 2048):
            engine.prefill_tokens = budget
            timed_requests(engine, ids.fresh(16), 8)  # warm this layout
            emit(out, {"section": "budget", "prefill_tokens": budget,
                       **timed_requests(engine, ids.fresh(64), max_new)})
    finally:
        engine.prefill_tokens = saved


def section_kernels(engine, ids, out):
    import torch
    from torch.profiler import ProfilerActivity, profile

    runner = engine.runner
    runner.use_graphs = False
    try:
        for n in (1, 64):
            seqs = [engine.submit(p, max_new_tokens=96) for p in ids.fresh(n)]
            time.sleep(0.5)  # past prefill and the first steps
            torch.cuda.synchronize()
            steps0 = engine.steps
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                time.sleep(0.4)
                torch.cuda.synchronize()
            steps = engine.steps - steps0
            for s in seqs:
                s.done.wait(300)
            kernels = {}
            for e in prof.events():
                if e.device_type.name == "CUDA":
                    k = kernels.setdefault(e.name, [0, 0.0])
                    k[0] += 1
                    k[1] += e.time_range.elapsed_us()
            total = sum(v[1] for v in kernels.values())
            top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:30]
            emit(out, {"section": "kernels", "rows": n, "steps": steps,
                       "device_ms_per_step": round(total / max(steps, 1) / 1000, 3),
                       "kernels_per_step": round(sum(v[0] for v in kernels.values()) / max(steps, 1), 1),
                       "top": [{"kernel": name[:110], "per_step": round(c / max(steps, 1), 1),
                                "us_per_step": round(t / max(steps, 1), 1)} for name, (c, t) in top]})
    finally:
        runner.use_graphs = True


def section_gemms(model, out):
    import torch

    layer = model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    lins = {"q_proj": attn.q_proj, "k_proj": attn.k_proj, "v_proj": attn.v_proj, "o_proj": attn.o_proj,
            "gate_up_proj": mlp.gate_up_proj, "down_proj": mlp.down_proj}
    fused_w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    fused_b = None
    if attn.q_proj.bias is not None:
        fused_b = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
    for rows in (1, 64):
        res = {}
        for name, lin in list(lins.items()) + [("qkv_fused", None), ("lm_head", model.lm_head)]:
            x = torch.randn(rows, (lin.in_features if lin is not None else fused_w.shape[1]),
                            device="cuda", dtype=torch.bfloat16)
            fn = (lambda: torch.nn.functional.linear(x, fused_w, fused_b)) if lin is None else (lambda: lin(x))
            with torch.inference_mode():
                for _ in range(10):
                    fn()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(200):
                    fn()
                end.record()
                torch.cuda.synchronize()
            ms = start.elapsed_time(end) / 200
            w = fused_w if lin is None else lin.weight
            res[name] = {"us": round(ms * 1000, 1), "GB_per_s": round(w.numel() * 2 / ms / 1e6, 0)}
        emit(out, {"section": "gemms", "rows": rows, **res})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", default="/tmp/glmtune_bench_glm4_9b")
    p.add_argument("--layers", type=int, default=40)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--sections", default="replay,prefill,budget,kernels")
    p.add_argument("--compare-unfused", action="store_true",
                   help="first the replay section on the model as loaded (separate q/k/v), then fuse")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    from glmtune.infer.engine import EngineSettings, create_engine, fuse_projections
    from glmtune.models.loading import load_model
    from glmtune.models.tokenizer import load_tokenizer
    from glmtune.templates import get_template
    from serve_gpu import prompts
    from train_product import write_model_folder

    model_dir = write_model_folder(Path(args.model_dir), args.layers, tiny=False)
    model = load_model(model_dir, dtype="bfloat16").to("cuda").eval()
    tok, tpl = load_tokenizer(model_dir), get_template("glm4")
    ids = Prompts([tpl.encode_prompt(tok, [{"role": "user", "content": q}]) for q in prompts(600, seed=7)])
    sections = args.sections.split(",")
    if "gemms" in sections:
        section_gemms(model, args.out)
    if args.compare_unfused:
        t0 = time.perf_counter()
        engine, _, summary = create_engine(model, stop_ids=tpl.stop_token_ids(tok), settings=EngineSettings(compile=True))
        emit(args.out, {"startup_s": round(time.perf_counter() - t0, 1), "engine": summary})
        section_replay(engine, args.out, "separate q/k/v")
        engine.close()
        del engine
    fuse_projections(model)  # as the serving back-end does
    t0 = time.perf_counter()
    engine, _, summary = create_engine(model, stop_ids=tpl.stop_token_ids(tok), settings=EngineSettings(compile=True))
    graphs = engine.warmup(widths=(256, 512))
    emit(args.out, {"startup_s": round(time.perf_counter() - t0, 1), "graphs": graphs, "engine": summary,
                    "note": engine.graphs_note, "compile_failure": engine.runner.compile_failure})
    for name, fn in (("replay", lambda: section_replay(engine, args.out, "fused q/k/v")),
                     ("prefill", lambda: section_prefill(engine, ids, args.out)),
                     ("budget", lambda: section_budget(engine, ids, args.out, args.max_tokens)),
                     ("kernels", lambda: section_kernels(engine, ids, args.out))):
        if name not in sections:
            continue
        t1 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - report and go on
            import traceback
            emit(args.out, {"section": name, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]})
        emit(args.out, {"section_done": name, "s": round(time.perf_counter() - t1, 1)})
    engine.close()


if __name__ == "__main__":
    main()
