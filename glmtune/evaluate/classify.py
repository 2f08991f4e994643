"""Model-driven classification: constrained label scoring (never invalid) or greedy generate + parse.

    constrained  each label's answer (exactly the tokens training taught: metadata line, text, end
                 token) is scored after the prompt; softmax over the label log-likelihoods gives a
                 probability per label and the argmax is the prediction, so it is always a label.
    generate     greedy decoding with the template's stop ids, then parsing (exact answer text, else
                 CMCC ``parse_intent``); unparseable answers are counted as invalid.

Results go through :func:`glmtune.evaluate.classification.classification_report_files`.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from glmtune.errors import InputError
from glmtune.templates.base import IGNORE_INDEX, _segment_ids

MODES = ("constrained", "generate")
SIDES = ("left", "right")


@dataclass
class LabelSet:
    """Label names (report order), the raw data label -> name map, and each label's answer text."""
    names: list[str]
    answers: dict[str, str]
    raw_to_name: dict[str, str] = field(default_factory=dict)

    def name_of(self, raw: Any) -> str | None:
        return self.raw_to_name.get(str(raw), str(raw) if str(raw) in self.answers else None)


# -- data ------------------------------------------------------------------------------------------
def load_records(path: str | Path) -> list[dict]:
    from glmtune.io import iter_jsonl
    recs = []
    for line, row in iter_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("messages"), list) or "label" not in row:
            raise InputError("each row needs 'messages' and 'label'", file=path, line=line,
                             fix="convert the data with `glmtune data convert` (classification/cmcc formats)")
        if not row["messages"] or row["messages"][-1].get("role") != "assistant":
            raise InputError("the last message must be the assistant's answer", file=path, line=line)
        recs.append(row)
    if not recs:
        raise InputError("no records in the test file", file=path)
    return recs


def build_label_set(records: Sequence[dict], labels_file: str | Path | None = None) -> LabelSet:
    """Names from ``labels_file`` (list or id->name mapping) else the data's distinct labels (sorted);
    answer text per label from the data's last assistant messages (CMCC names fall back to cmcc_answer)."""
    from glmtune.data.cmcc import CMCC_INTENTS, cmcc_answer
    raw_to_name: dict[str, str] = {}
    if labels_file is not None:
        from glmtune.data.labels import load_label_map
        raw_to_name = load_label_map(labels_file)
        names = list(dict.fromkeys(raw_to_name.values()))
    else:
        raw = sorted({str(r["label"]) for r in records}, key=lambda s: (not s.lstrip("-").isdigit(),
                                                                         int(s) if s.lstrip("-").isdigit() else 0, s))
        names = raw
    answers: dict[str, str] = {}
    for rec in records:
        raw = str(rec["label"])
        name = raw_to_name.get(raw, raw)
        if name not in names:
            raise InputError(f"label {raw!r} of a test record is not in the label list",
                             fix="add it to --labels or fix the data")
        text = rec["messages"][-1].get("content") or ""
        prev = answers.setdefault(name, text)
        if prev != text:
            raise InputError(f"label {name!r} has two different answer texts: {prev!r} and {text!r}",
                             fix="one answer text per label is needed to score labels")
    name_to_cmcc = {v: k for k, v in CMCC_INTENTS.items()}
    for name in names:
        if name not in answers:
            if name in name_to_cmcc:
                answers[name] = cmcc_answer(name_to_cmcc[name])
            elif name.isdigit() and int(name) in CMCC_INTENTS:
                answers[name] = cmcc_answer(int(name))
            else:
                answers[name] = name
    if len(set(answers[n] for n in names)) != len(names):
        raise InputError("two labels share the same answer text", fix="make each label's answer distinct")
    return LabelSet(names, answers, raw_to_name)


def quick_subset(records: list[dict], n: int, seed: int = 0) -> list[dict]:
    """n records stratified by label (sklearn), falling back to a random sample."""
    if n <= 0 or n >= len(records):
        return list(records)
    idx = list(range(len(records)))
    try:
        from sklearn.model_selection import train_test_split
        keep, _ = train_test_split(idx, train_size=n, random_state=seed,
                                   stratify=[str(r["label"]) for r in records])
    except ValueError:  # a class too small to stratify
        keep = random.Random(seed).sample(idx, n)
    return [records[i] for i in sorted(keep)]


