"""`glmtune data synthesize`: crawled pages -> grounded question/answer records written by an LLM.

Steps: pages (a crawl folder's manifest, or *.txt files) -> token chunks with overlap -> one prompt
per chunk asking for K pairs as JSON (editable templates, zh/en) -> strict parsing, one retry with a
correction -> filters -> canonical JSONL. Filters, in order, each counted in the summary:
``malformed`` (an item without a question and an answer string), ``length`` (outside the limits),
``ungrounded`` (answer overlap with its chunk below ``min_grounding``), ``duplicate`` (near-duplicate
question, via :func:`glmtune.data.dedupe.dedupe_records`). Chunks whose replies stay invalid count as
``invalid_json``.

Resumable: every finished chunk is logged in ``OUT.progress.jsonl`` (keyed by a hash of the chunk
text, so a changed page or chunk size is new work); a rerun asks only about chunks not in the log
(transport errors are not "finished") and rebuilds the output from the log.
"""
from __future__ import annotations

import functools
import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from glmtune.data.crawl import read_pages
from glmtune.synth.prompting import as_llm, ask_json_lists, fill_prompt, load_prompt
from glmtune.errors import InputError
from glmtune.io import iter_jsonl, write_jsonl_atomic

BUILTIN_TOKENIZER = Path(__file__).resolve().parents[1] / "resources" / "tokenizers" / "glm4"
# Grounding units: one CJK character, or one run of latin letters/digits (lower-cased).
_UNITS = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[a-z0-9]+")


@dataclass
class SynthesizeSummary:
    out: Path
    pages: int = 0
    chunks: int = 0
    chunks_done_before: int = 0    # skipped because the progress log had them
    requests: int = 0              # LLM calls this run, retries included
    pairs_kept: int = 0
    dropped: Counter = field(default_factory=Counter)   # reason -> pairs (invalid_json, llm_error: chunks)
    samples: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"out": str(self.out), "pages": self.pages, "chunks": self.chunks,
                "chunks_done_before": self.chunks_done_before, "requests": self.requests,
                "pairs_kept": self.pairs_kept, "dropped": dict(self.dropped)}


@dataclass(frozen=True)
class Limits:
    """Length limits in characters, the grounding threshold and the duplicate-question threshold."""
    min_question: int = 4
    max_question: int = 300
    min_answer: int = 2
    max_answer: int = 1500
    min_grounding: float = 0.5   # share of the answer's unit bigrams found in its chunk
    duplicate_threshold: float = 0.8   # character 3-gram Jaccard of two questions


def synthesize_qa(pages_dir: str | Path, out_path: str | Path, *, llm, model: str | None = None,
                  per_chunk: int = 3, lang: str = "zh", chunk_tokens: int = 512, overlap: int = 64,
                  tokenizer: str | Path | None = None, prompt: str | Path | None = None, retries: int = 1,
                  batch_size: int = 8, max_tokens: int = 1024, temperature: float = 0.0,
                  system: str | None = None, limits: Limits = Limits(),
                  progress: Callable[[int, int], None] | None = None) -> SynthesizeSummary:
    """Write QA records for every chunk of every page in ``pages_dir`` to ``out_path``.

    ``llm``: an OpenAI-compatible base URL, a local model folder, or a ready client
    (:mod:`glmtune.infer.llm`); ``model`` names the endpoint's model (default: its first).
    ``tokenizer``: folder whose tokenizer measures chunks (default: the local model's, else the
    bundled GLM-4 tokenizer). ``progress(done, total)`` is called after every batch of chunks.
    """
    if per_chunk < 1 or chunk_tokens < 16 or not 0 <= overlap < chunk_tokens:
        raise InputError("need per_chunk >= 1, chunk_tokens >= 16 and 0 <= overlap < chunk_tokens",
                         field="per_chunk/chunk_tokens/overlap")
    out = Path(out_path)
    template = load_prompt("synthesize_qa", lang, prompt)
    pages = read_pages(pages_dir)
    if not pages:
        raise InputError("no pages to read", file=pages_dir, fix="crawl first, or put .txt files in the folder")
    client = as_llm(llm, model, batch_size=batch_size, max_tokens=max_tokens, temperature=temperature)
    tok = _chunk_tokenizer(tokenizer, client)
    chunks = [c for page in pages for c in chunk_page(page, tok, chunk_tokens, overlap)]
    log_path = out.with_name(out.stem + ".progress.jsonl")
    log = _load_log(log_path)
    summary = SynthesizeSummary(out, pages=len(pages), chunks=len(chunks))
    todo = [c for c in chunks if c["key"] not in log]
    summary.chunks_done_before = len(chunks) - len(todo)
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        convs = [[{"role": "user", "content": fill_prompt(template, prompt, text=c["text"], k=per_chunk,
                                                           title=c["title"] or c["url"])}] for c in batch]
        for chunk, asked in zip(batch, ask_json_lists(client, convs, retries=retries, lang=lang)):
            summary.requests += len(asked.replies)
            if asked.error and asked.error.startswith("llm_error"):
                summary.dropped["llm_error"] += 1   # not logged: a rerun asks again
                continue
            log[chunk["key"]] = {"key": chunk["key"], "chunk_id": chunk["chunk_id"], "model": client.name,
                                 "items": asked.items, "error": asked.error, "replies": asked.replies}
        write_jsonl_atomic(log_path, log.values())
        if progress:
            progress(summary.chunks_done_before + start + len(batch), len(chunks))
    records = _records(chunks, log, per_chunk, limits, summary, system)
    summary.pairs_kept = write_jsonl_atomic(out, records)
    summary.samples = records[:3]
    return summary


