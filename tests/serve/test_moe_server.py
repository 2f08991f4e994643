"""`glmtune serve` on a mixture-of-experts base with an expert LoRA (GLM-4.7-Flash layout): the
OpenAI client gets the Predictor's answers for the base and for the adapter by model name."""
from __future__ import annotations

import sys
from pathlib import Path

import openai

from conftest import API_KEY, LiveServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "infer"))
from tiny_moe import PROMPTS, moe_adapter  # noqa: E402


def test_moe_server_answers_like_predictor(tmp_path, glm4_tokenizer_dir):
    from glmtune import Predictor
    from glmtune.models.tiny import build_tiny_glm4_moe
    from glmtune.serve.app import create_app

    base = build_tiny_glm4_moe(tmp_path / "base", glm4_tokenizer_dir, lite=True, seed=1)
    adapter = moe_adapter(base, tmp_path / "experts")
    predictor = Predictor(base, adapter={"experts": adapter}, max_new_tokens=8)
    predictor.default_adapter = None
    with LiveServer(create_app(predictor, api_key=API_KEY, max_queue=8, timeout=60, model_name="flash")) as live:
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=API_KEY, max_retries=0)
        assert [m.id for m in client.models.list()] == ["flash", "experts"]
        for model, adapter_name in (("flash", None), ("experts", "experts")):
            for q in PROMPTS[:2]:
                r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                                   max_tokens=8)
                assert r.choices[0].message.content == predictor(q, adapter=adapter_name, max_new_tokens=8)
