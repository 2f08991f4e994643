"""`glmtune serve` as a user starts it: a subprocess on 127.0.0.1 answering like Predictor."""
from __future__ import annotations

import os
import subprocess
import sys

import openai

from conftest import free_port
from server_wait import wait_healthy
from tiny_trained import QA


def test_serve_subprocess_matches_predictor(trained_glm4_dir):
    from glmtune import Predictor

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GLMTUNE_API_KEY": "k-123"}
    proc = subprocess.Popen([sys.executable, "-m", "glmtune", "serve", "--model", str(trained_glm4_dir),
                             "--port", str(port), "--max-tokens", "24"],
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


def test_adapter_name_must_be_plain(trained_glm4_dir, tmp_path):
    """`--adapter ../evil=DIR` was a KeyError traceback from torch once the model had loaded (a module
    name holds no '.'); now one line naming the flag, before anything loads."""
    adapter = tmp_path / "run.v2"
    adapter.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.getcwd()}
    for value, name in ((f"../evil={adapter}", "../evil"), (f"a/b={adapter}", "a/b"), (f"v1.2={adapter}", "v1.2"),
                        (str(adapter), "run.v2"), (f"base={adapter}", None)):
        proc = subprocess.run([sys.executable, "-m", "glmtune", "serve", "--model", str(trained_glm4_dir),
                               "--adapter", value], env=env, capture_output=True, text=True, timeout=120)
        err = proc.stderr.strip()
        assert proc.returncode == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err[-2000:]
        assert err.startswith("error: field '--adapter': ")
        assert (f"adapter name '{name}' is not a plain name" if name else "'base' is reserved") in err
