"""See what the model sees: one record's exact text, its token ids and which tokens are trained."""
from __future__ import annotations

from dataclasses import dataclass

from glmtune.templates import IGNORE_INDEX


@dataclass
class RenderView:
    text: str                          # the exact rendered text (the official chat template's output)
    ids: list[int]                     # training ids (encode, incl. the final end token) or prompt ids
    spans: list[tuple[str, bool]]      # decoded runs of tokens, (text, trained)


def prompt_messages(messages: list[dict]) -> list[dict]:
    """The conversation up to the last assistant turn: what inference sees before answering it."""
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1]
    return messages


def render_record(record: dict, template, tokenizer, *, add_generation_prompt: bool = False,
                  train_on: str = "all_assistant") -> RenderView:
    """Render ``record`` under ``template``; with ``add_generation_prompt`` the last answer is
    removed and the prompt for it is rendered, exactly as inference builds it."""
    tools = record.get("tools")
    if add_generation_prompt:
        msgs = prompt_messages(record["messages"])
        ids = template.encode_prompt(tokenizer, msgs, tools=tools)
        text = template.render(msgs, tools=tools, add_generation_prompt=True)
        return RenderView(text, ids, [(_decode(tokenizer, ids), False)] if ids else [])
    enc = template.encode(tokenizer, record["messages"], tools=tools, train_on=train_on)
    text = template.render(record["messages"], tools=tools)
    return RenderView(text, list(enc.input_ids), trained_runs(tokenizer, enc.input_ids, enc.labels))


def trained_runs(tokenizer, input_ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """Decode maximal runs of equally-trained tokens, so each run shows as one marked stretch."""
    runs: list[tuple[str, bool]] = []
    start = 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or (labels[i] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            runs.append((_decode(tokenizer, input_ids[start:i]), labels[start] != IGNORE_INDEX))
            start = i
    return runs


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def bracketed(spans: list[tuple[str, bool]]) -> str:
    """Colour-free marking: trained text inside [[...]]."""
    return "".join(f"[[{text}]]" if trained else text for text, trained in spans)
