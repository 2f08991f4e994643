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
