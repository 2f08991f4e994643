"""Model-driven classification: constrained label scoring (never invalid) or greedy generate + parse.

    constrained  every label's answer (the tokens training taught) is scored after the prompt in one
                 forward (glmtune.evaluate.label_scoring); the prediction walks the label trie, so it
                 is always a label; softmax over the label log-likelihoods gives a probability each.
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

MODES = ("constrained", "generate")
SIDES = ("left", "right")
DECISIONS = ("greedy", "likelihood")
SCORINGS = ("decisive", "full")


@dataclass
class LabelSet:
    """Label names (report order), the raw data label -> name map, and each label's answer text."""
    names: list[str]
    answers: dict[str, str]
    raw_to_name: dict[str, str] = field(default_factory=dict)

    def name_of(self, raw: Any) -> str | None:
        return self.raw_to_name.get(str(raw), str(raw) if str(raw) in self.answers else None)


# -- data ------------------------------------------------------------------------------------------
def labelled_records(records: Sequence[dict]) -> list[dict]:
    """``records`` (read with glmtune.data.registry.load_dataset, as every command reads data), checked for
    what classification needs: a label, and a last message that is the assistant's answer (the label's text)."""
    for rec in records:
        meta = rec.get("meta") or {}
        where = {"file": meta.get("source"), "line": meta.get("line")}
        if rec.get("label") is None:
            raise InputError("the record has no label", field="label", **where,
                             fix="convert the data with `glmtune data convert` (classification/cmcc formats)")
        if rec["messages"][-1]["role"] != "assistant":
            raise InputError("the last message must be the assistant's answer", field="messages", **where)
    return list(records)


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
    """Cut a prompt to ``max_len`` ids by removing dialogue text only: the template's control tokens,
    role headers and the system prompt (the intent list) stay. ``left`` drops the oldest dialogue
    tokens (keeps the end, where the final intent usually is), ``right`` the newest. The same policy
    as training's (glmtune.data.cutoff), so a model is evaluated on prompts cut as it was trained."""
    if not max_len or len(ids) <= max_len:
        return ids, False
    from glmtune.data.cutoff import truncate_prompt_ids
    return truncate_prompt_ids(tpl, tokenizer, messages, max_len, side)


# -- running ---------------------------------------------------------------------------------------
def _batched(fn, items: list, batch_size: int) -> list:
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
    predicted: int = 0  # made in this call (the rest came from the prediction log of an earlier run)