# -- prompts ---------------------------------------------------------------------------------------
def truncate_prompt(tpl, tokenizer, messages: list[dict], ids: list[int], max_len: int | None,
                    side: str = "left") -> tuple[list[int], bool]:
    """Cut a prompt to ``max_len`` ids, keeping the template's leading prefix ([gMASK]<sop>) and the
    final generation header; ``left`` drops dialogue from the start (keeps the end), ``right`` the end."""
    if not max_len or len(ids) <= max_len:
        return ids, False
    segs = tpl.segments(tpl._checked(messages, None), None, True, False)
    head = 0
    for s in segs:
        if s.turn != -1 or not s.special:
            break
        head += len(_segment_ids(tokenizer, s))
    tail = len(_segment_ids(tokenizer, segs[-1])) if segs else 0
    keep = max_len - head - tail
    if keep <= 0:
        raise InputError(f"--max-len {max_len} is shorter than the template's fixed tokens",
                         field="--max-len")
    body = ids[head:len(ids) - tail]
    body = body[-keep:] if side == "left" else body[:keep]
    return ids[:head] + body + ids[len(ids) - tail:], True


def answer_ids(tpl, tokenizer, prompt_msgs: list[dict], prompt_ids: list[int], answer: str) -> list[int]:
    """The trained ids of ``answer`` as the last assistant turn (metadata line and end token included)."""
    enc = tpl.encode(tokenizer, prompt_msgs + [{"role": "assistant", "content": answer}], train_on="last_assistant")
    spans = enc.trained_spans()
    if not spans:
        raise InputError("the template trains no tokens of the answer", field="template")
    start, end = spans[-1]
    if enc.input_ids[:start] != prompt_ids:
        raise InputError("the generation prompt is not a prefix of the training ids", field="template")
    return [t for t in enc.labels[start:end] if t != IGNORE_INDEX]


# -- scoring ---------------------------------------------------------------------------------------
def _label_logprobs(model, device, prompts: list[list[int]], answers: list[list[int]], pad_id: int):
    """(len(prompts), len(answers)) sum of log p(answer | prompt), one padded forward for all pairs."""
    import torch
    rows = [(p, a) for p in prompts for a in answers]
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    pos_r, pos_t, targets = [], [], []
    for r, (p, a) in enumerate(rows):
        seq = p + a
        ids[r, :len(seq)] = torch.tensor(seq)
        mask[r, :len(seq)] = 1
        for j, tok in enumerate(a):
            pos_r.append(r)
            pos_t.append(len(p) + j - 1)  # the position whose logits predict answer token j
            targets.append(tok)
    ids, mask = ids.to(device), mask.to(device)
    pos_r_t, pos_t_t = torch.tensor(pos_r, device=device), torch.tensor(pos_t, device=device)
    try:  # hidden states, then the LM head only where an answer token is predicted (vocab is 151k)
        decoder, head = model.get_decoder(), model.get_output_embeddings()
        hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = head(hidden[pos_r_t, pos_t_t]).float()
    except (AttributeError, NotImplementedError, TypeError):
        logits = model(input_ids=ids, attention_mask=mask).logits[pos_r_t, pos_t_t].float()
    lp = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(targets, device=device)[:, None])[:, 0]
    per_row = torch.zeros(len(rows), device=device).index_add_(0, pos_r_t, lp)
    return per_row.view(len(prompts), len(answers)).cpu()


