"""LoRA fine-tuning of the imported SmolLM2-135M on CPU, through `glmtune train CONFIG.yaml`, beats
the base model on held-out data: topic classification of real chatbot utterances (topic_task.py).

Measured on the held-out split, base vs fine-tuned (one Predictor, adapter on / off): exact-match
accuracy of the greedy answer, and the mean loss (NLL per token) of the reference answer.
"""
from __future__ import annotations

import json

import pytest
from topic_task import accuracy, read_jsonl

pytestmark = pytest.mark.real_model
torch = pytest.importorskip("torch")

STEPS = 46  # 2 epochs of 180 records, batch 8: ceil(180 / 8) = 23 per epoch


@torch.no_grad()
def answer_nll(model, tok, tpl, records: list[dict], batch_size: int = 20) -> float:
    """Mean NLL per trained token (the answer + <|im_end|>), right-padded batches."""
    nll, n_tok = 0.0, 0
    encs = [tpl.encode(tok, r["messages"]) for r in records]
    for start in range(0, len(encs), batch_size):
        chunk = encs[start:start + batch_size]
        width = max(len(e.input_ids) for e in chunk)
        ids = torch.tensor([e.input_ids + [tok.pad_token_id] * (width - len(e.input_ids)) for e in chunk])
        labels = torch.tensor([e.labels + [-100] * (width - len(e.labels)) for e in chunk])
        mask = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in chunk])
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100,
                                                       reduction="sum"))
        n_tok += int((labels[:, 1:] != -100).sum())
    return nll / n_tok


def score(predictor, records: list[dict], adapter: str) -> dict:
    prompts = [{"messages": r["messages"][:-1]} for r in records]
    answers = predictor.batch(prompts, adapter=adapter, batch_size=20, max_new_tokens=6)
    model = predictor.backend.model  # a PeftModel: disable_adapter() gives the base model
    if adapter == "base":
        with model.disable_adapter():
            loss = answer_nll(model, predictor.tokenizer, predictor.template, records)
    else:
        model.set_adapter(adapter)
        loss = answer_nll(model, predictor.tokenizer, predictor.template, records)
    return {"accuracy": accuracy(answers, records), "loss": loss}


def test_train_cli_run(topic_run, smollm2_dir):
    """The CLI run wrote what `glmtune train` promises, took its template from the model folder, learned."""
    run = topic_run["dir"]
    steps = [m for m in read_jsonl(run / "metrics.jsonl") if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, STEPS + 1))
    first, last = steps[0]["loss"], sum(m["loss"] for m in steps[-5:]) / 5
    assert last < 0.25 * first, (first, last)
    assert f"done: {STEPS} steps" in topic_run["output"]
    adapter = topic_run["adapter"]
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    meta = json.loads((adapter / "glmtune.json").read_text())
    assert meta["template"] == "qwen" and meta["method"] == "lora"
    assert meta["base_model"] == str(smollm2_dir.resolve())


def test_lora_finetune_beats_base_on_held_out(smollm2_dir, topic_split, topic_run):
    from glmtune import Predictor

    train, test = topic_split["train"], topic_split["test"]
    assert (len(train), len(test)) == (180, 60)
    assert not {r["messages"][1]["content"] for r in train} & {r["messages"][1]["content"] for r in test}
    predictor = Predictor(smollm2_dir, adapter={"topics": topic_run["adapter"]})
    before, after = score(predictor, test, "base"), score(predictor, test, "topics")
    figures = {"base": before, "lora": after, "train_records": len(train), "test_records": len(test),
               "steps": STEPS, "train_cli_seconds": round(topic_run["seconds"])}
    print("\nREAL_FINETUNE_RESULTS " + json.dumps(figures))
    assert after["accuracy"] >= before["accuracy"] + 0.3, figures
    assert after["accuracy"] >= 0.6, figures
    assert after["loss"] < 0.5 * before["loss"], figures
