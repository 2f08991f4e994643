"""`output.profile_steps: N`: torch.profiler over N optimizer steps of a real run, after 5 warm-up steps
(compilation, CUDA-graph capture and the allocator settle first).

Why in the product and not a bench copy: what limits a step (the host issuing kernels, host waits, the
GPU itself) depends on the loop's own code, so it is measured on the loop users run. profile.txt gives
the wall time per step, the GPU's busy time per step (kernels and copies on the device's timeline) and
their ratio, then the ops that took the most device and host time; profile_trace.json is the timeline.
"""
from __future__ import annotations

import time
from pathlib import Path

WARMUP_STEPS = 5


class StepProfiler:
    """Starts after WARMUP_STEPS optimizer steps (counted from where the run starts or resumes), stops N
    steps later and writes the report; a no-op when N is 0 or on processes other than the main one."""

    def __init__(self, out: Path, steps: int, *, enabled: bool, cuda: bool):
        self.out, self.steps, self.cuda = Path(out), steps, cuda
        self.active = enabled and steps > 0
        self.seen = 0
        self.prof = None
        self.t0 = 0.0

    def step_done(self) -> None:
        """Call after every optimizer step."""
        if not self.active:
            return
        self.seen += 1
        if self.seen == WARMUP_STEPS:
            self._start()
        elif self.seen == WARMUP_STEPS + self.steps and self.prof is not None:
            self._stop()

    def _start(self) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        if self.cuda:
            torch.cuda.synchronize()
        self.prof = profile(activities=acts)
        self.prof.__enter__()
        self.t0 = time.perf_counter()

    def _stop(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        self.active = False
        self.out.mkdir(parents=True, exist_ok=True)
        self.prof.export_chrome_trace(str(self.out / "profile_trace.json"))
        (self.out / "profile.txt").write_text(profile_report(self.prof, wall, self.steps, self.cuda))
        self.prof = None


def device_busy_s(events) -> float:
    """Seconds the device timeline was busy: the union of kernel / memcpy / memset intervals (overlapping
    streams counted once)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events
                   if getattr(e, "device_type", None) is not None and str(e.device_type).endswith("CUDA"))
    busy, end = 0, None
    for a, b in spans:
        if end is None or a > end:
            busy += b - a
            end = b
        elif b > end:
            busy += b - end
            end = b
    return busy / 1e6  # profiler times are microseconds


def profile_report(prof, wall_s: float, steps: int, cuda: bool) -> str:
    lines = [f"profiled {steps} optimizer steps: {wall_s / steps * 1000:.1f} ms wall per step"]
    if cuda:
        busy = device_busy_s(prof.events())
        lines.append(f"GPU busy {busy / steps * 1000:.1f} ms per step = {100 * busy / wall_s:.0f}% of the wall time "
                     "(the rest: the GPU waits for the host to issue work or for a host sync)")
        lines += ["", "by device time:", prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)]
    lines += ["", "by host time:", prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)]
    return "\n".join(lines) + "\n"
