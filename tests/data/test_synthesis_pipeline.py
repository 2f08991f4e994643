"""The whole path a user takes, through the CLI: crawl a (local) site -> synthesize QA with an LLM endpoint
-> split -> train 2 LoRA steps -> chat with the result."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_llm import FakeLLM, prompt_text  # noqa: E402
from local_site import LocalSite  # noqa: E402

import glmtune.cli.data  # noqa: E402,F401  (registers `data`)
import glmtune.cli.train  # noqa: E402,F401  (registers `train`)
from glmtune.cli.main import app  # noqa: E402

runner = CliRunner()


def grounded_pairs(messages: list[dict]) -> str:
    """Like a well-behaved LLM: one pair per sentence of the passage, the sentence as the answer."""
    passage = prompt_text(messages).split("Passage:\n", 1)[1]
    k = int(re.search(r"write (\d+) question", prompt_text(messages)).group(1))
    sentences = [s.strip() for s in re.split(r"(?<=\.)\s+", passage) if len(s.split()) > 5][:k]
    return json.dumps([{"question": f"Tell me: {' '.join(s.split()[:6])}?", "answer": s} for s in sentences])


def invoke(*args) -> str:
    res = runner.invoke(app, [str(a) for a in args])
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    assert res.exit_code == 0, res.output
    return res.output


def test_crawl_synthesize_split_train_chat(tmp_path, trained_glm4_dir):
    from glmtune import Predictor

    with LocalSite() as site:
        invoke("data", "crawl", site.url, "--out", tmp_path / "pages", "--delay", "0", "--max-bytes", 100_000)
    with FakeLLM(grounded_pairs) as llm:
        out = invoke("data", "synthesize", tmp_path / "pages", "--out", tmp_path / "qa.jsonl", "--llm", llm.url,
                     "--lang", "en", "--per-chunk", "3")
    qa = [json.loads(x) for x in (tmp_path / "qa.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(qa) == 8 and "pairs kept" in out        # 2 + 3 + 3 sentences on the three pages
    invoke("data", "split", tmp_path / "qa.jsonl", "--ratios", "8:1:1", "--out-dir", tmp_path / "split")

    cfg = {"model": {"path": str(trained_glm4_dir), "dtype": "fp32"},
           "data": {"datasets": [str(tmp_path / "split" / "train.jsonl")], "cutoff_len": 96},
           "method": {"name": "lora", "r": 4, "alpha": 8},
           "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-4, "scheduler": "constant", "seed": 0},
           "output": {"dir": str(tmp_path / "run"), "plot": False, "tensorboard": False}}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    invoke("train", tmp_path / "train.yaml")
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").exists()

    chat = Predictor(trained_glm4_dir, adapter=tmp_path / "run" / "final", max_new_tokens=24)
    # two small steps leave the model's own answers intact, and a synthesized question gets an answer too
    assert chat("What is the capital of France?") == "The capital of France is Paris."
    assert isinstance(chat(qa[0]["messages"][0]["content"]), str)
