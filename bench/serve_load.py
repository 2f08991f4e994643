"""Load test of `glmtune serve` on 127.0.0.1: N concurrent streaming clients, default max_tokens.

Starts the real command (`python -m glmtune serve --model M`) as a subprocess, then for each
concurrency level sends that many streaming chat requests at once (questions the tiny trained
model answers, so answers end on the template's stop token like a fine-tuned model's) and records
wall time, failures, time to first token and latency. The acceptance bar (issue 13): 64 clients,
0 failed, wall time at most 3x that of 8 clients (batching, not a queue).

    python3 bench/serve_load.py --levels 1,8,64 --out bench/results/serve_load.json
    python3 bench/serve_load.py --model models/merged --levels 8,64     # any model folder
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "infer"))
sys.path.insert(0, str(ROOT / "tests" / "serve"))


def tiny_trained_model() -> Path:
    """The tiny GLM-4 the serving tests use (trained once, cached under $GLMTUNE_CACHE_DIR)."""
    from tiny_trained import trained_tiny_glm4
    tok = ROOT.parent / "shared" / "data" / "glm4-tokenizer"
    if not tok.exists():
        tok = ROOT / "glmtune" / "resources" / "tokenizers" / "glm4"
    return trained_tiny_glm4(Path("/tmp/glmtune-bench-serve"), tok)


async def one_client(client, url: str, question: str) -> dict:
    t0 = time.perf_counter()
    first, text = None, ""
    body = {"model": "tiny", "messages": [{"role": "user", "content": question}], "stream": True}
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"ok": False, "status": r.status_code}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"ok": False, "status": chunk["error"].get("type")}
            piece = chunk["choices"][0]["delta"].get("content") or ""
            if piece and first is None:
                first = time.perf_counter() - t0
            text += piece
    return {"ok": True, "ttft": first, "latency": time.perf_counter() - t0, "text": text}


async def level(url: str, n: int, questions: list[str]) -> dict:
    import httpx
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_client(client, url, questions[i % len(questions)]) for i in range(n)),
                                       return_exceptions=True)
        wall = time.perf_counter() - t0
    ok = [r for r in results if isinstance(r, dict) and r["ok"]]
    lat = sorted(r["latency"] for r in ok)
    ttft = sorted(r["ttft"] for r in ok if r["ttft"] is not None)
    return {"clients": n, "failed": n - len(ok), "wall_s": round(wall, 2),
            "latency_median_s": round(statistics.median(lat), 2) if lat else None,
            "latency_max_s": round(lat[-1], 2) if lat else None,
            "ttft_median_s": round(statistics.median(ttft), 2) if ttft else None,
            "answers_distinct": len({r["text"] for r in ok})}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=None, help="Model folder (default: the tiny trained GLM-4).")
    ap.add_argument("--levels", default="8,64")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from server_wait import wait_healthy
    from tiny_trained import QA

    model = args.model or tiny_trained_model()
    url = f"http://127.0.0.1:{args.port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    server = subprocess.Popen([sys.executable, "-m", "glmtune", "serve", "--model", str(model), "--port",
                               str(args.port), "--model-name", "tiny", "--max-queue", "256", "--timeout", "600"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(server, url, deadline_s=300)
        questions = [q for q, _ in QA]
        asyncio.run(level(url, 2, questions))  # warm-up: the batching manager starts on first use
        rows = [asyncio.run(level(url, int(n), questions)) for n in args.levels.split(",")]
    finally:
        server.terminate()
        server.wait(30)
    import platform
    import torch
    info = {"model": str(model), "device": "cuda" if torch.cuda.is_available() else "cpu",
            "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
            "load_avg_1m": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M")}
    by_n = {r["clients"]: r for r in rows}
    if 8 in by_n and 64 in by_n:
        info["wall_64_over_8"] = round(by_n[64]["wall_s"] / by_n[8]["wall_s"], 2)
    print(json.dumps({"info": info, "levels": rows}, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"info": info, "levels": rows}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
