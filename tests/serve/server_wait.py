"""Wait for a `glmtune serve` subprocess to answer /health (shared by the serve and real-model tests)."""
from __future__ import annotations

import time


def wait_healthy(proc, url: str, deadline_s: float = 180, poll_s: float = 0.5) -> None:
    """Return once GET {url}/health is 200; fail with the server's output if it exits, or on timeout."""
    import httpx

    deadline = time.time() + deadline_s
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.time() < deadline, "server did not come up"
        time.sleep(poll_s)