def _batched(fn, items: list, batch_size: int, on_progress=None) -> list:
    """Run ``fn`` over ``items`` in batches; on CUDA out-of-memory halve the batch and retry."""
    import torch
    out, start, bs = [], 0, max(1, batch_size)
    while start < len(items):
        try:
            out += fn(items[start:start + bs])
        except torch.OutOfMemoryError:
            if bs == 1:
                raise
            bs = max(1, bs // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        start += bs
    return out


@dataclass
class ClassifyResult:
    y_true: list[str]
    y_pred: list[Any]
    probs: Any
    raw_outputs: list[str] | None
    truncated: int
    seconds: float
    labels: list[str]


def classify(predictor, records: Sequence[dict], label_set: LabelSet, mode: str = "constrained",
             batch_size: int = 8, max_len: int | None = None, truncate_side: str = "left") -> ClassifyResult:
    """Predict a label for every record with a loaded :class:`glmtune.infer.Predictor`."""
    import numpy as np
    import torch
    if mode not in MODES:
        raise InputError(f"unknown mode '{mode}'", field="--mode", fix="use constrained or generate")
    if truncate_side not in SIDES:
        raise InputError(f"unknown side '{truncate_side}'", field="--truncate-side", fix="use left or right")
    tok, tpl = predictor.tokenizer, predictor.template
    names = label_set.names
    y_true, prompts, prompt_msgs = [], [], []
    n_trunc = 0
    for rec in records:
        name = label_set.name_of(rec["label"])
        if name is None:
            raise InputError(f"label {rec['label']!r} is not in the label list")
        y_true.append(name)
        msgs = list(rec["messages"][:-1])
        full = tpl.encode_prompt(tok, msgs)
        prompt_msgs.append((msgs, full))
    # Answer ids depend only on the template, not on the prompt: compute once from the first record.
    msgs0, full0 = prompt_msgs[0]
    ans = [answer_ids(tpl, tok, msgs0, full0, label_set.answers[n]) for n in names]
    room = max(len(a) for a in ans)
    for msgs, full in prompt_msgs:
        budget = None if not max_len else max(1, max_len - (room if mode == "constrained" else 0))
        ids, cut = truncate_prompt(tpl, tok, msgs, full, budget, truncate_side)
        n_trunc += cut
        prompts.append(ids)

    backend = predictor.backend
    model, device = backend.model, backend.device
    pad = backend._pad_id(predictor.stop_ids)
    t0 = time.perf_counter()
    raw_outputs = None
    if mode == "constrained":
        def run(batch):
            with torch.inference_mode(), backend._adapter_scope(predictor.default_adapter):
                return list(_label_logprobs(model, device, batch, ans, pad))
        scores = torch.stack(_batched(run, prompts, batch_size)).double()
        probs = torch.softmax(scores, dim=-1).numpy()
        y_pred = [names[i] for i in probs.argmax(axis=1)]
    else:
        from glmtune.infer.backends import GenConfig
        gen = GenConfig.from_kwargs(max_new_tokens=room + 8)
        by_answer = {label_set.answers[n].strip(): n for n in names}

        def run(batch):
            outs = backend.generate(batch, predictor.default_adapter, predictor.stop_ids, gen)
            return [predictor.decode(o.token_ids).strip() for o in outs]
        raw_outputs = _batched(run, prompts, batch_size)
        y_pred = [parse_label(text, by_answer, names) for text in raw_outputs]
        probs = None
    seconds = time.perf_counter() - t0
    return ClassifyResult(y_true, y_pred, probs if probs is None else np.asarray(probs), raw_outputs,
                          n_trunc, seconds, names)


def parse_label(text: str, by_answer: dict[str, str], names: Sequence[str]) -> str | None:
    """Exact answer text, else the CMCC intent id in it (``意图：7：...``), else the bare label name."""
    from glmtune.data.cmcc import CMCC_INTENTS, cmcc_answer, parse_intent
    text = text.strip()
    if text in by_answer:
        return by_answer[text]
    intent = parse_intent(text)
    if intent is not None:
        answer = cmcc_answer(intent)
        if answer in by_answer:
            return by_answer[answer]
        for cand in (str(intent), CMCC_INTENTS[intent]):
            if cand in names:
                return cand
    return text if text in names else None


def classify_report(model: str | Path, data: str | Path, out: str | Path, *, adapter: str | Path | None = None,
                    labels: str | Path | None = None, quick: int | None = None, batch_size: int = 8,
                    mode: str = "constrained", truncate_side: str = "left", max_len: int | None = None,
                    predictor=None, seed: int = 0) -> dict:
    """Load, classify, write the report folder; return metrics (what `glmtune eval classify` runs)."""
    from glmtune.evaluate.classification import classification_report_files
    records = load_records(data)
    label_set = build_label_set(records, labels)
    if quick:
        records = quick_subset(records, quick, seed)
    if predictor is None:
        from glmtune.infer.predictor import Predictor
        predictor = Predictor(model, adapter=adapter)
    res = classify(predictor, records, label_set, mode, batch_size, max_len, truncate_side)
    extra = {"mode": mode, "samples_per_s": len(records) / res.seconds if res.seconds > 0 else None,
             "truncated": res.truncated, "truncate_side": truncate_side, "max_len": max_len,
             "model": str(model), "adapter": str(adapter) if adapter else None, "data": str(data)}
    samples = [{"id": r.get("id", i)} for i, r in enumerate(records)]
    return classification_report_files(res.y_true, res.y_pred, label_set.names, out, probs=res.probs,
                                       extra=extra, samples=samples, raw_outputs=res.raw_outputs,
                                       title=f"Classification ({mode})")
