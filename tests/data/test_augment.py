"""`glmtune data augment` on a CMCC-shaped set with a 3-example class, paraphrases from a scripted server;
then `split` keeps every augmented record in train."""
from __future__ import annotations

import itertools
import json
import re
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cmcc_fixture import write_cmcc_csv  # noqa: E402
from fake_llm import FakeLLM, prompt_text  # noqa: E402

from glmtune.synth.augment import augment_classes  # noqa: E402
from glmtune.data.pipeline import convert_file, split_file  # noqa: E402
from glmtune.io import write_jsonl_atomic  # noqa: E402

RARE = 7   # 办理开通: cut down to 3 examples
OPENERS = ["喂，您好，能听到吗", "早上好，麻烦问个事", "你好呀，我这边遇到点情况", "打扰一下，想咨询一下",
           "在吗，帮我看一下", "您好，我是你们的老用户", "哎你好，我刚才打过一次", "劳驾，有个事情想确认"]
CLOSERS = ["行，那就先这样", "明白了，多谢多谢", "好嘞，辛苦你了", "知道了，再见", "可以可以，麻烦了"]


class Paraphraser:
    """Distinct paraphrases that keep the request's key line; the first request about the rare class returns
    a copy of its source and a repeated version (both must be dropped as too close)."""

    def __init__(self):
        self.counter = itertools.count()
        self.lock = threading.Lock()
        self.sabotaged = False

    def __call__(self, messages: list[dict]) -> str:
        prompt = prompt_text(messages)
        k = int(re.search(r"写出 (\d+) 个", prompt).group(1))
        source = prompt.split("原文：\n", 1)[1].strip()
        key_line = source.split("\n")[1]
        with self.lock:
            if "办理开通" in source and not self.sabotaged:
                self.sabotaged = True
                return json.dumps([source, "好的\n" + key_line, "好的\n" + key_line], ensure_ascii=False)
            ns = [next(self.counter) for _ in range(k)]
        return json.dumps([f"{OPENERS[n % 8]}\n{key_line}，第{n}回\n{CLOSERS[n // 8 % 5]}" for n in ns],
                          ensure_ascii=False)


@pytest.fixture
def cmcc_rare(tmp_path) -> Path:
    all_path = tmp_path / "all.jsonl"
    convert_file(write_cmcc_csv(tmp_path / "cmcc.csv", per_label=5), all_path, format="cmcc")
    records = [json.loads(x) for x in all_path.read_text(encoding="utf-8").splitlines()]
    rare = [r for r in records if r["label"] == RARE]
    records = [r for r in records if r["label"] != RARE or r in rare[:3]]
    write_jsonl_atomic(tmp_path / "train.jsonl", records)
    return tmp_path / "train.jsonl"


def test_rare_class_reaches_n_labels_kept_and_split_keeps_them_in_train(cmcc_rare, tmp_path):
    originals = [json.loads(x) for x in cmcc_rare.read_text(encoding="utf-8").splitlines()]
    by_line = {i + 1: r for i, r in enumerate(originals)}   # augmented_from points into the augment input
    with FakeLLM(Paraphraser()) as llm:
        s = augment_classes(cmcc_rare, tmp_path / "aug.jsonl", min_per_class=6, llm=llm.url, per_request=2)
    assert s.before[str(RARE)] == 3 and s.after[str(RARE)] == 6 and s.short == {}
    assert set(s.after.values()) == {6} and s.augmented == 33 * 1 + 3
    assert s.dropped["too_close"] == 2       # the copy of the source and the repeated version
    records = [json.loads(x) for x in (tmp_path / "aug.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["messages"], r["label"]) for r in records[:len(originals)]] == \
        [(r["messages"], r["label"]) for r in originals]     # the input comes through unchanged
    augmented = records[len(originals):]
    assert all(r["meta"]["augmented"] and r["meta"]["model"] == "fake-model" for r in augmented)
    for rec in augmented:
        src = by_line[rec["meta"]["augmented_from"]["line"]]
        assert rec["label"] == src["label"]
        assert rec["messages"][0] == src["messages"][0] and rec["messages"][2] == src["messages"][2]
        assert rec["messages"][1]["content"] != src["messages"][1]["content"]
        assert src["messages"][1]["content"].split("\n")[1] in rec["messages"][1]["content"]

    result, paths = split_file(tmp_path / "aug.jsonl", tmp_path / "split", ratios="8:1:1", stratify="label", seed=0)
    parts = {n: [json.loads(x) for x in p.read_text(encoding="utf-8").splitlines()] for n, p in paths.items()}
    assert not any((r.get("meta") or {}).get("augmented") for n in ("dev", "test") for r in parts[n])
    assert sum(bool(r["meta"].get("augmented")) for r in parts["train"]) == len(augmented)
    assert sorted(r["meta"]["origin"] for n in parts for r in parts[n] if not r["meta"].get("augmented")) \
        == sorted(f"{r['meta']['source']}:{r['meta']['line']}" for r in originals)   # each original exactly once
    assert any("augmented" in w for w in result.warnings)


def test_cli_augment(cmcc_rare, tmp_path):
    from typer.testing import CliRunner

    import glmtune.cli.data  # noqa: F401
    from glmtune.cli.main import app

    with FakeLLM(Paraphraser()) as llm:
        res = CliRunner().invoke(app, ["data", "augment", str(cmcc_rare), "--out", str(tmp_path / "aug.jsonl"),
                                       "--min-per-class", "4", "--llm", llm.url])
    assert res.exit_code == 0, res.output
    assert "3 -> 4" in res.output and "records added" in res.output
    assert len((tmp_path / "aug.jsonl").read_text(encoding="utf-8").splitlines()) == 33 * 5 + 4
