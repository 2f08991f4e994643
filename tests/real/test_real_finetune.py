"""LoRA fine-tuning of the imported SmolLM2-135M on CPU, through `run_training`, beats the base model
on held-out data: topic classification of real chatbot utterances (chatterbot-corpus, English).

Task: given a user message from the corpus, answer its topic, one of TOPICS (the corpus file it
comes from). The split is stratified and seeded; the test messages never appear in training.
Measured on the held-out split, base vs fine-tuned: exact-match accuracy of the greedy answer, and
the mean loss (NLL per token) of the reference answer.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.real_model
torch = pytest.importorskip("torch")

# The five English files with >= 48 distinct opening messages (tech_support.yml repeats 10 of them).
TOPICS = {"trivia.yml": "trivia", "coding.yml": "coding", "ai.yml": "ai", "emotion.yml": "emotion",
          "psychology.yml": "psychology"}
PER_TOPIC, TEST_PER_TOPIC = 48, 12  # emotion.yml has 48: balanced classes, 180 train / 60 test items
SYSTEM = ("Classify the topic of the user's message. Answer with exactly one of: "
          + ", ".join(TOPICS.values()) + ".")


def corpus_records() -> tuple[list[dict], list[dict]]:
    """Stratified, seeded train/test split of (first user message -> topic) records."""
    import importlib.util

    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None:
        pytest.skip("chatterbot-corpus is not installed (pip install chatterbot-corpus)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "english"
    rng = random.Random(0)
    train, test = [], []
    for fname, topic in TOPICS.items():
        convs = yaml.safe_load((folder / fname).read_text(encoding="utf-8"))["conversations"]
        texts = sorted({str(c[0]).strip() for c in convs if c and str(c[0]).strip()})
        rng.shuffle(texts)
        recs = [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": t},
                              {"role": "assistant", "content": topic}], "label": topic}
                for t in texts[:PER_TOPIC]]
        test += recs[:TEST_PER_TOPIC]
        train += recs[TEST_PER_TOPIC:]
    rng.shuffle(train)
    return train, test


def normalise(text: str) -> str:
    return text.strip().strip(".!\"'").strip().lower()


@torch.no_grad()
def score(model, tok, tpl, records: list[dict]) -> dict:
    """Greedy exact-match accuracy and mean per-token NLL of the reference answer (+ <|im_end|>)."""
    stops = tpl.stop_token_ids(tok)
    correct, nll, n_tok = 0, 0.0, 0
    for rec in records:
        enc = tpl.encode(tok, rec["messages"])
        ids, labels = torch.tensor([enc.input_ids]), torch.tensor([enc.labels])
        logits = model(input_ids=ids).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100,
                                                 reduction="sum")
        nll, n_tok = nll + float(loss), n_tok + int((labels[:, 1:] != -100).sum())
        prompt = torch.tensor([tpl.encode_prompt(tok, rec["messages"][:-1])])
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                             do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id)
        answer = tok.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)
        correct += normalise(answer) == rec["label"]
    return {"accuracy": correct / len(records), "loss": nll / n_tok}


def test_lora_finetune_beats_base_on_held_out(smollm2_dir, tmp_path):
    from glmtune.io import write_jsonl_atomic
    from glmtune.models.loading import load_model
    from glmtune.models.tokenizer import load_tokenizer
    from glmtune.templates import template_for_model
    from glmtune.train.loop import run_training

    train, test = corpus_records()
    assert (len(train), len(test)) == (180, 60)
    assert not {r["messages"][1]["content"] for r in train} & {r["messages"][1]["content"] for r in test}
    write_jsonl_atomic(tmp_path / "train.jsonl", train)
    tok, tpl = load_tokenizer(smollm2_dir), template_for_model(smollm2_dir)

    base = load_model(smollm2_dir, dtype="float32").eval()
    t0 = time.time()
    before = score(base, tok, tpl, test)
    del base

    # lr 1e-3: LoRA on a 135M model with 45 steps needs a large step size; r=8 on all projections.
    config = {"model": {"path": str(smollm2_dir), "dtype": "fp32"},
              "data": {"datasets": [str(tmp_path / "train.jsonl")], "cutoff_len": 128},
              "method": {"name": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"},
              "train": {"epochs": 2, "batch_size": 8, "lr": 1e-3, "warmup_ratio": 0.1, "seed": 0},
              "output": {"dir": str(tmp_path / "run"), "plot": False, "tensorboard": False}}
    t1 = time.time()
    result = run_training(config, return_model=True)
    train_s = time.time() - t1
    after = score(result.model, tok, tpl, test)
    figures = {"base": before, "lora": after, "train_records": len(train), "test_records": len(test),
               "steps": result.steps, "final_train_loss": result.final_loss, "train_seconds": round(train_s),
               "total_seconds": round(time.time() - t0)}
    print("\nREAL_FINETUNE_RESULTS " + json.dumps(figures))
    assert (result.adapter_path / "adapter_config.json").exists()
    assert after["accuracy"] >= before["accuracy"] + 0.3, figures
    assert after["accuracy"] >= 0.6, figures
    assert after["loss"] < 0.5 * before["loss"], figures
