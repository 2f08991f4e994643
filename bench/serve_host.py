"""The serving side's host cost per streamed token: `glmtune serve` with the device taken out.

On the H200 (bench/RESULTS.md, session 11) the engine alone ran 64 requests of 128 tokens in 1.50 s,
`glmtune serve` in 1.96 s with the load spread over 4 client processes: the HTTP process (the
tokenizer's incremental decoding, the events, the SSE chunks, uvicorn's socket writes, the pipe's
receiver thread) is where the rest goes. This script measures that process on any machine: the real
app (`glmtune.serve.app.serve`, FastAPI + uvicorn, a real Predictor on a tiny GLM-4 folder with the
real GLM-4 tokenizer) over the real `RemoteEngine` pipe to a child process whose `GenerationEngine`
drives a stand-in runner: every decode step sleeps ``--step-ms`` (the device's time; the H200's 64-row
graph replay is 7.35 ms) and answers ordinary GLM-4 token ids of English text, so the text decoding
does real work. Clients are bench/serve_gpu.py's (OpenAI client, streaming, in --procs processes).

    python3 bench/serve_host.py [--streams 64] [--new 128] [--step-ms 7.35] [--procs 4] [--repeat 2]

With ``SERVE_HOST_TRACE=FILE`` the engine's process writes to FILE (twice a second) when each request
reached it and each engine turn's start, length and running requests: the arrival spread and the turn
period under serve.

Prints one JSON line per level: tok/s, TTFT, and the server process's CPU seconds and µs per streamed
token (read from /proc: the figure that does not depend on how loaded the machine is).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

TEXT = ("The river runs past the old mill and the children walk along its bank every morning, counting the "
        "boats that carry grain and timber down to the harbour, where the market opens at seven. ")


def sleeping_runner(slots: int, length: int, step_s: float, ids: list[int]):
    """engine_host's InstantRunner whose decode step takes ``step_s`` of wall time (no GIL held) and
    whose rows answer the next id of ``ids`` (offset by their slot) until their max_new."""
    from engine_host import InstantRunner

    class SleepingRunner(InstantRunner):
        def _pending(self, slots, rows):
            tokens, finished = [], []
            for s in slots:
                tokens.append(ids[(s * 7 + self.answered[s]) % len(ids)])
                self.answered[s] += 1
                finished.append(self.answered[s] >= self.max_new[s])
            return self.Pending(self.torch.tensor(tokens), self.torch.tensor(finished), None, list(rows))

        def decode(self, n_rows, longest, *, sampling, adapters=True, rows):
            time.sleep(step_s)
            return super().decode(n_rows, longest, sampling=sampling, adapters=adapters, rows=rows)

    return SleepingRunner(slots, length)


def _child(conn, slots: int, step_s: float, ids: list[int]) -> None:
    from glmtune.infer.engine.scheduler import GenerationEngine
    from glmtune.infer.engine_process import ChildServer

    engine = GenerationEngine(sleeping_runner(slots, 4096, step_s, ids), prefill_tokens=4096, prefix_slots=0,
                              stop_ids=[151329])
    trace = os.environ.get("SERVE_HOST_TRACE")
    if trace:  # when each request arrived, and each engine turn (start, seconds, running), dumped twice a second
        import threading

        record, turn, submit = {"submits": [], "turns": []}, engine._turn, engine.submit

        def timed_turn():
            t0 = time.perf_counter()
            turn()
            record["turns"].append((round(t0, 5), round(time.perf_counter() - t0, 5), len(engine._running)))

        def timed_submit(*a, **k):
            record["submits"].append(round(time.perf_counter(), 5))
            return submit(*a, **k)

        def dump():
            while True:
                time.sleep(0.5)
                Path(trace).write_text(json.dumps(record))
        engine._turn, engine.submit = timed_turn, timed_submit
        threading.Thread(target=dump, daemon=True).start()
    conn.send(("ready",))
    ChildServer(conn, engine).run()
    engine.close()


def run_server(port: int, step_ms: float, model_dir: Path) -> None:
    """The server process: Predictor on the tiny folder, its engine replaced by the remote stand-in."""
    import multiprocessing as mp

    from glmtune.infer.engine_process import RemoteEngine
    from glmtune.infer.predictor import Predictor
    from glmtune.serve.app import serve

    predictor = Predictor(model_dir)
    ids = [i for i in predictor.tokenizer.encode(TEXT * 4, add_special_tokens=False)]
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(child, 256, step_ms / 1000, ids), daemon=True)
    proc.start()
    child.close()
    assert conn.recv() == ("ready",)
    remote = RemoteEngine(conn, proc, {"stop_ids": [151329], "max_positions": 4095, "summary": "stand-in"})
    predictor.backend.engine = lambda stop_ids: remote
    serve(predictor, port=port, max_queue=512, timeout=600, max_tokens=4096)


def process_cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` and its threads (not its children), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    import asyncio

    import serve_gpu
    from glmtune.models.tiny import BUILTIN_GLM4_TOKENIZER, build_tiny_glm4

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--step-ms", type=float, default=7.35, help="device time of one decode step (H200, 64 rows: 7.35)")
    ap.add_argument("--procs", type=int, default=4, help="client processes (1: one asyncio client in this process)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--port", type=int, default=8791)
    ap.add_argument("--model-dir", default="/tmp/glmtune_serve_host_tiny")
    ap.add_argument("--server", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    model_dir = Path(a.model_dir)
    if a.server:
        run_server(a.port, a.step_ms, model_dir)
        return
    if not (model_dir / "glmtune.json").exists():
        build_tiny_glm4(model_dir, BUILTIN_GLM4_TOKENIZER)
    server = subprocess.Popen([sys.executable, __file__, "--server", "--port", str(a.port), "--step-ms",
                               str(a.step_ms), "--model-dir", str(model_dir)], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{a.port}"
    try:
        if not serve_gpu.wait_healthy(url, server, 120):
            raise SystemExit("the server did not start")
        asyncio.run(serve_gpu.load_level(f"{url}/v1", ["base"], serve_gpu.prompts(8, seed=2), 16))  # warm-up
        for _ in range(a.repeat):
            cpu0 = process_cpu_s(server.pid)
            if a.procs > 1:
                row = serve_gpu.spread_level(f"{url}/v1", ["base"], 0, a.streams, a.new, a.procs)
            else:
                row = asyncio.run(serve_gpu.load_level(f"{url}/v1", ["base"], serve_gpu.prompts(a.streams, seed=2),
                                                       a.new))
                row = {k: v for k, v in row.items() if k not in ("ttfts", "started", "ended")}
            cpu = process_cpu_s(server.pid) - cpu0
            row.update(step_ms=a.step_ms, server_cpu_s=round(cpu, 3),
                       server_cpu_us_per_token=round(cpu / max(row["completion_tokens"], 1) * 1e6, 1),
                       device_bound_tok_per_s=round(a.streams / (a.step_ms / 1000), 1) if a.step_ms else None)
            print(json.dumps(row), flush=True)
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    main()
