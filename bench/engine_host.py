"""Host cost of the generation engine's loop, per decode step, with no device work at all.

On the H200 one 64-row decode graph replays in 7.3 ms (session 7), but the engine ran 64 requests at
an effective ~11 ms per step and `glmtune serve` (engine in its own process) at ~14 ms: the rest is
host time (the scheduler, the per-request callbacks, the child's sender thread and its pipe) that
either overlaps the device or does not. This script measures that host time on any machine: the
real `GenerationEngine` (and, with --process, the real `ChildServer` and `RemoteEngine` over a real
pipe to a child process) drives a stand-in runner whose prefill and decode return at once.

    python3 bench/engine_host.py --rows 64 --new 128 [--process] [--repeat 3]

Prints one JSON line per run: wall seconds, µs of host time per token and per decode step (per token x
rows), and the tokens/s the host alone could feed (an upper bound: the device's time per step adds to
the part that does not overlap).
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class FakeCache:
    def __init__(self, slots: int, length: int):
        self.slots, self.length, self.device = slots, length, "cpu"

    def copy(self, src, dst, length):
        pass

    def detach(self):
        pass


class InstantRunner:
    """ModelRunner's interface with no model: every row answers token 7 until its max_new."""

    def __init__(self, slots: int, length: int):
        import torch

        from glmtune.infer.engine.runner import Pending

        self.Pending, self.torch = Pending, torch
        self.cache = FakeCache(slots, length)
        self.max_new = [0] * slots
        self.answered = [0] * slots
        self.use_graphs, self.graphs, self.graph_failure = False, {}, None
        self.compiled, self.compile_failure = None, None
        self.decodes = 0

    def set_row(self, slot, *, max_new, **_):
        self.max_new[slot], self.answered[slot] = max_new, 0

    def mark_seen(self, slot, ids):
        pass

    def move(self, src, dst, length):
        self.max_new[dst], self.answered[dst] = self.max_new[src], self.answered[src]

    def deactivate(self, slot):
        pass

    def capture_buckets(self, *_):
        pass

    def _pending(self, slots, rows):
        torch = self.torch
        finished = []
        for s in slots:
            self.answered[s] += 1
            finished.append(self.answered[s] >= self.max_new[s])
        n = len(slots)
        return self.Pending(torch.full((n,), 7, dtype=torch.long), torch.tensor(finished), None, list(rows))

    def prefill(self, chunks, *, sampling, rows):
        slots = [slot for slot, _, _, last in chunks if last]
        return self._pending(slots, rows) if slots else None

    def decode(self, n_rows, longest, *, sampling, adapters=True, rows):
        self.decodes += 1
        return self._pending(range(n_rows), rows)


def make_engine(rows: int, new: int):
    from glmtune.infer.engine.scheduler import GenerationEngine

    runner = InstantRunner(slots=rows + 8, length=2048)
    return GenerationEngine(runner, prefill_tokens=4096, prefix_slots=0, stop_ids=[2]), runner


def timed_requests(engine, rows: int, new: int, prompt: int) -> tuple[float, int]:
    """Submit ``rows`` requests at once and wait for all: (wall seconds, tokens answered). Each
    request's consumer only counts its updates (the least any consumer does)."""
    updates = [0]

    def on_update(seq):
        updates[0] += 1

    start = time.perf_counter()
    seqs = [engine.submit(list(range(3, 3 + prompt)), max_new_tokens=new, on_update=on_update) for _ in range(rows)]
    for s in seqs:
        s.done.wait(120)
    return time.perf_counter() - start, sum(len(s.tokens) for s in seqs)


def run_in_process(rows: int, new: int, prompt: int) -> dict:
    engine, runner = make_engine(rows, new)
    wall, tokens = timed_requests(engine, rows, new, prompt)
    engine.close()
    return {"mode": "in-process", "decode_steps": runner.decodes, "wall_s": wall, "tokens": tokens}


def _child(conn, rows, new):
    """The engine process's side: the real ChildServer over an instant runner."""
    from glmtune.infer.engine_process import ChildServer

    engine, runner = make_engine(rows, new)
    conn.send(("ready",))  # imports done: the parent's clock starts after this
    ChildServer(conn, engine).run()
    engine.close()


def run_over_pipe(rows: int, new: int, prompt: int) -> dict:
    import multiprocessing as mp

    from glmtune.infer.engine_process import RemoteEngine

    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(child, rows, new))
    proc.start()
    child.close()
    assert conn.recv() == ("ready",)
    remote = RemoteEngine(conn, proc, {"stop_ids": [2], "max_positions": 2047, "summary": "bench"})
    wall, tokens = timed_requests(remote, rows, new, prompt)
    remote.close()
    return {"mode": "process", "wall_s": wall, "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=160)
    ap.add_argument("--process", action="store_true", help="the engine in a child process, as glmtune serve on a GPU")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    for _ in range(a.repeat):
        r = (run_over_pipe if a.process else run_in_process)(a.rows, a.new, a.prompt)
        # per token is exact; per step = per token x rows (every row answers one token per decode step)
        r["host_us_per_token"] = round(r["wall_s"] / r["tokens"] * 1e6, 2)
        r["host_us_per_step"] = round(r["host_us_per_token"] * a.rows, 1)
        r["host_bound_tokens_per_s"] = round(r["tokens"] / r["wall_s"], 1)
        r.update(rows=a.rows, new=a.new)
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
