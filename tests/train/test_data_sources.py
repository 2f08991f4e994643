"""`glmtune train` reads data exactly as `glmtune data` does: a registry name, a CSV, alpaca JSON and
sharegpt JSONL each train 2 steps; `PATH:FORMAT` and a scalar `--set data.datasets=PATH` work; and the
one overflow policy leaves no record without trained tokens (issue 12: 480 long reviews at cutoff 256)."""
from __future__ import annotations

import csv
import io
import json
import math
import random
import re

import pytest
from rich.console import Console

from glmtune.train import run_training

REVIEWS = [("质量很好，做工精细，物流也快", "好评"), ("用了两天就坏了，客服也不理人", "差评"),
           ("包装完整，颜色和图片一样", "好评"), ("尺码不对，退货还要自己出运费", "差评")]


def write_csv(path, rows):
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows({"text": t, "label": lab} for t, lab in rows)
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same four reviews as a registered CSV, a CSV path, alpaca JSON and sharegpt JSONL."""
    d = tmp_path_factory.mktemp("sources")
    write_csv(d / "reviews.csv", REVIEWS)
    (d / "alpaca.json").write_text(json.dumps(
        [{"instruction": t, "input": "", "output": a, "system": "判断评价"} for t, a in REVIEWS],
        ensure_ascii=False, indent=1), encoding="utf-8")
    (d / "sharegpt.jsonl").write_text("".join(json.dumps(
        {"conversations": [{"from": "human", "value": t}, {"from": "gpt", "value": a}]}, ensure_ascii=False) + "\n"
        for t, a in REVIEWS), encoding="utf-8")
    (d / "prompts.txt").write_text("".join(json.dumps({"prompt": t, "completion": a}, ensure_ascii=False) + "\n"
                                           for t, a in REVIEWS), encoding="utf-8")
    (d / "datasets.yaml").write_text("reviews:\n  file: reviews.csv\n  format: classification\n", encoding="utf-8")
    return d


def train_and_capture(cfg):
    out = io.StringIO()
    result = run_training(cfg, console=Console(file=out, width=240))
    return result, out.getvalue()


def summary_counts(log: str) -> tuple[int, int, int, int]:
    """(train conversations, truncated, dropped, without trained tokens) from the training summary line."""
    m = re.search(r"data: (\d+) train conversations \((\d+) truncated, (\d+) dropped, (\d+) without trained", log)
    assert m, log
    return tuple(int(g) for g in m.groups())


@pytest.mark.parametrize("spec", ["reviews", "reviews.csv", "alpaca.json", "sharegpt.jsonl",
                                  "prompts.txt:prompt_completion"])
def test_train_two_steps_from_each_source(make_cfg, sources, spec, monkeypatch):
    monkeypatch.chdir(sources)  # the registry is ./datasets.yaml, as for `glmtune data`
    cfg = make_cfg(f"src-{spec.replace(':', '-')}", **{"data.datasets": spec, "train.max_steps": 2,
                                                      "train.batch_size": 2})
    assert cfg.data.datasets == [spec]  # a scalar becomes a one-element list
    result, log = train_and_capture(cfg)
    assert summary_counts(log) == (4, 0, 0, 0)
    assert result.steps == 2 and math.isfinite(result.final_loss)
    assert [m["step"] for m in result.metrics if "loss" in m] == [1, 2]


def test_registry_key_and_dev_by_name(make_cfg, sources, tmp_path):
    cfg = make_cfg("by-name", **{"data.datasets": ["reviews"], "data.dev": "reviews",
                                 "data.registry": str(sources / "datasets.yaml"), "train.max_steps": 2})
    result, log = train_and_capture(cfg)
    assert summary_counts(log)[0] == 4 and "4 dev" in log and result.eval_loss is not None


def test_unknown_name_says_where_it_looked(make_cfg, sources):
    from glmtune.errors import InputError
    cfg = make_cfg("unknown", **{"data.datasets": "nope", "data.registry": str(sources / "datasets.yaml")})
    with pytest.raises(InputError, match=r"'nope' is neither a file nor a dataset in the registry \(known: reviews\)"):
        train_and_capture(cfg)


def long_reviews(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Reviews of ~300-600 tokens whose answer is a 2-token label: most must be cut at cutoff 256."""
    rng = random.Random(seed)
    good = ["质量很好", "物流很快", "做工精细", "颜色正", "很满意", "性价比高"]
    bad = ["质量太差", "物流很慢", "做工粗糙", "色差严重", "很失望", "不值这个价"]
    filler = ["我是上个月下的单，", "收到以后仔细看了看，", "家里人也都用过了，", "和之前买的那家比，",
              "说实话一开始有点担心，", "这次用了大概两个星期，"]
    rows = []
    for i in range(n):
        label = "好评" if i % 2 == 0 else "差评"
        words = good if label == "好评" else bad
        parts = [rng.choice(filler) + rng.choice(words) + "。" for _ in range(rng.randint(30, 60))]
        rows.append(("".join(parts), label))
    return rows


def test_480_long_reviews_at_cutoff_256_all_keep_their_answer(make_cfg, tmp_path):
    """Issue 12: "2 truncated, 0 dropped, 2 without trained tokens" -> every record trains its answer."""
    from glmtune.data.registry import load_dataset
    from glmtune.data.stats import compute_stats
    from glmtune.models.tokenizer import load_tokenizer
    from glmtune.templates import get_template

    path = write_csv(tmp_path / "reviews480.csv", long_reviews(480))
    cfg = make_cfg("reviews480", **{"data.datasets": str(path), "data.cutoff_len": 256,
                                    "data.train_on": "last_assistant", "train.max_steps": 2})
    result, log = train_and_capture(cfg)
    kept, truncated, dropped, no_loss = summary_counts(log)
    assert (kept, dropped, no_loss) == (480, 0, 0) and truncated > 400 and result.steps == 2
    # `glmtune data stats --cutoff 256` reports the same numbers before any training
    stats = compute_stats(load_dataset(path), template=get_template("glm4"),
                          tokenizer=load_tokenizer(cfg.model.path), cutoff=256, train_on="last_assistant")
    assert stats.after_cutoff == {"encoded": 480, "truncated": truncated, "dropped": 0, "answer_too_long": 0,
                                  "no_loss": 0}
