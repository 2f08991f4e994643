"""Alignment data: canonical records -> the pre-tokenized rows TRL trains on, with glmtune's template.

TRL never renders a prompt itself here: every id comes from `Template.encode_prompt` / `encode`, the
same code `glmtune train`, `glmtune data render --ids`, evaluation and serving use. A prompt's ids
are a prefix of the ids of the prompt plus an answer (templates guarantee it), so an answer's ids
are `Template.answer_ids`: the trained tokens after the prompt, with the end-of-turn token the model
must learn to stop with (the same ids evaluation scores a label by).

Rows per algorithm:
- dpo/orpo/simpo: {prompt_ids, chosen_ids, rejected_ids}    (TRL DataCollatorForPreference, or packed)
- kto: {prompt_ids, completion_ids, label}                  (TRL DataCollatorForUnpairedPreference)
- rm:  {chosen_ids, rejected_ids} = whole prompt+answer ids  (TRL reward collator)
- grpo/ppo: {prompt (rendered text), label?, references?, bad_answers?}; the prompt's ids are looked
  up by its text when TRL asks to tokenize it (glmtune.align.trainers).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from glmtune.errors import InputError


def _where(rec: dict) -> dict:
    meta = rec.get("meta") or {}
    return {"file": meta.get("source"), "line": meta.get("line")}


def prompt_of(rec: dict) -> list[dict]:
    """The conversation the policy answers: everything before the final assistant turn."""
    msgs = rec["messages"]
    return msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs


def answer_pairs(rec: dict) -> list[tuple[str, str]]:
    """(chosen, rejected) pairs of a record: its pair, or every gold answer x every bad answer."""
    if "chosen" in rec:
        return [(rec["chosen"], rec["rejected"])]
    if rec.get("references") and rec.get("bad_answers"):
        return [(g, b) for g in rec["references"] for b in rec["bad_answers"] if g.strip() != b.strip()]
    raise InputError("no preference pair: needs chosen/rejected, or gold_answers with bad_answers",
                     field="chosen", **_where(rec), fix="convert the data with `glmtune data convert`")


def _check_length(n: int, cutoff: int, policy: str, rec: dict) -> bool:
    """True to keep the row. truncate: TRL truncates to max_length=cutoff_len (prompt side kept)."""
    if n <= cutoff or policy == "truncate":
        return True
    if policy == "error":
        raise InputError(f"{n} tokens, more than data.cutoff_len={cutoff}", **_where(rec),
                         fix="raise data.cutoff_len or set data.on_overflow: truncate")
    return False


def preference_rows(records: list[dict], template, tokenizer, *, cutoff_len: int, on_overflow: str) -> list[dict]:
    """DPO rows {prompt_ids, chosen_ids, rejected_ids}."""
    rows = []
    for rec in records:
        prompt = prompt_of(rec)
        p_ids = template.encode_prompt(tokenizer, prompt, tools=rec.get("tools"))
        for chosen, rejected in answer_pairs(rec):
            c = template.answer_ids(tokenizer, prompt, chosen, rec.get("tools"), p_ids)
            r = template.answer_ids(tokenizer, prompt, rejected, rec.get("tools"), p_ids)
            if _check_length(len(p_ids) + max(len(c), len(r)), cutoff_len, on_overflow, rec):
                rows.append({"prompt_ids": p_ids, "chosen_ids": c, "rejected_ids": r})
    return rows


def answer_labels(rec: dict) -> list[tuple[str, bool]]:
    """(answer, desirable) of a record for KTO: its chosen and rejected answer, or every gold answer
    (desirable) and every bad answer (undesirable); the two sides need not be the same size."""
    if "chosen" in rec:
        return [(rec["chosen"], True), (rec["rejected"], False)]
    if rec.get("references") and rec.get("bad_answers"):
        return [(g, True) for g in rec["references"]] + [(b, False) for b in rec["bad_answers"]]
    raise InputError("no preference pair: needs chosen/rejected, or gold_answers with bad_answers",
                     field="chosen", **_where(rec), fix="convert the data with `glmtune data convert`")


def unpaired_rows(records: list[dict], template, tokenizer, *, cutoff_len: int, on_overflow: str,
                  seed: int = 0) -> list[dict]:
    """KTO rows {prompt_ids, completion_ids, label}, in a seeded shuffle: KTO's KL term pairs each row
    with its neighbour's answer, which should come from another prompt."""
    import random
    rows = []
    for rec in records:
        prompt = prompt_of(rec)
        p_ids = template.encode_prompt(tokenizer, prompt, tools=rec.get("tools"))
        for answer, good in answer_labels(rec):
            a = template.answer_ids(tokenizer, prompt, answer, rec.get("tools"), p_ids)
            if _check_length(len(p_ids) + len(a), cutoff_len, on_overflow, rec):
                rows.append({"prompt_ids": p_ids, "completion_ids": a, "label": good})
    random.Random(seed).shuffle(rows)
    return rows


def reward_model_rows(records: list[dict], template, tokenizer, *, cutoff_len: int, on_overflow: str) -> list[dict]:
    """Reward-model rows: each side is the whole conversation (prompt + answer) the RM scores."""
    return [{"chosen_ids": r["prompt_ids"] + r["chosen_ids"], "rejected_ids": r["prompt_ids"] + r["rejected_ids"]}
            for r in preference_rows(records, template, tokenizer, cutoff_len=cutoff_len, on_overflow=on_overflow)]


@dataclass
class PromptTable:
    """GRPO/PPO prompts: rows for TRL and what glmtune needs to tokenize and score them."""
    rows: list[dict]
    ids: dict[str, list[int]] = field(default_factory=dict)        # rendered prompt -> template ids
    messages: dict[str, list[dict]] = field(default_factory=dict)  # rendered prompt -> its conversation


def prompt_table(records: list[dict], template, tokenizer, *, cutoff_len: int, on_overflow: str,
                 table: PromptTable | None = None) -> PromptTable:
    """Rows {prompt, label, references, bad_answers} (every column in every row, so one Arrow schema)."""
    table = table or PromptTable([])
    for rec in records:
        prompt = prompt_of(rec)
        ids = template.encode_prompt(tokenizer, prompt, tools=rec.get("tools"))
        if not _check_length(len(ids), cutoff_len, on_overflow, rec):
            continue
        text = template.render(prompt, tools=rec.get("tools"), add_generation_prompt=True)
        table.ids[text], table.messages[text] = ids, prompt
        answer = rec["messages"][-1]["content"] if rec["messages"][-1]["role"] == "assistant" else None
        table.rows.append({"prompt": text, "label": None if rec.get("label") is None else str(rec["label"]),
                           "references": list(rec.get("references") or ([answer] if answer else [])),
                           "bad_answers": list(rec.get("bad_answers") or []),
                           "answer": answer})
    return table
