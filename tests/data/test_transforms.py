"""clean, dedupe, split, merge, registry, cutoff and stats on small hand-checked inputs."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from cmcc_fixture import write_cmcc_csv
from glmtune.data.clean import clean_records
from glmtune.data.dedupe import dedupe_records
from glmtune.data.pipeline import merge_files, split_file
from glmtune.data.readers import read_records
from glmtune.data.registry import load_dataset, resolve_source
from glmtune.data.split import parse_ratios, split_records
from glmtune.data.stats import compute_stats


def rec(user, answer, **extra):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
            "meta": {"source": "t.jsonl", "line": 1}, **extra}


def test_clean_counts_each_rule():
    records = [rec("你好😀😀", "你好，我是客服小王，很高兴为您服务。"),
               rec("a\x07b\u200bc", "  多余   空格 \n\n\n\n结尾  "),
               rec("🎉", "只有表情的问题会被丢弃"),
               rec("正常", "正常")]
    kept, report = clean_records(records)
    assert report.rules["emoji"].messages == 2 and report.rules["emoji"].chars_removed == 3
    assert report.rules["control"].messages == 1 and report.rules["control"].chars_removed == 2
    assert report.rules["self_intro"].messages == 1 and report.rules["self_intro"].chars_removed == len("你好，我是客服小王，")
    assert report.rules["whitespace"].messages == 1
    assert kept[0]["messages"][1]["content"] == "很高兴为您服务。"
    assert kept[1]["messages"] == [{"role": "user", "content": "abc"}, {"role": "assistant", "content": "多余 空格\n\n结尾"}]
    assert len(report.dropped) == 1 and "t.jsonl:1" in report.dropped[0]
    assert (report.records_in, report.records_out, report.records_changed) == (4, 3, 2)
    assert records[0]["messages"][0]["content"] == "你好😀😀"  # input untouched


def test_clean_self_intro_only_in_assistant_and_configurable():
    kept, report = clean_records([rec("你好，我是张三，我要办卡", "好的")])
    assert kept[0]["messages"][0]["content"] == "你好，我是张三，我要办卡" and report.rules["self_intro"].messages == 0
    kept, _ = clean_records([rec("q", "I am Bot. Hello")], self_intro=r"^I am \w+\. ")
    assert kept[0]["messages"][1]["content"] == "Hello"


def test_dedupe_exact_and_near():
    base = "您好请讲，我想咨询一下五十八元套餐每个月包含多少流量和通话分钟数，谢谢"
    records = [rec(base, "三十个G"), rec(base, "三十个G"), rec(base + "呀", "三十个G"), rec("完全不同的问题", "答案"),
               rec("我要取消彩铃业务", "已取消")]
    kept, report = dedupe_records(records, threshold=0.8)
    assert (report.exact, report.near, report.records_out) == (1, 1, 3)
    assert [r["messages"][0]["content"] for r in kept] == [base, "完全不同的问题", "我要取消彩铃业务"]
    kept2, report2 = dedupe_records(records, near=False)
    assert report2.near == 0 and len(kept2) == 4
    assert dedupe_records(records, threshold=0.8)[0] == kept  # deterministic


def test_dedupe_ignores_shared_system_prompt(tmp_path):
    recs = read_records(write_cmcc_csv(tmp_path / "c.csv", per_label=2))
    _, report = dedupe_records(recs, threshold=0.9)
    assert report.near == 0 and report.exact == 0


def test_parse_ratios():
    assert parse_ratios("8:1:1") == pytest.approx([0.8, 0.1, 0.1])
    assert parse_ratios("9:1") == pytest.approx([0.9, 0.1])


def test_split_proportions_and_stratification(tmp_path):
    recs = read_records(write_cmcc_csv(tmp_path / "c.csv", per_label=10))  # 340 records, 10 per intent
    result = split_records(recs, "8:1:1", stratify="label", seed=42)
    assert result.counts() == {"train": 272, "dev": 34, "test": 34}
    for part in result.parts.values():  # 340 rows leave room to stratify every cut: exact per-class shares
        per_class = Counter(r["label"] for r in part)
        assert len(per_class) == 34 and len(set(per_class.values())) == 1
    assert not result.warnings
    again = split_records(recs, "8:1:1", stratify="label", seed=42)
    assert again.parts == result.parts
    other = split_records(recs, "8:1:1", stratify="label", seed=7)
    assert other.parts["dev"] != result.parts["dev"]


def test_split_rare_classes_fall_back_with_warning(tmp_path):
    recs = [rec(f"q{i}", "a", label="common") for i in range(20)] + [rec("r", "a", label="rare")]
    result = split_records(recs, "8:1:1", stratify="label", seed=1)
    assert sum(result.counts().values()) == 21
    assert any("rare" in w for w in result.warnings)
    assert [r["label"] for r in result.parts["train"]].count("rare") == 1


def test_split_small_sample_keeps_all_labels_in_train(tmp_path):
    from glmtune.data.sample import sample_path
    result, paths = split_file(sample_path("cmcc34"), tmp_path / "s", ratios="8:1:1", stratify="label", seed=42)
    assert {r["label"] for r in result.parts["train"]} == set(range(34))
    assert sorted(p.name for p in paths.values()) == ["dev.jsonl", "test.jsonl", "train.jsonl"]
    assert sum(1 for p in paths.values() for _ in open(p, encoding="utf-8")) == 204


def test_merge_counts_and_dedupe(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_text(json.dumps(rec("x", "y")) + "\n", encoding="utf-8")
    b = tmp_path / "b.json"
    b.write_text(json.dumps([{"prompt": "x", "completion": "y"}, {"prompt": "p", "completion": "q"}]), encoding="utf-8")
    s = merge_files([a, b], tmp_path / "m.jsonl", dedupe=True)
    assert s.per_source == {str(a): 1, str(b): 2} and s.duplicates_removed == 1 and s.records == 2


def test_registry_name_resolves_with_columns_and_options(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "r.csv").write_text("review,stars\n好,5\n", encoding="utf-8")
    (tmp_path / "data" / "map.json").write_text('{"5": "好评"}', encoding="utf-8")
    (tmp_path / "datasets.yaml").write_text(
        "reviews:\n  file: data/r.csv\n  format: classification\n  columns: {text: review, label: stars}\n"
        "  options: {label_map: data/map.json}\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    ds = resolve_source("reviews")
    assert ds.files == [tmp_path / "data" / "r.csv"] and ds.format == "classification"
    (r,) = load_dataset("reviews")
    assert r["label"] == "好评"
    assert resolve_source("data/r.csv").format == "auto"  # an existing path wins over the registry


def test_stats_counts_and_labels_without_tokenizer():
    s = compute_stats([rec("ab", "c", label=1), rec("d", "ef", label=1), rec("g", "h", label=2)])
    assert s.records == 3 and s.messages == 6 and s.labels == {"1": 2, "2": 1}
    assert s.chars.max == 3 and s.tokens is None


def test_stats_token_percentiles_under_glm4(glm4_tokenizer_dir, tmp_path):
    from glmtune.data.pipeline import stats_file
    src = write_cmcc_csv(tmp_path / "c.csv", per_label=1)
    s = stats_file(src, template="glm4", tokenizer=glm4_tokenizer_dir, cutoff=400)
    assert s.tokens.p50 <= s.tokens.p90 <= s.tokens.p99 <= s.tokens.max
    assert s.tokens.p50 > 300  # the 34-intent system prompt alone is a few hundred tokens
    assert 0 <= s.over_cutoff <= 34 and s.trained_tokens > 34
