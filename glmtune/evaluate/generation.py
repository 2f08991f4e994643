"""Open-answer metrics: BLEU-1..4, ROUGE-1..4/L, METEOR, TER, on top of sacrebleu, rouge-score and nltk.

Chinese has no spaces, and each library tokenises differently (rouge-score's default tokenizer even
DROPS every non-ASCII character, so Chinese would score 0). We therefore tokenise once, ourselves,
and hand every library the same tokens: space-joined strings with its own tokenisation switched off
(sacrebleu tokenize="none", TER normalized=False, rouge-score a whitespace tokenizer object, nltk
token lists). Scores are on a 0-1 scale (sacrebleu's 0-100 divided by 100; TER can exceed 1).

Corpus scores: BLEU and TER are true corpus statistics (sacrebleu corpus_score); ROUGE and METEOR
have no corpus form in their libraries, so they are the mean of per-sample scores.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Callable, Sequence

from glmtune.errors import InputError
from glmtune.io import iter_jsonl, write_json_atomic, write_jsonl_atomic, write_text_atomic

log = logging.getLogger(__name__)

ALL_METRICS = ("bleu", "rouge", "meteor", "ter")
TOKENIZE_MODES = ("auto", "jieba", "char", "whitespace")
BLEU_ORDERS = (1, 2, 3, 4)
ROUGE_TYPES = {"rouge_1": "rouge1", "rouge_2": "rouge2", "rouge_3": "rouge3", "rouge_4": "rouge4",
               "rouge_l": "rougeL"}

# CJK ideographs, kana, hangul: each is one token in "char" mode.
_CJK = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_CJK_RE = re.compile(f"[{_CJK}]")
# char mode: one CJK character, or a run of Latin letters/digits (so "4G套餐" -> 4G 套 餐), or one symbol.
_CHAR_TOKEN_RE = re.compile(f"[{_CJK}]|[^\\W{_CJK}]+|[^\\w\\s]", re.UNICODE)


def _jieba_tokens(text: str) -> list[str]:
    import jieba
    jieba.setLogLevel(logging.WARNING)  # silence "Building prefix dict..." on first use
    return [t for t in jieba.lcut(text) if t.strip()]


def _13a_tokens(text: str) -> list[str]:
    # sacrebleu's standard WMT tokenizer: splits punctuation off words, the usual choice for English.
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
    return Tokenizer13a()(text.strip()).split()


def resolve_mode(mode: str, texts: Sequence[str]) -> str:
    """auto -> "jieba" if any text has CJK characters, else "13a". Decided once for the whole corpus
    so every sample is tokenised the same way."""
    if mode not in TOKENIZE_MODES:
        raise InputError(f"unknown tokenize mode {mode!r}", field="tokenize",
                         fix=f"use one of {', '.join(TOKENIZE_MODES)}")
    if mode != "auto":
        return mode
    return "jieba" if any(_CJK_RE.search(t) for t in texts) else "13a"


def get_tokenizer(mode: str) -> Callable[[str], list[str]]:
    """Tokenizer for a resolved mode: jieba | char | whitespace | 13a."""
    return {"jieba": _jieba_tokens,
            "char": lambda s: _CHAR_TOKEN_RE.findall(s),
            "whitespace": str.split,
            "13a": _13a_tokens}[mode]


class WhitespaceTokenizer:
    """rouge-score tokenizer object (it calls ``.tokenize(text)``): our text is already tokenised and
    space-joined, and unlike rouge-score's default it keeps CJK characters."""

    def tokenize(self, text: str) -> list[str]:
        return text.split()


def parse_metrics(spec: str | Sequence[str]) -> list[str]:
    names = [m.strip().lower() for m in (spec.split(",") if isinstance(spec, str) else spec) if m.strip()]
    bad = [m for m in names if m not in ALL_METRICS]
    if bad or not names:
        raise InputError(f"unknown metric(s) {bad}" if bad else "no metrics given", field="metrics",
                         fix=f"choose from {','.join(ALL_METRICS)}")
    return names


def _bleu_scores(hyps: list[str], refs: list[list[str]]) -> tuple[dict, list[dict]]:
    from sacrebleu.metrics import BLEU
    streams = _ref_streams(refs)
    corpus, per = {}, [{} for _ in hyps]
    for n in BLEU_ORDERS:
        # BLEU-n = geometric mean of 1..n-gram precisions with brevity penalty (max_ngram_order=n).
        # force=True: our input is deliberately pre-tokenised, so skip sacrebleu's warning about it.
        corpus[f"bleu_{n}"] = BLEU(max_ngram_order=n, tokenize="none", force=True).corpus_score(hyps, streams).score / 100
        # Sentence level needs effective_order, else one missing 4-gram zeroes short sentences.
        sent = BLEU(max_ngram_order=n, tokenize="none", force=True, effective_order=True)
        for row, h, r in zip(per, hyps, refs):
            row[f"bleu_{n}"] = sent.sentence_score(h, r).score / 100
    return corpus, per


def _ter_scores(hyps: list[str], refs: list[list[str]]) -> tuple[dict, list[dict]]:
    from sacrebleu.metrics import TER
    ter = TER(normalized=False)  # no re-tokenisation: split on our spaces only
    corpus = {"ter": ter.corpus_score(hyps, _ref_streams(refs)).score / 100}
    return corpus, [{"ter": ter.sentence_score(h, r).score / 100} for h, r in zip(hyps, refs)]


