"""`glmtune data augment`: paraphrase records of rare classes with an LLM until each has ``min_per_class``.

For classification data (a ``label`` per record, e.g. CMCC-34 intents): the last user turn (the text
the label is about) is paraphrased; system prompt, other turns, the assistant's answer and the label
are copied unchanged. Paraphrases are asked for in rounds (sources taken round-robin in a seeded
order, several versions per request, prompts in glmtune/resources/prompts/augment_paraphrase.*.txt);
a version is dropped when it is empty, not a string, or too close to its source, to another record of
its class or to another version (:func:`glmtune.data.dedupe.dedupe_records` at ``too_close``).

Augmented records carry ``meta.augmented = true`` (and ``augmented_from``, ``model``);
:func:`glmtune.data.split.split_records` keeps them in train, so a paraphrase of a dev/test
record can never leak into evaluation.
"""
from __future__ import annotations

import copy
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from glmtune.synth.prompting import as_llm, ask_json_lists, fill_prompt, load_prompt
from glmtune.data.split import label_of
from glmtune.errors import InputError
from glmtune.io import write_jsonl_atomic


@dataclass
class AugmentSummary:
    out: Path
    before: dict[str, int] = field(default_factory=dict)   # label -> records in the input
    after: dict[str, int] = field(default_factory=dict)    # label -> records written
    augmented: int = 0
    requests: int = 0
    dropped: Counter = field(default_factory=Counter)      # invalid_json (requests), malformed, too_close, ...
    short: dict[str, int] = field(default_factory=dict)    # labels still under min_per_class after every round

    def as_dict(self) -> dict:
        return {"out": str(self.out), "augmented": self.augmented, "requests": self.requests,
                "dropped": dict(self.dropped), "short": self.short}


def augment_classes(in_path: str | Path, out_path: str | Path, *, min_per_class: int, llm, model: str | None = None,
                    lang: str = "zh", label_field: str = "label", per_request: int = 3, max_rounds: int = 4,
                    too_close: float = 0.8, prompt: str | Path | None = None, retries: int = 1,
                    batch_size: int = 8, temperature: float = 0.7, max_tokens: int = 512, seed: int = 0,
                    progress: Callable[[int, int], None] | None = None) -> AugmentSummary:
    """Write the input plus paraphrases so every class has at least ``min_per_class`` records.

    ``llm``: an OpenAI-compatible base URL, a local model folder or a client (:mod:`glmtune.infer.llm`).
    ``progress(round, max_rounds)`` is called after each round. Classes that still fall short after
    ``max_rounds`` are reported in ``summary.short``, never an error.
    """
    from glmtune.data.registry import load_dataset

    if min_per_class < 1 or per_request < 1 or max_rounds < 1:
        raise InputError("min_per_class, per_request and max_rounds must be at least 1", field="min_per_class")
    out = Path(out_path)
    records = load_dataset(in_path)
    classes = _by_class(records, label_field, in_path)
    summary = AugmentSummary(out, before={k: len(v) for k, v in classes.items()})
    template = load_prompt("augment_paraphrase", lang, prompt)
    client = as_llm(llm, model, batch_size=batch_size, max_tokens=max_tokens, temperature=temperature)
    rng = random.Random(seed)
    order = {k: rng.sample(v, len(v)) for k, v in classes.items()}
    added: dict[str, list[dict]] = {k: [] for k in classes}
    cursor: Counter = Counter()   # per class: how many sources were asked about so far (round-robin)
    for round_no in range(max_rounds):
        requests = []
        for k in classes:
            need = min_per_class - len(classes[k]) - len(added[k])
            picked = _requests(order[k], need, per_request, cursor[k])
            cursor[k] += len(picked)
            requests += [(k, src, n) for src, n in picked]
        if not requests:
            break
        convs = [[{"role": "user", "content": fill_prompt(template, prompt, text=_last_user(src)["content"], k=n)}]
                 for _, src, n in requests]
        asked = ask_json_lists(client, convs, retries=retries, lang=lang)
        for (k, src, _), result in zip(requests, asked):
            summary.requests += len(result.replies)
            if result.items is None:
                summary.dropped[result.error.split(":")[0]] += 1
                continue
            for text in result.items:
                if not isinstance(text, str) or not text.strip():
                    summary.dropped["malformed"] += 1
                    continue
                added[k].append(_paraphrased(src, text.strip(), client.name))
        for k in classes:
            kept = _drop_too_close(classes[k], added[k], too_close, summary)
            room = max(0, min_per_class - len(classes[k]))
            if len(kept) > room:  # a model that wrote more versions than asked
                summary.dropped["surplus"] += len(kept) - room
            added[k] = kept[:room]
        if progress:
            progress(round_no + 1, max_rounds)
    result = records + [r for k in classes for r in added[k]]
    write_jsonl_atomic(out, result)
    summary.augmented = sum(len(v) for v in added.values())
    summary.after = {k: len(classes[k]) + len(added[k]) for k in classes}
    summary.short = {k: n for k, n in summary.after.items() if n < min_per_class}
    return summary


def _by_class(records: list[dict], label_field: str, source) -> dict[str, list[dict]]:
    classes: dict[str, list[dict]] = {}
    for i, rec in enumerate(records):
        label = label_of(rec, label_field)
        if label is None:
            meta = rec.get("meta") or {}
            raise InputError(f"record has no '{label_field}' to augment by", file=meta.get("source", source),
                             line=meta.get("line", i + 1), field=label_field,
                             fix="augment needs classification data (a label per record), or pass --label-field")
        if not any(m["role"] == "user" for m in rec["messages"]):
            raise InputError("record has no user turn to paraphrase", file=source, line=i + 1, field="messages")
        classes.setdefault(str(label), []).append(rec)
    return classes


def _requests(sources: list[dict], need: int, per_request: int, start: int) -> list[tuple[dict, int]]:
    """(source, versions to ask for) pairs covering ``need``, sources taken round-robin from ``start``
    so that a later round paraphrases other records than the one before."""
    out = []
    while need > 0:
        n = min(per_request, need)
        out.append((sources[(start + len(out)) % len(sources)], n))
        need -= n
    return out


def _last_user(rec: dict) -> dict:
    return next(m for m in reversed(rec["messages"]) if m["role"] == "user")


def _paraphrased(src: dict, text: str, model: str) -> dict:
    rec = copy.deepcopy(src)
    _last_user(rec)["content"] = text
    meta = src.get("meta") or {}
    rec["meta"] = {**meta, "augmented": True, "model": model,
                   "augmented_from": {k: meta[k] for k in ("source", "line") if k in meta}}
    return rec


def _drop_too_close(originals: list[dict], added: list[dict], threshold: float, summary: AugmentSummary) -> list[dict]:
    """Keep the added records that are not near duplicates of an original, an earlier addition or each other."""
    from glmtune.data.dedupe import dedupe_records

    # Compare only the paraphrased turn: the shared system prompt and answer would make every pair look alike.
    proxies = [{"messages": [_last_user(r)], "meta": {"index": i}} for i, r in enumerate(originals + added)]
    kept, _ = dedupe_records(proxies, near=True, threshold=threshold)
    keep = {p["meta"]["index"] - len(originals) for p in kept if p["meta"]["index"] >= len(originals)}
    if len(keep) < len(added):
        summary.dropped["too_close"] += len(added) - len(keep)
    return [r for i, r in enumerate(added) if i in keep]
