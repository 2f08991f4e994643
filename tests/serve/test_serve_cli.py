"""`glmtune serve` as a user starts it: a subprocess on 127.0.0.1 answering like Predictor."""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import openai
import pytest

from conftest import free_port
from server_wait import wait_healthy
from tiny_trained import QA


@pytest.mark.parametrize("flags", [(), ("--engine-process",)], ids=["in-process", "engine-process"])
def test_serve_subprocess_matches_predictor(trained_glm4_dir, flags):
    from glmtune import Predictor

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GLMTUNE_API_KEY": "k-123"}
    proc = subprocess.Popen([sys.executable, "-m", "glmtune", "serve", "--model", str(trained_glm4_dir),
                             "--port", str(port), "--max-tokens", "24", *flags],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}", deadline_s=90, poll_s=0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k-123", max_retries=0)
        name = trained_glm4_dir.name  # the base model is served under its folder name
        answers = [client.chat.completions.create(model=name, messages=[{"role": "user", "content": q}])
                   .choices[0].message.content for q, _ in QA]
        predictor = Predictor(trained_glm4_dir, max_new_tokens=24)
        assert answers == [predictor(q) for q, _ in QA] == [a for _, a in QA]
        bad = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="nope", max_retries=0)
        try:
            bad.models.list()
            raise AssertionError("a wrong key must be refused")
        except openai.AuthenticationError:
            pass
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert f"http://127.0.0.1:{port}/v1" in out  # binds to localhost by default, and says so
    assert ("in its own process (pid " in out) == bool(flags), out  # the start-up line says where the engine runs


def test_adapter_name_must_be_plain(trained_glm4_dir, tmp_path, capsys):
    """`--adapter ../evil=DIR` was a KeyError traceback from torch once the model had loaded (a module
    name holds no '.'); now one line naming the flag, before anything loads. The program itself once
    (exit status, stderr), the other names through the same entry point in this process."""
    from glmtune.cli.main import main

    adapter = tmp_path / "run.v2"
    adapter.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.getcwd()}
    cases = ((f"../evil={adapter}", "../evil"), (f"a/b={adapter}", "a/b"), (f"v1.2={adapter}", "v1.2"),
             (str(adapter), "run.v2"), (f"base={adapter}", None))
    for i, (value, name) in enumerate(cases):
        argv = ["serve", "--model", str(trained_glm4_dir), "--adapter", value]
        if i == 0:
            proc = subprocess.run([sys.executable, "-m", "glmtune", *argv], env=env, capture_output=True, text=True,
                                  timeout=120)
            code, err = proc.returncode, proc.stderr.strip()
        else:
            with pytest.raises(SystemExit) as exit_info:
                main(argv)
            code, err = exit_info.value.code, capsys.readouterr().err.strip()
        assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err[-2000:]
        assert err.startswith("error: field '--adapter': ")
        assert (f"adapter name '{name}' is not a plain name" if name else "'base' is reserved") in err


def post_with_urllib(url: str, body) -> tuple[int, dict]:
    """urllib sends the whole body before it reads a byte of the answer (a bytes body has a
    Content-Length; an iterable one goes chunked)."""
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def seconds_until_closed(port: int, partial: bytes, limit_s: float = 10) -> float:
    """Send ``partial`` (an unfinished request) and stall; seconds until the server closes the socket."""
    with socket.create_connection(("127.0.0.1", port), timeout=limit_s) as sock:
        sock.sendall(partial)
        t0 = time.time()
        assert sock.recv(1024) == b"", "the server answered a request it never fully received"
        return time.time() - t0


def test_serve_413_reaches_a_client_that_sends_everything_and_slow_headers_are_cut(trained_glm4_dir):
    """8 MiB bodies (more than loopback socket buffers hold) over --max-body 1024 read as 413, not as a
    connection reset; a partial request line, or a kept-alive connection's next request that stalls,
    is closed after --header-timeout."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "glmtune", "serve", "--model", str(trained_glm4_dir),
                             "--port", str(port), "--max-body", "1024", "--header-timeout", "0.5"],
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(proc, url, deadline_s=90, poll_s=0.2)
        endpoint = f"{url}/v1/chat/completions"
        for body in (b"x" * (8 << 20), iter([b"y" * 65536] * 128)):
            status, answer = post_with_urllib(endpoint, body)
            assert status == 413 and answer["error"]["code"] == "body_too_large"
        small = json.dumps({"model": trained_glm4_dir.name, "max_tokens": 4,
                            "messages": [{"role": "user", "content": QA[0][0]}]}, ensure_ascii=False).encode()
        assert post_with_urllib(endpoint, small)[0] == 200  # the guard leaves normal requests alone
        assert 0.3 < seconds_until_closed(port, b"POST /v1/chat/compl") < 3
        kept = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        kept.request("GET", "/health")
        assert kept.getresponse().read() and kept.sock is not None  # read whole, connection kept alive
        kept.sock.sendall(b"GET /health HTTP/1.1\r\nHo")  # the next request on it stalls
        t0 = time.time()
        assert kept.sock.recv(1024) == b"" and time.time() - t0 < 3
        kept.close()
    finally:
        proc.terminate()
        proc.communicate(timeout=20)


def test_three_quick_ctrl_c_stop_serve_cleanly(trained_glm4_dir):
    """uvicorn re-raised each captured Ctrl-C inside its event loop after shutdown and skipped the
    lifespan shutdown when forced: a KeyboardInterrupt / CancelledError traceback and status 0."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "glmtune", "serve", "--model", str(trained_glm4_dir),
                             "--port", str(port)], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}", deadline_s=90, poll_s=0.2)
        for _ in range(3):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.05)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, out
    assert "Traceback" not in out and "Exception ignored" not in out and "ERROR" not in out, out
