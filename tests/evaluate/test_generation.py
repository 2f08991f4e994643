"""Generation metrics equal sacrebleu / rouge-score / nltk called directly; Chinese scores are sensible."""
from __future__ import annotations

import json

import pytest
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU, TER

from glmtune.errors import InputError
from glmtune.evaluate.generation import compute_generation_metrics, generation_report_files, get_tokenizer
from glmtune.evaluate.wordnet import wordnet_status

# Lowercase, unpunctuated English: whitespace tokens are exactly what each library would use itself.
PREDS = ["the cat sat on the mat", "a quick brown fox jumps over the dog", "it is raining today in the city"]
REFS = [["the cat is sitting on the mat"], ["the quick brown fox jumped over the lazy dog", "a fast brown fox leaps"],
        ["today it rains in the city"]]
ZH_PREDS = ["我想办理一个流量套餐", "请帮我查询一下话费余额", "宽带坏了需要报修"]
ZH_REFS = [["我要办理流量套餐"], ["帮我查一下话费余额"], ["我家宽带坏了要报修"]]
WORDNET_OK, WORDNET_MSG = wordnet_status()


def test_english_equals_libraries():
    res = compute_generation_metrics(PREDS, REFS, ["bleu", "rouge", "ter"], tokenize="whitespace")
    c = res["corpus"]
    streams = [[r[0] for r in REFS], [r[1] if len(r) > 1 else None for r in REFS]]
    for n in (1, 2, 3, 4):
        assert c[f"bleu_{n}"] == pytest.approx(BLEU(max_ngram_order=n).corpus_score(PREDS, streams).score / 100)
    assert 0 < c["bleu_4"] < c["bleu_1"] < 1
    assert c["ter"] == pytest.approx(TER().corpus_score(PREDS, streams).score / 100)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rouge3", "rouge4", "rougeL"])  # its default tokenizer
    direct = [scorer.score_multi(r, p) for p, r in zip(PREDS, REFS)]
    for key, rt in {"rouge_1": "rouge1", "rouge_2": "rouge2", "rouge_4": "rouge4", "rouge_l": "rougeL"}.items():
        assert c[key] == pytest.approx(sum(d[rt].fmeasure for d in direct) / len(direct))
    sent = BLEU(max_ngram_order=2, effective_order=True).sentence_score(PREDS[1], REFS[1]).score / 100
    assert res["per_sample"][1]["bleu_2"] == pytest.approx(sent)


@pytest.mark.skipif(not WORDNET_OK, reason=f"WordNet unavailable: {WORDNET_MSG}")
def test_meteor_equals_nltk():
    from nltk.translate.meteor_score import meteor_score
    res = compute_generation_metrics(PREDS, REFS, ["meteor"], tokenize="whitespace")
    direct = [meteor_score([x.split() for x in r], p.split()) for p, r in zip(PREDS, REFS)]
    assert res["corpus"]["meteor"] == pytest.approx(sum(direct) / len(direct))
    assert [s["meteor"] for s in res["per_sample"]] == pytest.approx(direct)
    # WordNet synonyms at work: "jumps"/"jumped" stem-match; rains/raining too -> clearly above 0.5.
    assert res["corpus"]["meteor"] > 0.5


def test_meteor_unavailable_is_reported_not_fatal(monkeypatch):
    import glmtune.evaluate.wordnet as wn
    monkeypatch.setattr(wn, "wordnet_status", lambda: (False, "METEOR needs WordNet. Fix: run setup_wordnet.sh"))
    res = compute_generation_metrics(PREDS, REFS, ["bleu", "meteor"], tokenize="whitespace")
    assert res["corpus"]["meteor"] is None and "setup_wordnet" in res["unavailable"]["meteor"]
    assert res["corpus"]["bleu_4"] > 0


@pytest.mark.parametrize("mode", ["jieba", "char"])
def test_chinese_scores_sensible(mode):
    metrics = ["bleu", "rouge", "ter"] + (["meteor"] if WORDNET_OK else [])
    good = compute_generation_metrics(ZH_PREDS, ZH_REFS, metrics, tokenize=mode)["corpus"]
    bad = compute_generation_metrics(["今天天气很好", "我喜欢吃苹果", "明天去北京"], ZH_REFS, metrics, tokenize=mode)["corpus"]
    for key in ("bleu_1", "bleu_2", "rouge_1", "rouge_2", "rouge_l") + (("meteor",) if WORDNET_OK else ()):
        assert 0.2 < good[key] <= 1, (key, good[key])
        assert good[key] > bad[key], key
    assert good["ter"] < bad["ter"]
    same = compute_generation_metrics(ZH_PREDS, [[p] for p in ZH_PREDS], metrics, tokenize=mode)["corpus"]
    assert same["bleu_4"] == pytest.approx(1.0) and same["rouge_l"] == pytest.approx(1.0) and same["ter"] == 0


def test_tokenizers():
    assert get_tokenizer("char")("我要办理4G套餐，ok") == ["我", "要", "办", "理", "4G", "套", "餐", "，", "ok"]
    assert "套餐" in get_tokenizer("jieba")("我要办理流量套餐")
    assert compute_generation_metrics(ZH_PREDS, ZH_REFS, ["bleu"])["tokenize"] == "jieba"
    assert compute_generation_metrics(PREDS, REFS, ["bleu"])["tokenize"] == "13a"


def test_cli_generate_writes_files(tmp_path):
    from typer.testing import CliRunner
    import glmtune.cli.eval  # noqa: F401
    from glmtune.cli.main import app
    data = tmp_path / "preds.jsonl"
    data.write_text("\n".join(json.dumps({"prediction": p, "references": r}, ensure_ascii=False)
                              for p, r in zip(ZH_PREDS, ZH_REFS)), encoding="utf-8")
    res = CliRunner().invoke(app, ["eval", "generate", "--data", str(data), "--metrics", "bleu,rouge,ter",
                                   "--out", str(tmp_path / "out"), "--tokenize", "char"])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))
    keys = {f"bleu_{n}" for n in range(1, 5)} | {f"rouge_{n}" for n in range(1, 5)} | {"rouge_l", "ter"}
    assert keys <= m.keys() and all(0 <= m[k] <= 1 for k in keys) and m["tokenize"] == "char"
    rows = (tmp_path / "out" / "per_sample.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 3 and "rouge_l" in json.loads(rows[0])


def test_bad_file_names_line(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prediction": "a", "references": ["a"]}\n{"prediction": "b", "references": []}\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"bad.jsonl:2: field 'references'"):
        generation_report_files(data, tmp_path / "out")
