"""Long commands (train, crawl, synthesize, align) run as `glmtune ...` child processes.

The page stays live while a 9B model trains, a crash in training cannot take the UI down, and the
run is exactly what the same command in a terminal does. Output goes to a log file in the
workspace that the page tails. Stopping sends SIGINT first (the CLI exits cleanly: atomic writes
remove their temp files, finished checkpoints stay loadable), then SIGKILL after a grace period.
"""
from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from glmtune.errors import InputError


def glmtune_command(*args: str) -> list[str]:
    """The CLI as a child process (the same interpreter, so the same install and PYTHONPATH)."""
    return [sys.executable, "-m", "glmtune.cli.main", *args]


def shown_command(cmd: list[str]) -> str:
    """`glmtune train x.yaml` rather than `/path/to/python -m glmtune.cli.main train x.yaml`."""
    prefix = glmtune_command()
    return " ".join(["glmtune", *cmd[len(prefix):]] if cmd[:len(prefix)] == prefix else cmd)


@dataclass
class Job:
    name: str
    cmd: list[str]
    log: Path
    proc: subprocess.Popen
    started: float = field(default_factory=time.time)
    stopped_by_user: bool = False
    info: dict = field(default_factory=dict)  # what the tab needs later (e.g. the run's output folder)

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def state(self) -> str:
        code = self.proc.poll()
        if code is None:
            return "running"
        if self.stopped_by_user:
            return "stopped"
        return "finished" if code == 0 else f"failed (exit code {code})"

    def tail(self, lines: int = 40) -> str:
        """The last lines of the log (rich's progress redraws arrive as \\r; keep the latest)."""
        try:
            with open(self.log, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log) - 64 * 1024))
                text = f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""
        rows = [row.rsplit("\r", 1)[-1] for row in text.splitlines()]
        return "\n".join(rows[-lines:])


class JobSlot:
    """At most one job of a kind at a time (a second training run would fight over the same memory
    and output folder)."""

    def __init__(self, kind: str):
        self.kind = kind
        self.job: Job | None = None
        self._lock = threading.Lock()
        atexit.register(self.stop, 5.0)  # runs live in their own session: don't outlive the server

    def start(self, cmd: list[str], *, cwd: Path, log: Path, info: dict | None = None) -> Job:
        with self._lock:
            if self.job is not None and self.job.running:
                raise InputError(f"a {self.kind} run is already running (pid {self.job.proc.pid})",
                                 fix="wait for it to finish or press Stop first")
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "wb") as out:
                out.write(("$ " + shown_command(cmd) + "\n").encode())
                out.flush()
                env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}
                # own process group: Stop reaches accelerate's worker processes too
                proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
            self.job = Job(self.kind, cmd, log, proc, info=info or {})
            return self.job

    def stop(self, grace_s: float = 15.0) -> str:
        job = self.job
        if job is None or not job.running:
            return f"no {self.kind} run is running"
        job.stopped_by_user = True
        _signal_group(job.proc, signal.SIGINT)
        try:
            job.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(job.proc, signal.SIGKILL)
            job.proc.wait()
        return f"{self.kind} run stopped (pid {job.proc.pid})"


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