def classify(predictor, records: Sequence[dict], label_set: LabelSet, mode: str = "constrained",
             batch_size: int = 8, max_len: int | None = None, truncate_side: str = "left",
             decision: str = "greedy", scoring: str = "decisive",
             log: "PredictionLog | None" = None) -> ClassifyResult:
    """Predict a label for every record with a loaded :class:`glmtune.infer.Predictor`.

    ``decision`` (constrained mode): ``greedy`` follows the most likely token at each branch of the
    label trie (what greedy generation gives whenever it yields a valid label), ``likelihood`` takes
    the most likely label. ``scoring``: ``decisive`` scores each answer up to the token that sets it
    apart (``意图：7``), ``full`` the whole answer with its end token; probabilities are the softmax of
    these log-likelihoods. Neither changes the greedy prediction. ``log``: a :class:`PredictionLog`
    that receives every batch's rows as they are made and supplies those of an interrupted run."""
    import numpy as np
    import torch
    if mode not in MODES:
        raise InputError(f"unknown mode '{mode}'", field="--mode", fix="use constrained or generate")
    if scoring not in SCORINGS:
        raise InputError(f"unknown scoring '{scoring}'", field="--scoring", fix="use decisive or full")
    if decision not in DECISIONS:
        raise InputError(f"unknown decision '{decision}'", field="--decision", fix="use greedy or likelihood")
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
    ans = [tpl.answer_ids(tok, msgs0, label_set.answers[n], prompt_ids=full0) for n in names]
    room = max(len(a) for a in ans)
    for msgs, full in prompt_msgs:
        budget = None if not max_len else max(1, max_len - (room if mode == "constrained" else 0))
        ids, cut = truncate_prompt(tpl, tok, msgs, full, budget, truncate_side)
        n_trunc += cut
        prompts.append(ids)

    backend = predictor.backend
    if mode == "constrained" and not hasattr(backend, "scoring"):
        raise InputError(f"the {backend.name} back-end cannot score labels (constrained mode runs the model's own "
                         "forward passes)", field="--mode", fix="use --mode generate, or the hf back-end")
    done = log.done if log is not None else {}
    t0 = time.perf_counter()
    # Batches of similar length waste little on padding; rows are keyed by the record's index.
    todo = [i for i in sorted(range(len(prompts)), key=lambda i: len(prompts[i])) if i not in done]

    def record(rows: list[dict]) -> list[dict]:
        if log is not None:
            log.add(rows)  # written as made: a crash or kill loses one batch at most
        return rows

    if mode == "constrained":
        from glmtune.evaluate.label_scoring import LabelScorer, common_prefix_len
        with backend.scoring(predictor.default_adapter) as model:
            # The shared prefix (template prefix + system prompt) is computed once for all samples.
            scorer = LabelScorer(model, backend.device, ans, backend.pad_id(predictor.stop_ids),
                                 prompts[0][:common_prefix_len(prompts)], decisive=scoring == "decisive")

            def run(batch):
                node_lp, label_lp = scorer.score([prompts[i] for i in batch])
                return record([{"index": i, "greedy": names[scorer.trie.greedy_label(node)],
                                "scores": lab.double().tolist()} for i, node, lab in zip(batch, node_lp, label_lp)])
            rows = {**done, **{r["index"]: r for r in _batched(run, todo, batch_size)}}
        rows = [rows[i] for i in range(len(prompts))]
        scores = torch.tensor([r["scores"] for r in rows], dtype=torch.float64)
        probs = torch.softmax(scores, dim=-1).numpy()
        if decision == "greedy":
            y_pred = [r["greedy"] for r in rows]
        else:
            y_pred = [names[i] for i in probs.argmax(axis=1)]
        raw_outputs = None
    else:
        from glmtune.infer.backends import GenConfig
        gen = GenConfig.from_kwargs(max_new_tokens=room + 8)
        by_answer = {label_set.answers[n].strip(): n for n in names}

        def run(batch):
            outs = backend.generate([prompts[i] for i in batch], predictor.default_adapter, predictor.stop_ids, gen)
            return record([{"index": i, "raw_output": predictor.decode(o.token_ids).strip()}
                           for i, o in zip(batch, outs)])
        rows = {**done, **{r["index"]: r for r in _batched(run, todo, batch_size)}}
        raw_outputs = [rows[i]["raw_output"] for i in range(len(prompts))]
        y_pred = [parse_label(text, by_answer, names) for text in raw_outputs]
        probs = None
    seconds = time.perf_counter() - t0
    return ClassifyResult(y_true, y_pred, probs if probs is None else np.asarray(probs), raw_outputs,
                          n_trunc, seconds, names, predicted=len(todo))


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
                    predictor=None, seed: int = 0, decision: str = "greedy",
                    scoring: str = "decisive", liger: str = "auto") -> dict:
    """Load, classify, write the report folder; return metrics (what `glmtune eval classify` runs).

    Predictions go to OUT/predictions.partial.jsonl as they are made; a rerun with the same settings
    continues from it, and it is removed once the report (with predictions.jsonl) is complete."""
    from glmtune.data.registry import load_dataset
    from glmtune.evaluate.classification import classification_report_files
    records = labelled_records(load_dataset(data))
    label_set = build_label_set(records, labels)
    if quick:
        records = quick_subset(records, quick, seed)
    run = {"model": str(model), "adapter": str(adapter) if adapter else None, "data": str(data),
           "records": len(records), "labels": label_set.names, "quick": quick, "seed": seed, "mode": mode,
           "scoring": scoring, "max_len": max_len, "truncate_side": truncate_side}
    log = PredictionLog(out, run)
    try:
        if predictor is None:
            from glmtune.infer.predictor import Predictor
            predictor = Predictor(model, adapter=adapter, liger=liger)
        res = classify(predictor, records, label_set, mode, batch_size, max_len, truncate_side, decision, scoring,
                       log=log)
    finally:
        log.close()
    constrained = mode == "constrained"
    extra = {"mode": mode, "decision": decision if constrained else None, "scoring": scoring if constrained else None,
             "samples_per_s": res.predicted / res.seconds if res.seconds > 0 and res.predicted else None,
             "resumed": len(records) - res.predicted,
             "truncated": res.truncated, "truncate_side": truncate_side, "max_len": max_len,
             "model": str(model), "adapter": str(adapter) if adapter else None, "data": str(data)}
    samples = [{"id": r.get("id", i)} for i, r in enumerate(records)]
    metrics = classification_report_files(res.y_true, res.y_pred, label_set.names, out, probs=res.probs,
                                          extra=extra, samples=samples, raw_outputs=res.raw_outputs,
                                          title=f"Classification ({mode})")
    log.path.unlink(missing_ok=True)  # everything it held is in predictions.jsonl now
    return metrics


class PredictionLog:
    """``OUT/predictions.partial.jsonl``: line 1 the run's settings, then one row per prediction,
    appended and fsynced batch by batch. A rerun with the same settings skips what it holds; a log
    from other settings is refused rather than mixed in."""

    NAME = "predictions.partial.jsonl"

    def __init__(self, out_dir: str | Path, run: dict):
        from glmtune.io import read_append_log, writable_target
        self.path = writable_target(Path(out_dir) / self.NAME)
        rows = read_append_log(self.path)
        if rows and rows[0][1].get("run") != run:
            theirs = rows[0][1].get("run") or {}
            differ = [k for k in run if theirs.get(k) != run[k]] or ["format"]
            raise InputError(f"holds predictions of another run (different {', '.join(differ)})", file=self.path,
                             fix="rerun with the same settings to continue it, or delete it / use another --out")
        self.done = {int(r["index"]): r for _, r in rows[1:]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")
        if not rows:
            self.add([{"run": run}])

    def add(self, rows: list[dict]) -> None:
        from glmtune.io import append_jsonl_synced
        append_jsonl_synced(self._f, rows, file=self.path)

    def close(self) -> None:
        self._f.close()
