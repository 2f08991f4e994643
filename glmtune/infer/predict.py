"""Batch prediction over a dataset of canonical records, resumable.

Each record's conversation up to its last assistant turn is the prompt; that assistant turn is the
reference. Output rows ``{"index", "prompt", "prediction", "references"[, "label"]}`` are what
``glmtune eval generate`` scores. ``index`` is the record's position among the file's records.

Resuming: rows already in ``out`` are skipped. Rows are appended and flushed (fsync) one batch at a
time, so a kill loses at most the batch in flight; a half-written last line (killed mid-write) is
cut off before appending.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from glmtune.data.records import content_text
from glmtune.errors import InputError


@dataclass
class Example:
    index: int
    messages: list[dict]  # the prompt conversation (ends with a user or tool turn)
    references: list[str]
    tools: list | None = None
    label: object = None
    line: int | None = None  # where the record sits in its file, for error messages


def load_examples(data: str | Path) -> list[Example]:
    from glmtune.data.records import validate_record
    from glmtune.io import iter_jsonl

    examples = []
    for index, (line, rec) in enumerate(iter_jsonl(data)):
        validate_record(rec, file=data, line=line, require_assistant=False)
        messages = rec["messages"]
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is not None and last == len(messages) - 1:
            prompt, refs = messages[:last], [messages[last]["content"]]
        else:
            prompt, refs = messages, []  # nothing to compare against: predict only
        if not any(m["role"] == "user" for m in prompt):
            raise InputError("no user turn before the answer", file=data, line=line, field="messages")
        examples.append(Example(index, prompt, refs, rec.get("tools"), rec.get("label"), line))
    return examples


def done_indexes(out: str | Path) -> set[int]:
    """Indexes already written; repairs a last line cut off by a kill (the only line that can be)."""
    out = Path(out)
    if not out.exists():
        return set()
    raw = out.read_bytes()
    keep = raw.rfind(b"\n") + 1 if not raw.endswith(b"\n") else len(raw)
    if keep != len(raw):
        with open(out, "r+b") as f:
            f.truncate(keep)
    done = set()
    for lineno, line in enumerate(raw[:keep].decode("utf-8").splitlines(), start=1):
        if line.strip():
            try:
                done.add(int(json.loads(line)["index"]))
            except (ValueError, KeyError, TypeError):
                raise InputError("not a glmtune predictions row", file=out, line=lineno,
                                 fix="use a new --out file, or delete this one to start over") from None
    return done


def predict_file(predictor, data: str | Path, out: str | Path, batch_size: int = 8,
                 adapter: str | None = None, on_progress: Callable[[int, int], None] | None = None,
                 **gen) -> dict:
    """Predict every record of ``data`` not yet in ``out``; returns counts."""
    examples = load_examples(data)
    done = done_indexes(out)
    todo = [ex for ex in examples if ex.index not in done]
    for ex in todo:  # before any generation: an image for a text-only model names its record
        predictor.check_images(ex.messages, file=data, line=ex.line)
    if on_progress:
        on_progress(len(examples) - len(todo), len(examples))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as f:
        for batch in _batches(todo, batch_size):
            answers = predictor.batch([{"messages": ex.messages, "tools": ex.tools} for ex in batch],
                                      adapter=adapter,
                                      batch_size=batch_size, **gen)
            f.write("".join(json.dumps(_row(ex, a), ensure_ascii=False) + "\n" for ex, a in zip(batch, answers)))
            f.flush()
            os.fsync(f.fileno())
            done.update(ex.index for ex in batch)
            if on_progress:
                on_progress(len(done & {ex.index for ex in examples}), len(examples))
    return {"total": len(examples), "skipped": len(examples) - len(todo), "written": len(todo)}


def _row(ex: Example, prediction: str) -> dict:
    # The question's text (pictures, possibly whole data: URIs, stay in the data file).
    user = [content_text(m["content"]) for m in ex.messages if m["role"] == "user"]
    row = {"index": ex.index, "prompt": user[-1], "prediction": prediction, "references": ex.references}
    if ex.label is not None:
        row["label"] = ex.label
    return row


def _batches(items: list, size: int) -> Iterator[list]:
    if size < 1:
        raise InputError("batch size must be at least 1", field="batch_size")
    for i in range(0, len(items), size):
        yield items[i:i + size]
