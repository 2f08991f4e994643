"""Classification metrics equal scikit-learn's; the report folder is complete and the PNG exists."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
from sklearn.metrics import (accuracy_score, f1_score, precision_recall_fscore_support, precision_score,
                             recall_score, top_k_accuracy_score)

from glmtune.errors import InputError
from glmtune.evaluate.classification import (INVALID, classification_report_files, compute_classification_metrics,
                                             most_confused_pairs)

LABELS = ["办理开通", "取消业务", "查询话费", "咨询套餐", "投诉网络", "宽带报修", "积分兑换", "流量查询", "停机保号",
          "补换SIM卡", "国际漫游", "携号转网", "查询余额", "充值缴费", "发票开具", "套餐变更", "业务退订", "信号差",
          "来电提醒", "彩铃设置", "家庭网", "副卡办理", "实名认证", "密码重置", "营业厅查询", "5G升级", "合约机",
          "宽带续费", "话费争议", "账单查询", "其他", "问候", "转人工", "无效来电"]


@pytest.fixture(scope="module")
def preds():
    rng = random.Random(0)
    y = [rng.choice(LABELS) for _ in range(400)]
    p = [t if rng.random() < 0.7 else (None if rng.random() < 0.15 else rng.choice(LABELS)) for t in y]
    return y, p


def test_metrics_equal_sklearn(preds):
    y, p = preds
    m = compute_classification_metrics(y, p, LABELS)
    sk_pred = [x if x is not None else INVALID for x in p]
    assert m["accuracy"] == pytest.approx(accuracy_score(y, sk_pred))
    for avg in ("macro", "weighted"):
        kw = dict(labels=LABELS, average=avg, zero_division=0)
        assert m[f"f1_{avg}"] == pytest.approx(f1_score(y, sk_pred, **kw))
        assert m[f"precision_{avg}"] == pytest.approx(precision_score(y, sk_pred, **kw))
        assert m[f"recall_{avg}"] == pytest.approx(recall_score(y, sk_pred, **kw))
    pr, rc, f1, sup = precision_recall_fscore_support(y, sk_pred, labels=LABELS, zero_division=0)
    for i, lab in enumerate(LABELS):
        assert m["per_class"][lab] == pytest.approx({"precision": pr[i], "recall": rc[i], "f1": f1[i], "support": sup[i]})
    n_invalid = sum(x is None for x in p)
    assert n_invalid > 0 and m["invalid_count"] == n_invalid and m["invalid_rate"] == n_invalid / len(p)
    # Invalid outputs are wrong answers, not a class: accuracy counts them as misses.
    assert m["accuracy"] == pytest.approx(sum(a == b for a, b in zip(y, p)) / len(y))


def test_most_confused_pairs_hand_checked():
    cm = np.array([[5, 3, 0], [1, 4, 0], [0, 3, 2]])
    pairs = most_confused_pairs(cm, ["a", "b", "c"], n=2)
    # Two cells of count 3: c->b leaks 3/5 of c, a->b 3/8 of a, so c->b ranks first.
    assert pairs == [{"true": "c", "pred": "b", "count": 3, "share_of_true": 0.6},
                     {"true": "a", "pred": "b", "count": 3, "share_of_true": 0.375}]


def test_report_folder(tmp_path, preds):
    y, p = preds
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(len(LABELS)), size=len(y))
    samples = [{"id": f"s{i}", "text": f"对话 {i}"} for i in range(len(y))]
    m = classification_report_files(y, p, LABELS, tmp_path, probs=probs, samples=samples,
                                    extra={"samples_per_s": np.float64(12.5), "mode": "generate"})
    for name in ("metrics.json", "report.md", "confusion_matrix.png", "failed_predictions.jsonl", "predictions.jsonl"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert on_disk["samples_per_s"] == 12.5 and on_disk["mode"] == "generate"
    # Hand-rolled top-3 check, then sklearn on sorted columns (it needs sorted labels).
    top3 = [set(np.argsort(-row)[:3]) for row in probs]
    assert on_disk["top_k"]["top_3_accuracy"] == pytest.approx(np.mean([LABELS.index(t) in s for t, s in zip(y, top3)]))
    order = np.argsort(LABELS)
    assert on_disk["top_k"]["top_3_accuracy"] == pytest.approx(
        top_k_accuracy_score(y, probs[:, order], k=3, labels=sorted(LABELS)))
    assert on_disk["accuracy"] == m["accuracy"] and len(on_disk["most_confused_pairs"]) == 10
    failed = [json.loads(line) for line in (tmp_path / "failed_predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(failed) == sum(a != b for a, b in zip(y, p))
    assert all(r["id"].startswith("s") and len(r["top_k"]) == 3 for r in failed)
    assert any(r["valid"] is False and r["pred"] is None for r in failed)
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "Most confused pairs" in report and f"{100 * m['accuracy']:.2f}%" in report and "12.50 samples/s" in report


def test_png_uses_cjk_font(tmp_path):
    from glmtune.evaluate.fonts import find_cjk_font
    if find_cjk_font() is None:
        pytest.skip("no CJK font installed (apt-get install fonts-wqy-microhei)")
    classification_report_files(["问候", "其他"], ["问候", "问候"], ["问候", "其他"], tmp_path, normalize=None)
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 1000


def test_bad_inputs_name_the_problem():
    with pytest.raises(InputError, match="not in the label list"):
        compute_classification_metrics(["x"], ["x"], ["a"])
    with pytest.raises(InputError, match="predictions"):
        compute_classification_metrics(["a", "a"], ["a"], ["a"])