def _chunk_tokenizer(tokenizer, client):
    local = getattr(client, "predictor", None)
    if tokenizer is None and local is not None:
        return local.tokenizer
    return _load_tokenizer(str(tokenizer or BUILTIN_TOKENIZER))


@functools.lru_cache(maxsize=2)
def _load_tokenizer(path: str):
    # GLM-4's 150k-token vocabulary takes seconds to load; a UI or a rerun in one process pays once.
    from glmtune.models.tokenizer import load_tokenizer
    return load_tokenizer(path)


def chunk_page(page: dict, tokenizer, chunk_tokens: int, overlap: int) -> list[dict]:
    """Cut a page's text into windows of ``chunk_tokens`` tokens, each overlapping the previous by
    ``overlap``; the text of a window is the exact source slice (from the tokenizer's offsets)."""
    text = page["text"]
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    chunks, start = [], 0
    while start < len(offsets):
        end = min(start + chunk_tokens, len(offsets))
        piece = text[offsets[start][0]:offsets[end - 1][1]].strip()
        if piece:
            i = len(chunks)
            chunks.append({"text": piece, "url": page["url"], "title": page.get("title"), "file": page["file"],
                           "chunk_id": f"{page['file']}#{i}",
                           "key": hashlib.sha256(f"{page['url']}\n{piece}".encode("utf-8")).hexdigest()[:20]})
        if end == len(offsets):
            break
        start = end - overlap
    return chunks


def grounding(answer: str, chunk: str) -> float:
    """Share of the answer's unit bigrams (unigrams for a one-unit answer) that occur in the chunk.

    Units are CJK characters and latin words, so the score means the same for Chinese and English;
    bigrams (not single units) keep an answer built from common words out of an unrelated chunk.
    """
    a, c = _UNITS.findall(answer.lower()), _UNITS.findall(chunk.lower())
    if not a:
        return 0.0
    if len(a) == 1:
        return float(a[0] in set(c))
    grams = list(zip(a, a[1:]))
    have = set(zip(c, c[1:]))
    return sum(g in have for g in grams) / len(grams)


def _records(chunks: list[dict], log: dict, per_chunk: int, limits: Limits, summary: SynthesizeSummary,
             system: str | None) -> list[dict]:
    """Filter every logged chunk's pairs, then drop near-duplicate questions across all of them."""
    from glmtune.data.dedupe import dedupe_records

    candidates: list[dict] = []
    for chunk in chunks:
        entry = log.get(chunk["key"])
        if entry is None:
            continue
        if entry["items"] is None:
            summary.dropped[entry["error"] or "invalid_json"] += 1
            continue
        for item in entry["items"][:per_chunk]:
            reason, pair = _check_pair(item, chunk["text"], limits)
            if reason:
                summary.dropped[reason] += 1
            else:
                candidates.append(_record(pair, chunk, entry["model"], system))
    # Compare questions only: two different answers to one question are still a duplicate question.
    questions = [{"messages": [_user_turn(r)], "meta": {**r["meta"], "index": i}} for i, r in enumerate(candidates)]
    kept, _ = dedupe_records(questions, near=True, threshold=limits.duplicate_threshold)
    if len(kept) < len(candidates):
        summary.dropped["duplicate"] += len(candidates) - len(kept)
    return [candidates[q["meta"]["index"]] for q in kept]


def _user_turn(rec: dict) -> dict:
    return next(m for m in rec["messages"] if m["role"] == "user")


def _check_pair(item, chunk_text: str, limits: Limits) -> tuple[str | None, dict]:
    if not isinstance(item, dict):
        return "malformed", {}
    q, a = item.get("question"), item.get("answer")
    if not (isinstance(q, str) and isinstance(a, str)):
        return "malformed", {}
    q, a = q.strip(), a.strip()
    if not (limits.min_question <= len(q) <= limits.max_question and limits.min_answer <= len(a) <= limits.max_answer):
        return "length", {}
    score = grounding(a, chunk_text)
    if score < limits.min_grounding:
        return "ungrounded", {}
    return None, {"question": q, "answer": a, "grounding": round(score, 3)}


def _record(pair: dict, chunk: dict, model: str, system: str | None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": pair["question"]}, {"role": "assistant", "content": pair["answer"]}]
    return {"messages": messages,
            "meta": {"source": chunk["url"], "title": chunk["title"], "page": chunk["file"],
                     "chunk_id": chunk["chunk_id"], "model": model, "grounding": pair["grounding"],
                     "synthesized": True}}


def _load_log(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    return {row["key"]: row for _, row in iter_jsonl(path) if isinstance(row, dict) and "key" in row}