def _ref_streams(refs: list[list[str]]) -> list[list[str | None]]:
    """sacrebleu wants reference *streams* (one list per reference position); rows with fewer
    references are padded with None, which sacrebleu skips."""
    width = max(len(r) for r in refs)
    return [[r[k] if k < len(r) else None for r in refs] for k in range(width)]


def _rouge_scores(hyps: list[str], refs: list[list[str]]) -> tuple[dict, list[dict]]:
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES.values()), tokenizer=WhitespaceTokenizer())
    per = []
    for h, r in zip(hyps, refs):
        s = scorer.score_multi(r, h)  # best reference per ROUGE type, by F-measure
        per.append({key: s[rt].fmeasure for key, rt in ROUGE_TYPES.items()})
    return _mean(per, list(ROUGE_TYPES)), per


def _meteor_scores(hyp_toks: list[list[str]], ref_toks: list[list[list[str]]]) -> tuple[dict, list[dict]]:
    from nltk.translate.meteor_score import meteor_score
    per = [{"meteor": float(meteor_score(r, h)) if h else 0.0} for h, r in zip(hyp_toks, ref_toks)]
    return _mean(per, ["meteor"]), per


def _mean(rows: list[dict], keys: list[str]) -> dict:
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys}


def compute_generation_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]],
                               metrics: Sequence[str] = ALL_METRICS, tokenize: str = "auto") -> dict:
    """Return {"corpus": {...}, "per_sample": [...], "tokenize": mode, "unavailable": {metric: why}}."""
    if len(predictions) != len(references) or not predictions:
        raise InputError(f"{len(predictions)} predictions for {len(references)} reference lists",
                         fix="give one non-empty reference list per prediction")
    mode = resolve_mode(tokenize, list(predictions) + [r for refs in references for r in refs])
    tok = get_tokenizer(mode)
    hyp_toks = [tok(p) for p in predictions]
    ref_toks = [[tok(r) for r in refs] for refs in references]
    hyps = [" ".join(t) for t in hyp_toks]
    refs = [[" ".join(t) for t in rs] for rs in ref_toks]
    corpus: dict = {}
    per: list[dict] = [{} for _ in hyps]
    unavailable: dict[str, str] = {}
    for name in parse_metrics(list(metrics)):
        if name == "meteor":
            from glmtune.evaluate.wordnet import wordnet_status
            ok, msg = wordnet_status()
            if not ok:
                log.warning("METEOR skipped: %s", msg)
                unavailable["meteor"] = msg
                corpus["meteor"] = None
                continue
        c, p = {"bleu": lambda: _bleu_scores(hyps, refs), "ter": lambda: _ter_scores(hyps, refs),
                "rouge": lambda: _rouge_scores(hyps, refs),
                "meteor": lambda: _meteor_scores(hyp_toks, ref_toks)}[name]()
        corpus.update(c)
        for row, extra in zip(per, p):
            row.update(extra)
    return {"corpus": corpus, "per_sample": per, "tokenize": mode, "unavailable": unavailable}


def load_generation_file(path: str | Path) -> tuple[list[str], list[list[str]]]:
    """Read JSONL rows {"prediction": str, "references": [str, ...]} (a "reference" string is accepted)."""
    preds, refs = [], []
    for line, row in iter_jsonl(path):
        if not isinstance(row, dict):
            raise InputError("expected a JSON object", file=path, line=line)
        pred = row.get("prediction")
        if not isinstance(pred, str):
            raise InputError("missing or non-string prediction", file=path, line=line, field="prediction",
                             fix='each row needs {"prediction": str, "references": [str, ...]}')
        ref = row.get("references", row.get("reference"))
        ref = [ref] if isinstance(ref, str) else ref
        if not isinstance(ref, list) or not ref or not all(isinstance(r, str) for r in ref):
            raise InputError("references must be a non-empty list of strings", file=path, line=line,
                             field="references", fix='e.g. "references": ["a reference answer"]')
        preds.append(pred)
        refs.append(ref)
    if not preds:
        raise InputError("no rows", file=path, fix="the file must contain at least one JSONL row")
    return preds, refs


def generation_report_files(data: str | Path, out_dir: str | Path, metrics: Sequence[str] = ALL_METRICS,
                            tokenize: str = "auto") -> dict:
    """Evaluate a predictions file; write metrics.json, per_sample.jsonl and report.md into out_dir."""
    from glmtune.evaluate.report import scores_markdown
    preds, refs = load_generation_file(data)
    res = compute_generation_metrics(preds, refs, metrics, tokenize)
    out_dir = Path(out_dir)
    metrics_json = {"task": "generation", "n_samples": len(preds), **res["corpus"],
                    "tokenize": res["tokenize"], "data": str(data), "scale": "0-1 (TER may exceed 1; lower is better)"}
    if res["unavailable"]:
        metrics_json["unavailable"] = res["unavailable"]
    write_json_atomic(out_dir / "metrics.json", metrics_json)
    write_jsonl_atomic(out_dir / "per_sample.jsonl",
                       ({"index": i, "prediction": p, "references": r, **s}
                        for i, (p, r, s) in enumerate(zip(preds, refs, res["per_sample"]))))
    notes = [f"tokenisation: {res['tokenize']}",
             "BLEU/TER: sacrebleu corpus statistics; ROUGE (F1, best reference) and METEOR (nltk): mean over samples"]
    notes += [f"{k} unavailable: {v}" for k, v in res["unavailable"].items()]
    write_text_atomic(out_dir / "report.md", scores_markdown(f"Generation evaluation ({len(preds)} samples)",
                                                             res["corpus"], notes))
    return metrics_json
