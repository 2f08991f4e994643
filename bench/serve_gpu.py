"""Generation speed on one GPU, through the product: `glmtune serve` (OpenAI client, streaming), and
plain `model.generate` beside it in the same call. Issue 24.

Phases (``--phases``, comma-separated, in this order):
  check     engine correctness on the GPU, in process: the engine's per-step logits against an eager
            forward of the same tokens (bf16 tolerance), CUDA-graph steps against eager steps (same
            tokens), a prefix-cache hit and chunked prefill against a cold prefill (same first logits).
  engine    the engine in process, no HTTP: CUDA graphs with and without the compiled decode step:
            start-up (compile + graph capture), the device time of one decode-graph replay at batch
            1 / 64 / 128, and 1 / 64 / 128 requests of 128 tokens end to end (host overhead = the
            difference).
  serve     `python -m glmtune serve --model DIR --adapter a0=.. a3=..`, then 1 / 16 / 64 concurrent
            streaming requests (prompts ~200 tokens, 128 new tokens, greedy), and 64 spread over the 4
            adapters: aggregate tok/s, TTFT p50/p90, peak GPU memory of the server (nvidia-smi).
  prefill   prefill graphs in process: the graph-replayed padded prefill forward against the eager one
            (logits, argmax; host / wall ms at 1 / 8 / 25 prompts), then 64 requests with them on and off.
  baseline  plain `model.generate` (eager, dynamic cache) at batch 1 and 64 on the same prompts.
  predict   `glmtune predict` over N prompts (64 new tokens) with the engine, and with --engine off on
            a slice of them; `glmtune eval classify --mode generate` over CMCC-34-shaped dialogues.
  serve_nocompile   `serve` with `--no-compile` (the step as session 6 ran it), 1 and 64 streams.
  serve_clients   `serve`, the load from 1, 4 and 8 client processes (is one Python client the limit?)
  serve_inprocess   `serve` with `--no-engine-process` (the engine in the HTTP process, as session 7
            ran it; `serve` runs it in its own process, the default on a GPU), 1 and 64 streams.

    python3 bench/serve_gpu.py --phases check,serve,baseline --out $OUT/serve_gpu.jsonl

The model folder is bench/train_product.py's GLM-4-9B-0414 shape (random bf16 weights): random
answers never hit a stop token, so every request generates exactly its max_tokens.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

WORDS = ("model data train serve token batch graph cache slot prefix adapter river mountain city music "
         "garden window planet ocean library station market winter summer forest language science").split()


def emit(out: Path | None, row: dict) -> None:
    line = json.dumps(row, ensure_ascii=False)
    print(line, flush=True)
    if out is not None:
        with out.open("a") as f:
            f.write(line + "\n")


def prompts(n: int, words: int = 150, seed: int = 0) -> list[str]:
    """Distinct questions of ~200 tokens (the GLM-4 tokenizer: ~1.3 tokens per word + the template)."""
    rng = random.Random(seed)
    return [f"Request {i}: " + " ".join(rng.choice(WORDS) for _ in range(words)) + " ?" for i in range(n)]


# -- check ------------------------------------------------------------------------------------------
def phase_check(model_dir: Path, out: Path | None) -> None:
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"

    from glmtune.infer.engine import EngineSettings, create_engine, fuse_projections
    from glmtune.infer.engine import runner as runner_mod
    from glmtune.models.loading import load_model
    from glmtune.models.tokenizer import load_tokenizer
    from glmtune.templates import get_template

    model = load_model(model_dir, dtype="bfloat16").to(dev).eval()
    fuse_projections(model)  # as the serving back-end does (the eager references run the fused model too)
    tok, tpl = load_tokenizer(model_dir), get_template("glm4")
    stop = tpl.stop_token_ids(tok)
    ids = [tpl.encode_prompt(tok, [{"role": "user", "content": q}]) for q in prompts(8, seed=1)]

    recorded: list = []
    real = runner_mod.next_tokens

    def recording(logits, *a, **k):
        recorded.append(logits.float().clone())
        return real(logits, *a, **k)

    # 1. eager engine steps (and compiled ones): logits against a plain forward over prompt + answer
    for compiled in (True, False):  # the eager engine stays for step 2
        recorded.clear()
        runner_mod.next_tokens = recording
        t0 = time.perf_counter()
        engine, _, summary = create_engine(model, stop_ids=stop, settings=EngineSettings(
            cuda_graphs=False, max_slots=32, compile=compiled))
        seq = engine.submit(ids[0], max_new_tokens=24)
        seq.done.wait(600)
        runner_mod.next_tokens = real
        steps = [r[0] for r in recorded]
        with torch.inference_mode():
            full = torch.tensor([ids[0] + seq.tokens[:-1]], device=dev)
            ref = model(full).logits[0, len(ids[0]) - 1:].float()
        diffs = [(s - r).abs().max().item() for s, r in zip(steps, ref)]
        scale = ref.abs().max().item()
        agree = sum(int(s.argmax() == r.argmax()) for s, r in zip(steps, ref)) / len(steps)
        emit(out, {"check": f"engine step logits ({'compiled' if compiled else 'eager'}) vs eager forward",
                   "steps": len(steps), "max_abs_diff": max(diffs), "logit_scale": scale, "argmax_agreement": agree,
                   "first_request_s": round(time.perf_counter() - t0, 1), "note": engine.graphs_note,
                   "engine": summary})
        if compiled:
            engine.close()
    seqs = [engine.submit(p, max_new_tokens=32) for p in ids]
    for s in seqs:
        s.done.wait(300)
    eager_tokens = [s.tokens for s in seqs]
    engine.close()

    del engine
    # 2. graphed steps (same settings, not compiled: step 1 checks that) give the eager steps' tokens
    engine, _, summary = create_engine(model, stop_ids=stop, settings=EngineSettings(max_slots=32, compile=False))
    seqs = [engine.submit(p, max_new_tokens=32) for p in ids]
    for s in seqs:
        s.done.wait(300)
    same = sum(int(s.tokens == e) for s, e in zip(seqs, eager_tokens))
    first_diff = [next((i for i, (a, b) in enumerate(zip(s.tokens, e)) if a != b), None) for s, e in zip(seqs, eager_tokens)]
    emit(out, {"check": "graphed decode vs eager decode", "requests": len(ids), "identical": same,
               "first_difference_at": first_diff, "graphs": engine.graphs_note, "engine": summary})
    engine.close()
    del engine
    # 3. prefix hits and chunked prefill give the cold forward's first logits
    engine, _, summary = create_engine(model, stop_ids=stop, settings=EngineSettings(prefill_tokens=96, max_slots=32))
    shared = tpl.encode_prompt(tok, [{"role": "system", "content": " ".join(WORDS * 3)},
                                     {"role": "user", "content": "first question about rivers"}])
    recorded.clear()
    runner_mod.next_tokens = recording
    for q in ("first question about rivers", "second question about rivers", "third question about rivers"):
        p = tpl.encode_prompt(tok, [{"role": "system", "content": " ".join(WORDS * 3)}, {"role": "user", "content": q}])
        first = len(recorded)  # the prefill's logits come first (a decode step may follow them)
        engine.submit(p, max_new_tokens=1).done.wait(300)
    runner_mod.next_tokens = real
    stored = [list(v) for v in engine.prefix.stored.values()] if engine.prefix else []
    with torch.inference_mode():
        cold = model(torch.tensor([p], device=dev)).logits[0, -1].float()
    emit(out, {"check": "prefix hit + chunked prefill vs cold forward", "prompt_tokens": len(p),
               "prefix_stored": stored, "first_logits_max_abs_diff": (recorded[first][0] - cold).abs().max().item(),
               "argmax_same": bool(recorded[first][0].argmax() == cold.argmax()), "shared_len": len(shared)})
    engine.close()
    del model
    torch.cuda.empty_cache()


# -- prefill graphs ---------------------------------------------------------------------------------
def phase_prefill(model_dir: Path, out: Path | None, max_tokens: int) -> None:
    """Prefill graphs in process: the padded forward replayed from its graph against the eager
    forward (logits within bf16 tolerance, same argmax), each one's host and wall time at 1 / 8 / 25
    prompts, then 64 requests end to end with prefill graphs on and off (decode graphs both times)."""
    import torch

    from glmtune.infer.engine import EngineSettings, create_engine, fuse_projections
    from glmtune.models.loading import load_model
    from glmtune.models.tokenizer import load_tokenizer
    from glmtune.templates import get_template

    model = load_model(model_dir, dtype="bfloat16").to("cuda").eval()
    fuse_projections(model)
    tok, tpl = load_tokenizer(model_dir), get_template("glm4")
    stop = tpl.stop_token_ids(tok)
    ids = [tpl.encode_prompt(tok, [{"role": "user", "content": q}]) for q in prompts(64, seed=5)]
    engine, _, summary = create_engine(model, stop_ids=stop, settings=EngineSettings(max_slots=96, compile=False))
    runner = engine.runner
    graphs = runner.prefill_graphs
    t0 = time.perf_counter()
    engine.warmup(widths=(256, 512))
    emit(out, {"phase": "prefill", "warmup_s": round(time.perf_counter() - t0, 1), "note": engine.graphs_note,
               "engine": summary, "prefill_graphs": None if graphs is None else sorted(graphs.graphs)})
    for n in (1, 8, 25):
        chunks = [(slot, p, 0, True) for slot, p in enumerate(ids[:n])]
        row = {"phase": "prefill", "prompts": n, "tokens": sum(len(c[1]) for c in chunks)}
        kept = {}
        with runner.lock, torch.inference_mode():
            for mode in ("graph", "eager"):
                runner.prefill_graphs = graphs if mode == "graph" else None
                best = (1e9, 1e9)
                for _ in range(4):
                    sync()
                    t1 = time.perf_counter()
                    logits = runner._prefill_forward(chunks)[0]
                    host = time.perf_counter() - t1
                    sync()
                    best = min(best, (time.perf_counter() - t1, host))
                kept[mode] = logits.float().clone()
                row[f"{mode}_wall_ms"], row[f"{mode}_host_ms"] = round(best[0] * 1000, 2), round(best[1] * 1000, 2)
            runner.prefill_graphs = graphs
        g, e = kept["graph"], kept["eager"]
        row.update(max_abs_diff=(g - e).abs().max().item(), logit_scale=e.abs().max().item(),
                   argmax_same=int((g.argmax(-1) == e.argmax(-1)).sum()))
        emit(out, row)
    for mode in ("graph", "eager", "graph"):
        runner.prefill_graphs = graphs if mode == "graph" else None
        emit(out, {"phase": "prefill", "engine_requests": 64, "prefill": mode, **engine_run(engine, ids, max_tokens)})
    runner.prefill_graphs = graphs
    engine.close()
    del engine, runner, model
    torch.cuda.empty_cache()


def engine_run(engine, ids: list, max_tokens: int) -> dict:
    """Every prompt submitted at once: aggregate tok/s and time to first token (p50 / p90)."""
    first: dict = {}
    t0 = time.perf_counter()
    seqs = [engine.submit(p, max_new_tokens=max_tokens, on_update=lambda s: first.setdefault(id(s), time.perf_counter()))
            for p in ids]
    for s in seqs:
        s.done.wait(300)
    wall = time.perf_counter() - t0
    ttfts = sorted(first.get(id(s), t0 + wall) - t0 for s in seqs)
    total = sum(len(s.tokens) for s in seqs)
    return {"wall_s": round(wall, 3), "tok_per_s": round(total / wall, 1), "ttft_p50_s": round(ttfts[len(ttfts) // 2], 3),
            "ttft_p90_s": round(ttfts[int(len(ttfts) * 0.9)], 3)}


def replay_ms(graph, runs: int, warm: int) -> float:
    """Device time of one replay of a captured CUDA graph (CUDA events over ``runs`` replays)."""
    import torch

    for _ in range(warm):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(runs):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / runs


# -- engine -----------------------------------------------------------------------------------------
def phase_engine(model_dir: Path, out: Path | None, max_tokens: int, modes: tuple = (False, True)) -> None:
    import torch

    from glmtune.infer.engine import EngineSettings, create_engine
    from glmtune.models.loading import load_model
    from glmtune.models.tokenizer import load_tokenizer
    from glmtune.templates import get_template

    model = load_model(model_dir, dtype="bfloat16").to("cuda").eval()
    tok, tpl = load_tokenizer(model_dir), get_template("glm4")
    stop = tpl.stop_token_ids(tok)
    ids = [tpl.encode_prompt(tok, [{"role": "user", "content": q}]) for q in prompts(128, seed=5)]
    for compiled in modes:
        t0 = time.perf_counter()
        engine, _, summary = create_engine(model, stop_ids=stop, settings=EngineSettings(compile=compiled))
        graphs = engine.warmup(widths=(256, 512))
        startup = time.perf_counter() - t0
        runner = engine.runner
        replay = {}
        for b in (1, 64, 128):
            graph = runner.graphs.get((b, 256, False, False))
            if graph is None:
                continue
            replay[b] = round(replay_ms(graph, runs=50, warm=1), 3)
        emit(out, {"phase": "engine", "compiled": compiled, "startup_s": round(startup, 1), "graphs": graphs,
                   "graph_replay_ms": replay, "note": engine.graphs_note, "engine": summary})
        for n in (1, 64, 128):
            for _ in range(2 if n == 1 else 1):
                t0 = time.perf_counter()
                seqs = [engine.submit(p, max_new_tokens=max_tokens) for p in ids[:n]]
                for s in seqs:
                    s.done.wait(300)
                wall = time.perf_counter() - t0
                total = sum(len(s.tokens) for s in seqs)
                emit(out, {"phase": "engine", "compiled": compiled, "requests": n, "new_tokens": total,
                           "wall_s": round(wall, 3), "tok_per_s": round(total / wall, 1), "steps": engine.steps})
        engine.close()
        del engine, runner
        torch.cuda.empty_cache()
    del model
    torch.cuda.empty_cache()


# -- serve ------------------------------------------------------------------------------------------
def make_adapters(model_dir: Path, root: Path, n: int) -> dict[str, Path]:
    """n random LoRA adapters, r64 on every linear layer (the issue's adapter), saved like training."""
    import torch
    from peft import LoraConfig, get_peft_model

    from glmtune.models.loading import load_model

    dirs = {f"a{i}": root / f"a{i}" for i in range(n)}
    if all((d / "adapter_config.json").exists() for d in dirs.values()):
        return dirs
    base = load_model(model_dir, dtype="bfloat16").to("cuda" if torch.cuda.is_available() else "cpu")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=64, lora_alpha=128, target_modules=targets))
    for i, (name, folder) in enumerate(dirs.items()):
        torch.manual_seed(100 + i)
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                torch.nn.init.normal_(p, std=1e-3)
        model.save_pretrained(folder)
    del model, base
    torch.cuda.empty_cache()
    return dirs


