"""Every glmtune command on the imported SmolLM2, as a user runs it (`python -m glmtune ...`):
export, predict (merged model and base + adapter), eval generate, chat (in a pseudo-terminal) and
serve (with the openai client). `glmtune train` itself runs once, in the `topic_run` fixture.

Answers are compared with a Predictor in this process: the commands must give exactly what the
library gives, and the fine-tuned model must answer held-out messages with topic names.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))
from server_wait import wait_healthy  # noqa: E402
from topic_task import accuracy, cli_env, free_port, glmtune, held_out_messages, normalise, read_jsonl

pytestmark = pytest.mark.real_model
pexpect = pytest.importorskip("pexpect")

TOPICS = {"trivia", "coding", "ai", "emotion", "psychology"}


def test_export_writes_a_model_folder(topic_merged, read_meta):
    from glmtune.models.folder import read_model_folder
    from glmtune.templates import get_template

    assert (topic_merged / "config.json").exists() and list(topic_merged.glob("*.safetensors"))
    assert not (topic_merged / "adapter_config.json").exists()
    assert read_meta(topic_merged)["template"] == "qwen"
    # the merged folder keeps the model's own chat template, so its default system prompt too
    assert get_template(**read_model_folder(topic_merged).template_args()).default_system.startswith("You are a helpful AI assistant named SmolLM")


def test_predict_and_eval_generate(topic_merged, topic_run, smollm2_dir, topic_split, tmp_path):
    test = topic_split["test"]
    merged, adapted = tmp_path / "merged.jsonl", tmp_path / "adapter.jsonl"
    glmtune("predict", "--model", topic_merged, "--data", topic_split["test_file"], "--out", merged,
            "--batch-size", 20, "--max-new-tokens", 8)
    glmtune("predict", "--model", smollm2_dir, "--adapter", topic_run["adapter"], "--data",
            topic_split["test_file"], "--out", adapted, "--batch-size", 20, "--max-new-tokens", 8)
    rows, rows_adapter = read_jsonl(merged), read_jsonl(adapted)
    assert [r["index"] for r in rows] == list(range(len(test)))
    assert [r["label"] for r in rows] == [r["label"] for r in test]
    assert [r["references"] for r in rows] == [[r["label"]] for r in test]
    answers = [r["prediction"] for r in rows]
    assert accuracy(answers, test) >= 0.6
    # merging the adapter into the weights changes float rounding only, not the greedy answers
    same = sum(a == b["prediction"] for a, b in zip(answers, rows_adapter))
    assert same >= 0.95 * len(test), (same, len(test))

    proc = glmtune("eval", "generate", "--data", merged, "--out", tmp_path / "eval", "--metrics", "bleu,rouge,ter")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n_samples"] == len(test) and metrics["tokenize"] == "13a"
    exact = sum(a.strip() == r["label"] for a, r in zip(answers, test)) / len(test)
    # one-word references: ROUGE-L F1 is 1 for an exact answer and 0 for another topic name
    assert metrics["rouge_l"] == pytest.approx(exact, abs=0.05)
    assert f"rouge_l={metrics['rouge_l']:.4f}" in proc.stdout


def spawn_chat(model_dir, *args):
    return pexpect.spawn(sys.executable, ["-m", "glmtune", "chat", "--model", str(model_dir), *args], env=cli_env(),
                         encoding="utf-8", timeout=180, dimensions=(40, 200))


def ask(child, question: str) -> str:
    """Send a line; the answer is everything between "glm> " and the next "you> " prompt."""
    child.sendline(question)
    child.expect_exact("glm> ")
    child.expect_exact("\r\nyou> ")
    return child.before.replace("\r\n", "\n")


def test_chat(topic_merged, topic_split):
    from glmtune import Predictor
    from glmtune.data.sample import TOPIC_SYSTEM

    predictor = Predictor(topic_merged, max_new_tokens=8)
    q1, q2 = held_out_messages(topic_split["test"], 2)
    child = spawn_chat(topic_merged, "--max-new-tokens", "8", "--system", TOPIC_SYSTEM)
    try:
        child.expect_exact("you> ")
        a1 = ask(child, q1)
        assert a1 == predictor(q1, system=TOPIC_SYSTEM)
        assert normalise(a1) in TOPICS, a1
        # the history is kept: the second answer is the one given after the first exchange
        assert ask(child, q2) == predictor(q2, history=[(q1, a1)], system=TOPIC_SYSTEM)
        child.sendline("/system")  # back to the model's default system prompt, history cleared
        child.expect_exact("system prompt cleared")
        child.expect_exact("you> ")
        assert ask(child, "Hello! Who are you?") == predictor("Hello! Who are you?")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_serve_base_and_adapter_with_openai_client(smollm2_dir, topic_run, topic_split):
    import openai

    from glmtune import Predictor
    from glmtune.data.sample import TOPIC_SYSTEM

    questions = held_out_messages(topic_split["test"], 5)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "glmtune", "serve", "--model", str(smollm2_dir), "--adapter",
                             f"topics={topic_run['adapter']}", "--port", str(port), "--max-tokens", "8"],
                            env={**cli_env(), "GLMTUNE_API_KEY": "k-real"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k-real", max_retries=0, timeout=120)
        assert {m.id for m in client.models.list().data} == {smollm2_dir.name, "topics"}

        def answer(model: str, q: str) -> str:
            msgs = [{"role": "system", "content": TOPIC_SYSTEM}, {"role": "user", "content": q}]
            return client.chat.completions.create(model=model, messages=msgs).choices[0].message.content

        tuned = [answer("topics", q) for q in questions]
        base = [answer(smollm2_dir.name, q) for q in questions]
        stream = client.chat.completions.create(model="topics", stream=True, messages=[
            {"role": "system", "content": TOPIC_SYSTEM}, {"role": "user", "content": questions[0]}])
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    predictor = Predictor(smollm2_dir, adapter={"topics": topic_run["adapter"]}, max_new_tokens=8)
    assert tuned == [predictor(q, system=TOPIC_SYSTEM, adapter="topics") for q in questions]
    assert base == [predictor(q, system=TOPIC_SYSTEM, adapter="base") for q in questions]
    assert streamed == tuned[0]
    assert all(normalise(a) in TOPICS for a in tuned), tuned
    assert tuned != base  # the request's model name switched the adapter on and off
    assert f"http://127.0.0.1:{port}/v1" in out


def test_train_without_template_uses_the_models_default_system(smollm2_dir, tmp_path):
    """No data.template and a conversation without a system message: training must see the system
    prompt the model's own chat template inserts (SmolLM2: "You are a helpful AI assistant named
    SmolLM, ..."), as inference does. Observed through the first step's loss, which LoRA (B = 0 at
    init) computes with the unchanged base model."""
    import torch

    from glmtune.io import write_jsonl_atomic
    from glmtune.models.loading import load_model
    from glmtune.models.tokenizer import load_tokenizer
    from glmtune.templates import get_template
    from glmtune.models.folder import read_model_folder
    from glmtune.train import run_training

    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "The capital of France is Paris."}]
    write_jsonl_atomic(tmp_path / "one.jsonl", [{"messages": messages}])
    result = run_training({"model": {"path": str(smollm2_dir), "dtype": "fp32"},
                           "data": {"datasets": [str(tmp_path / "one.jsonl")]},
                           "train": {"max_steps": 1, "batch_size": 1},
                           "output": {"dir": str(tmp_path / "run"), "plot": False, "tensorboard": False}})
    first_loss = result.metrics[0]["loss"]
    tok, model = load_tokenizer(smollm2_dir), load_model(smollm2_dir, dtype="float32").eval()

    def loss_with(template) -> float:
        enc = template.encode(tok, messages)
        labels = torch.tensor([enc.labels])
        with torch.no_grad():
            return float(model(input_ids=torch.tensor([enc.input_ids]), labels=labels).loss)

    with_default, without = loss_with(get_template(**read_model_folder(smollm2_dir).template_args())), loss_with(get_template("qwen"))
    assert with_default != pytest.approx(without, rel=1e-3)  # the system prompt does change the loss
    assert first_loss == pytest.approx(with_default, rel=1e-4), (first_loss, with_default, without)
