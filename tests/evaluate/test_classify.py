"""`glmtune eval classify`: constrained scoring never returns an invalid label; metrics equal
sklearn's; --quick/--max-len; the CLI writes metrics.json. (Agreement with generate mode is not yet
tested: the tiny model below does not learn the intents well enough for greedy = best label.)"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

INTENTS = [7, 1, 29, 12, 19]  # 5 CMCC labels
DIALOGUES = {
    7: ["我想开通流量包", "帮我开个彩铃", "开通国际漫游", "我要办一个新套餐"],
    1: ["取消我的彩铃", "把流量包退订了", "不要这个业务了取消掉", "退订短信服务"],
    29: ["我要交话费", "怎么充值一百块", "帮我缴费", "话费充五十"],
    12: ["为什么多扣了钱", "话费怎么这么贵", "乱扣费投诉", "账单多收了二十块"],
    19: ["信号太差了", "网络老是断", "上不了网", "家里没有信号"],
}


def _records():
    from glmtune.data.cmcc import cmcc_answer
    sys_prompt = "判断客户意图，只输出：意图：编号：名称"
    return [{"messages": [{"role": "system", "content": sys_prompt}, {"role": "user", "content": d},
                          {"role": "assistant", "content": cmcc_answer(i)}], "label": i}
            for i in INTENTS for d in DIALOGUES[i]]


@pytest.fixture(scope="module")
def trained_cls_dir(tmp_path_factory, glm4_tokenizer_dir):
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "infer"))
    from tiny_trained import _train
    from transformers import AutoModelForCausalLM

    from glmtune.models.tiny import build_tiny_glm4
    from glmtune.models.tokenizer import load_tokenizer
    from glmtune.templates import get_template
    out = build_tiny_glm4(tmp_path_factory.mktemp("cls") / "tiny", glm4_tokenizer_dir, seed=0)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok, tpl = load_tokenizer(out), get_template("glm4")
    encs = [tpl.encode(tok, r["messages"]) for r in _records()]
    width = max(len(e) for e in encs)
    ids = torch.tensor([e.input_ids + [0] * (width - len(e)) for e in encs])
    labels = torch.tensor([e.labels + [-100] * (width - len(e)) for e in encs])
    mask = (torch.arange(width)[None, :] < torch.tensor([len(e) for e in encs])[:, None]).long()
    loss = _train(model, ids, mask, labels, 200)
    assert loss < 1.0, f"tiny classifier did not learn its answer format (loss {loss:.3f})"
    model.eval().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def test_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cls-data") / "test.jsonl"
    recs = _records() * 5  # 100 samples
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    return path


def test_constrained_never_invalid_and_metrics_match_sklearn(trained_cls_dir, test_file):
    from sklearn.metrics import accuracy_score, f1_score

    from glmtune.evaluate.classify import build_label_set, classify, load_records
    from glmtune.infer.predictor import Predictor
    recs = load_records(test_file)
    assert len(recs) >= 100
    ls = build_label_set(recs)
    p = Predictor(trained_cls_dir)
    con = classify(p, recs, ls, "constrained", batch_size=16)
    assert all(y in ls.names for y in con.y_pred)
    assert con.probs.shape == (len(recs), len(ls.names))
    assert abs(con.probs.sum(axis=1) - 1).max() < 1e-6
    from glmtune.evaluate.classification import compute_classification_metrics
    m = compute_classification_metrics(con.y_true, con.y_pred, ls.names, probs=con.probs)
    assert m["invalid_count"] == 0
    assert m["accuracy"] == pytest.approx(accuracy_score(con.y_true, con.y_pred))
    assert m["f1_macro"] == pytest.approx(f1_score(con.y_true, con.y_pred, labels=ls.names, average="macro"))


def test_truncation_and_quick(trained_cls_dir, test_file, tmp_path):
    from glmtune.evaluate.classify import classify_report
    from glmtune.infer.predictor import Predictor
    p = Predictor(trained_cls_dir)
    m = classify_report(trained_cls_dir, test_file, tmp_path / "o", quick=10, max_len=20, predictor=p)
    assert m["n_samples"] == 10 and m["truncated"] == 10 and m["invalid_count"] == 0
    assert sorted(m["per_class"][k]["support"] for k in m["per_class"]) == [2] * 5


def test_cli_writes_metrics(trained_cls_dir, test_file, tmp_path):
    labels = tmp_path / "labels.yaml"
    labels.write_text("7: 办理开通\n1: 办理取消\n29: 办理缴费\n12: 投诉费用\n19: 投诉网络\n", encoding="utf-8")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "glmtune", "eval", "classify", "--model", str(trained_cls_dir),
                        "--data", str(test_file), "--labels", str(labels), "--quick", "20", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    m = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert m["mode"] == "constrained" and m["n_samples"] == 20 and m["invalid_count"] == 0
    assert set(m["labels"]) == {"办理开通", "办理取消", "办理缴费", "投诉费用", "投诉网络"}
    assert (out / "confusion_matrix.png").exists()