async def one_stream(client, model: str, question: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first, tokens = None, 0
    stream = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                  max_tokens=max_tokens, temperature=0, stream=True,
                                                  stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"ttft": first if first is not None else time.perf_counter() - t0,
            "latency": time.perf_counter() - t0, "tokens": tokens}


async def load_level(url: str, models: list[str], questions: list[str], max_tokens: int) -> dict:
    import httpx
    import openai

    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=len(questions) + 8), timeout=600)
    client = openai.AsyncOpenAI(base_url=url, api_key="none", http_client=http, max_retries=0)
    t0, cpu0, started = time.perf_counter(), time.process_time(), time.time()
    rows = await asyncio.gather(*[one_stream(client, models[i % len(models)], q, max_tokens)
                                  for i, q in enumerate(questions)], return_exceptions=True)
    wall = time.perf_counter() - t0
    await http.aclose()
    ok = [r for r in rows if isinstance(r, dict)]
    failed = [repr(r)[:200] for r in rows if not isinstance(r, dict)]
    ttfts = sorted(r["ttft"] for r in ok) or [float("nan")]
    tokens = sum(r["tokens"] for r in ok)
    return {"streams": len(questions), "ok": len(ok), "failed": len(failed), "first_failure": failed[:1],
            "wall_s": round(wall, 3), "completion_tokens": tokens, "tok_per_s": round(tokens / wall, 1),
            "ttft_p50_s": round(ttfts[len(ttfts) // 2], 3), "ttft_p90_s": round(ttfts[int(len(ttfts) * 0.9)], 3),
            "tok_per_s_per_stream": round(statistics.mean(r["tokens"] / r["latency"] for r in ok), 1) if ok else None,
            # the client's own CPU seconds: near wall_s, the one client process is what limits the figure
            "client_cpu_s": round(time.process_time() - cpu0, 3), "started": started, "ended": time.time(),
            "ttfts": [round(t, 4) for t in ttfts]}


def spread_level(url: str, models: list[str], first: int, n: int, max_tokens: int, procs: int) -> dict:
    """``n`` streams from ``procs`` client processes started together (questions first..first+n of
    prompts(200, seed=2), round-robin over ``models``): the load of many users, not of one Python
    process parsing every chunk. Aggregate tok/s = all tokens / (last end - common start)."""
    share = [n // procs + (i < n % procs) for i in range(procs)]
    start_at = time.time() + 6.0  # the workers import openai first
    workers, at = [], first
    for count in share:
        cmd = [sys.executable, __file__, "--client", url, "--client-models", ",".join(models),
               "--client-first", str(at), "--client-count", str(count), "--client-start", str(start_at),
               "--max-tokens", str(max_tokens)]
        workers.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
        at += count
    rows = [json.loads(w.communicate(timeout=600)[0].strip().splitlines()[-1]) for w in workers]
    ttfts = sorted(t for r in rows for t in r["ttfts"]) or [float("nan")]
    tokens, wall = sum(r["completion_tokens"] for r in rows), max(r["ended"] for r in rows) - start_at
    return {"streams": n, "client_processes": procs, "ok": sum(r["ok"] for r in rows),
            "failed": sum(r["failed"] for r in rows), "wall_s": round(wall, 3), "completion_tokens": tokens,
            "tok_per_s": round(tokens / wall, 1), "ttft_p50_s": round(ttfts[len(ttfts) // 2], 3),
            "ttft_p90_s": round(ttfts[int(len(ttfts) * 0.9)], 3),
            "late_start_s": round(max(r["started"] for r in rows) - start_at, 3),
            "client_cpu_s": [r["client_cpu_s"] for r in rows]}


def client_worker(args) -> None:
    """One client process of :func:`spread_level`: waits for the common start, runs its streams."""
    qs = prompts(200, seed=2)[args.client_first:args.client_first + args.client_count]
    import httpx  # noqa: F401 - imported before the start, not inside the timed part
    import openai  # noqa: F401
    time.sleep(max(0.0, args.client_start - time.time()))
    row = asyncio.run(load_level(args.client, args.client_models.split(","), qs, args.max_tokens))
    print(json.dumps(row), flush=True)


def gpu_memory_mib() -> int | None:
    try:
        text = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=20).stdout
        return int(text.split()[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def phase_serve(model_dir: Path, out: Path | None, max_tokens: int, port: int, flags: tuple = (),
                levels: tuple | None = None) -> None:
    adapters = make_adapters(model_dir, Path("/tmp/glmtune_bench_adapters"), 4)
    cmd = [sys.executable, "-m", "glmtune", "serve", "--model", str(model_dir), "--port", str(port),
           "--max-queue", "512", "--timeout", "600", "--max-tokens", str(max_tokens), "--model-name", "glm4-9b",
           *flags]
    for name, folder in adapters.items():
        cmd += ["--adapter", f"{name}={folder}"]
    t0 = time.perf_counter()
    log = open("/tmp/glmtune_serve.log", "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_healthy(url, server, 400):
            raise RuntimeError("server did not start: " + Path("/tmp/glmtune_serve.log").read_text()[-3000:])
        emit(out, {"serve_startup_s": round(time.perf_counter() - t0, 1),
                   "server_log": Path("/tmp/glmtune_serve.log").read_text()[-1500:]})
        qs = prompts(200, seed=2)
        asyncio.run(load_level(f"{url}/v1", ["glm4-9b"], qs[:64], 16))           # warm-up (untimed)
        asyncio.run(load_level(f"{url}/v1", list(adapters), qs[64:128], 16))
        levels = levels or ((1, ["glm4-9b"]), (1, ["glm4-9b"]), (16, ["glm4-9b"]), (64, ["glm4-9b"]),
                            (64, list(adapters)), (1, ["a0"]), (128, ["glm4-9b"]), (64, ["glm4-9b"], 4))
        for n, models, *procs in levels:
            if procs and procs[0] > 1:
                row = spread_level(f"{url}/v1", models, 0, n, max_tokens, procs[0])
            else:
                row = asyncio.run(load_level(f"{url}/v1", models, qs[:n], max_tokens))
                row.pop("ttfts")
            emit(out, {"phase": "serve", "flags": " ".join(flags), "adapters": len(models) if models[0] != "glm4-9b" else 0, **row,
                       "gpu_memory_mib": gpu_memory_mib()})
    finally:
        stop_server(server)
        emit(out, {"server_log_tail": Path("/tmp/glmtune_serve.log").read_text()[-1500:]})


def wait_healthy(url: str, server: subprocess.Popen, limit_s: float) -> bool:
    """Poll ``url``/health until it answers 200 (True), or the server exits or ``limit_s`` pass (False)."""
    import httpx

    t0 = time.perf_counter()
    while server.poll() is None and time.perf_counter() - t0 < limit_s:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM (the server's own shutdown), SIGKILL after 30 s."""
    server.terminate()
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        server.kill()


# -- baseline ---------------------------------------------------------------------------------------
def sync() -> None:
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def phase_baseline(model_dir: Path, out: Path | None, max_tokens: int) -> None:
    import torch

    from glmtune.models.loading import load_model
    from glmtune.models.tokenizer import load_tokenizer
    from glmtune.templates import get_template

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(model_dir, dtype="bfloat16").to(dev).eval()
    tok, tpl = load_tokenizer(model_dir), get_template("glm4")
    ids = [tpl.encode_prompt(tok, [{"role": "user", "content": q}]) for q in prompts(64, seed=2)]
    for batch in (1, 64):
        rows = ids[:batch]
        width = max(len(r) for r in rows)
        x = torch.tensor([[0] * (width - len(r)) + r for r in rows], device=dev)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=dev)
        with torch.inference_mode():
            model.generate(input_ids=x, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
            sync()
            t0 = time.perf_counter()
            y = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                               do_sample=False, pad_token_id=0)
            sync()
        wall = time.perf_counter() - t0
        new = (y.shape[1] - width) * batch
        emit(out, {"phase": "baseline", "what": "model.generate eager, dynamic cache", "batch": batch,
                   "prompt_tokens_mean": sum(map(len, rows)) / batch, "new_tokens": new, "wall_s": round(wall, 2),
                   "tok_per_s": round(new / wall, 1)})
    del model
    torch.cuda.empty_cache()


# -- predict / eval ---------------------------------------------------------------------------------
def phase_predict(model_dir: Path, out: Path | None, n: int, n_off: int, n_eval: int) -> None:
    data = Path("/tmp/glmtune_bench_predict.jsonl")
    with data.open("w") as f:
        for q in prompts(n, words=120, seed=3):
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "x"}]}) + "\n")
    runs = (("engine", n, ["--engine", "auto", "--batch-size", "256"]),
            ("engine off (transformers generate, batch 8: the old default)", n_off,
             ["--engine", "off", "--batch-size", "8"]))
    for what, count, flags in runs:
        sub = Path(f"/tmp/glmtune_bench_predict_{count}.jsonl")
        sub.write_text("".join(data.read_text().splitlines(keepends=True)[:count]))
        pred = Path(f"/tmp/glmtune_bench_pred_{abs(hash(what))}.jsonl")
        pred.unlink(missing_ok=True)
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "glmtune", "predict", "--model", str(model_dir), "--data", str(sub),
                            "--out", str(pred), "--max-new-tokens", "64", *flags], capture_output=True, text=True,
                           cwd=REPO, timeout=540)
        wall = time.perf_counter() - t0
        emit(out, {"phase": "predict", "what": what, "prompts": count, "rc": r.returncode, "wall_s": round(wall, 1),
                   "samples_per_s_incl_load": round(count / wall, 2), "stderr_tail": r.stderr[-600:]})
    if n_eval:
        cmcc = Path("/tmp/glmtune_bench_cmcc.jsonl")
        labels = ["办理开通", "查询费用", "取消业务", "投诉", "咨询"]
        rng = random.Random(4)
        with cmcc.open("w") as f:
            for i in range(n_eval):
                turns = " ".join(rng.choice(WORDS) for _ in range(60))
                f.write(json.dumps({"messages": [{"role": "system", "content": "对话意图分类，只回答标签。"},
                                                 {"role": "user", "content": f"客户: {turns}"},
                                                 {"role": "assistant", "content": labels[i % 5]}],
                                    "label": labels[i % 5]}, ensure_ascii=False) + "\n")
        report = Path("/tmp/glmtune_bench_eval")
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "glmtune", "eval", "classify", "--model", str(model_dir),
                            "--data", str(cmcc), "--out", str(report), "--mode", "generate", "--batch-size", "256"],
                           capture_output=True, text=True, cwd=REPO, timeout=540)
        wall = time.perf_counter() - t0
        emit(out, {"phase": "eval classify --mode generate", "dialogues": n_eval, "rc": r.returncode,
                   "wall_s": round(wall, 1), "samples_per_s_incl_load": round(n_eval / wall, 2),
                   "stderr_tail": r.stderr[-600:]})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--phases", default="check,serve,baseline")
    p.add_argument("--model-dir", default="/tmp/glmtune_bench_glm4_9b")
    p.add_argument("--layers", type=int, default=40)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--predict", type=int, default=1000)
    p.add_argument("--predict-off", type=int, default=128)
    p.add_argument("--eval", type=int, default=489)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--tiny", action="store_true", help="a 2-layer tiny folder: a CPU dry run of this script")
    p.add_argument("--engine-modes", default="eager,compiled", help="engine phase: eager, compiled or both")
    for name, kind in (("client", str), ("client-models", str), ("client-first", int), ("client-count", int),
                       ("client-start", float)):
        p.add_argument(f"--{name}", type=kind, default=None, help=argparse.SUPPRESS)  # spread_level's workers
    args = p.parse_args()
    if args.client:
        client_worker(args)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from train_product import write_model_folder

    t0 = time.perf_counter()
    model_dir = write_model_folder(Path(args.model_dir), args.layers, tiny=args.tiny)
    emit(args.out, {"model_dir": str(model_dir), "build_s": round(time.perf_counter() - t0, 1)})
    for phase in args.phases.split(","):
        t0 = time.perf_counter()
        try:
            if phase == "check":
                phase_check(model_dir, args.out)
            elif phase == "prefill":
                phase_prefill(model_dir, args.out, args.max_tokens)
            elif phase == "engine":
                phase_engine(model_dir, args.out, args.max_tokens,
                             tuple(m == "compiled" for m in args.engine_modes.split(",")))
            elif phase == "serve":
                phase_serve(model_dir, args.out, args.max_tokens, args.port)
            elif phase == "serve_clients":  # the same server, the load from 1, 4 and 8 client processes
                phase_serve(model_dir, args.out, args.max_tokens, args.port + 3, (),
                            ((1, ["glm4-9b"]), (1, ["glm4-9b"]), (64, ["glm4-9b"]), (64, ["glm4-9b"], 4),
                             (64, ["glm4-9b"], 8), (64, ["a0", "a1", "a2", "a3"], 8), (128, ["glm4-9b"], 8)))
            elif phase == "serve_nocompile":
                phase_serve(model_dir, args.out, args.max_tokens, args.port + 1, ("--no-compile",),
                            ((1, ["glm4-9b"]), (1, ["glm4-9b"]), (64, ["glm4-9b"])))
            elif phase == "serve_inprocess":
                phase_serve(model_dir, args.out, args.max_tokens, args.port + 2, ("--no-engine-process",),
                            ((1, ["glm4-9b"]), (1, ["glm4-9b"]), (64, ["glm4-9b"])))
            elif phase == "baseline":
                phase_baseline(model_dir, args.out, args.max_tokens)
            elif phase == "predict":
                phase_predict(model_dir, args.out, args.predict, args.predict_off, args.eval)
            else:
                raise SystemExit(f"unknown phase {phase}")
        except Exception as e:  # noqa: BLE001 - report and go on to the next phase
            import traceback
            emit(args.out, {"phase": phase, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2500:]})
        emit(args.out, {"phase_done": phase, "s": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    main()
