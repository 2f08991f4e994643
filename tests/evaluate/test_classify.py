"""`glmtune eval classify`: constrained scoring never returns an invalid label and agrees with greedy
generation wherever that yields a valid label; label scores equal a plain forward per label; metrics
equal sklearn's; --quick / --max-len; the CLI writes metrics.json."""
from __future__ import annotations

import json
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
    # 300 steps: loss ~0.03 and 49-81 of 100 valid greedy answers (measured; 800 steps gave 57-60)
    loss = _train(model, ids, mask, labels, 300)
    assert loss < 0.1, f"tiny classifier did not learn its answer format (loss {loss:.3f})"
    model.eval().save_pretrained(out)
    return out


WRAPPERS = [("", ""), ("您好，", ""), ("", "，谢谢"), ("喂，", "。"), ("请问", "？")]


def _test_records():
    """100 distinct dialogues: each training dialogue in five wrappings (the model sees only the bare ones)."""
    out = []
    for pre, suf in WRAPPERS:
        for rec in _records():
            msgs = [dict(m) for m in rec["messages"]]
            msgs[1]["content"] = pre + msgs[1]["content"] + suf
            out.append({"messages": msgs, "label": rec["label"]})
    return out


@pytest.fixture(scope="module")
def test_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cls-data") / "test.jsonl"
    recs = _test_records()
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    return path


def test_constrained_never_invalid_and_metrics_match_sklearn(trained_cls_dir, test_file):
    from sklearn.metrics import accuracy_score, f1_score

    from glmtune.data.registry import load_dataset
    from glmtune.evaluate.classify import build_label_set, classify
    from glmtune.infer.predictor import Predictor
    recs = load_dataset(test_file)
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


def test_constrained_agrees_with_generate_where_valid(trained_cls_dir, test_file):
    from glmtune.data.registry import load_dataset
    from glmtune.evaluate.classify import build_label_set, classify
    from glmtune.infer.predictor import Predictor
    recs = load_dataset(test_file)
    ls = build_label_set(recs)
    p = Predictor(trained_cls_dir)
    con = classify(p, recs, ls, "constrained", batch_size=16)
    gen = classify(p, recs, ls, "generate", batch_size=16)
    exact = {ls.answers[n]: n for n in ls.names}
    valid = [i for i, text in enumerate(gen.raw_outputs) if text in exact]  # greedy wrote a label's answer
    assert len(recs) >= 100 and len(valid) >= 40, f"only {len(valid)} valid greedy answers"
    assert [con.y_pred[i] for i in valid] == [exact[gen.raw_outputs[i]] for i in valid]
    assert all(y in ls.names for y in con.y_pred)


def test_label_scores_equal_a_plain_forward_per_label(trained_cls_dir):
    """The shared-prefix cache + label-trie forward gives the same log-likelihoods as scoring each
    (prompt, answer) pair with its own full forward."""
    import torch
    from transformers import AutoModelForCausalLM

    from glmtune.evaluate.label_scoring import LabelScorer, common_prefix_len
    model = AutoModelForCausalLM.from_pretrained(trained_cls_dir, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(10, 1000, (30,), generator=g).tolist()
    prompts = [prefix + torch.randint(10, 1000, (n,), generator=g).tolist() for n in (5, 9, 1)]
    answers = [[5, 6, 7, 99], [5, 6, 8, 99], [5, 9, 99], [11, 99]]
    with torch.inference_mode():
        shared = LabelScorer(model, "cpu", answers, 0, prompts[0][:common_prefix_len(prompts)])
        assert len(shared.prefix) == 30
        _, got = shared.score(prompts)
        _, got_no_prefix = LabelScorer(model, "cpu", answers, 0).score(prompts)
        want = torch.zeros(len(prompts), len(answers))
        for i, p in enumerate(prompts):
            for k, a in enumerate(answers):
                lp = torch.log_softmax(model(torch.tensor([p + a])).logits[0].float(), -1)
                want[i, k] = sum(lp[len(p) + j - 1, t] for j, t in enumerate(a))
    assert torch.allclose(got, want, atol=1e-4) and torch.allclose(got_no_prefix, want, atol=1e-4)
    with torch.inference_mode():  # decisive: each answer up to the token no other answer shares
        _, got_decisive = LabelScorer(model, "cpu", answers, 0, prompts[0][:30], decisive=True).score(prompts)
        cut = [[5, 6, 7], [5, 6, 8], [5, 9], [11]]
        for i, p in enumerate(prompts):
            for k, a in enumerate(cut):
                lp = torch.log_softmax(model(torch.tensor([p + a])).logits[0].float(), -1)
                want[i, k] = sum(lp[len(p) + j - 1, t] for j, t in enumerate(a))
    assert torch.allclose(got_decisive, want, atol=1e-4)


def test_label_trie_greedy_follows_best_branch():
    from glmtune.evaluate.label_scoring import LabelTrie
    trie = LabelTrie.build([[1, 2, 9], [1, 3, 9], [4, 9]])
    assert len(trie) == 7  # 1, 2, 9, 3, 9, 4, 9: the shared first token is one node
    # node ids: 0:1  1:2  2:9  3:3  4:9  5:4  6:9
    lp = [-0.1, -2.0, 0.0, -0.5, 0.0, -3.0, 0.0]
    assert trie.greedy_label(lp) == 1  # 1 then 3 beats 2
    lp[5] = -0.05  # now the first branch prefers token 4
    assert trie.greedy_label(lp) == 2
    short = LabelTrie.build([[1, 2, 9], [1, 3, 9], [4, 9]], decisive=True)
    assert short.path_of_label == [[0, 1], [0, 2], [3]] and short.tokens == [1, 2, 3, 4]


def test_truncation_cuts_dialogue_only_from_the_chosen_side(glm4_tokenizer_dir):
    from glmtune.evaluate.classify import truncate_prompt
    from glmtune.models.tokenizer import load_tokenizer
    from glmtune.templates import get_template
    tok, tpl = load_tokenizer(glm4_tokenizer_dir), get_template("glm4")
    msgs = [{"role": "system", "content": "判断客户意图"},
            {"role": "user", "content": "第一句话开头。" + "中间的话。" * 20 + "最后一句是结尾"}]
    ids = tpl.encode_prompt(tok, msgs)
    fixed = len(tpl.encode_prompt(tok, [msgs[0], {"role": "user", "content": "x"}])) - 1
    for side, kept, lost in (("left", "最后一句是结尾", "第一句话开头"), ("right", "第一句话开头", "最后一句是结尾")):
        cut, was_cut = truncate_prompt(tpl, tok, msgs, ids, fixed + 8, side)
        text = tok.decode(cut)
        assert was_cut and len(cut) == fixed + 8
        assert "判断客户意图" in text and text.startswith("[gMASK]<sop><|system|>") and text.endswith("<|assistant|>")
        assert kept in text and lost not in text
    assert truncate_prompt(tpl, tok, msgs, ids, len(ids), "left") == (ids, False)
    with pytest.raises(Exception, match="max-len"):
        truncate_prompt(tpl, tok, msgs, ids, fixed - 2, "left")


def test_report_counts_truncation_and_quick_is_stratified(trained_cls_dir, test_file, tmp_path):
    from glmtune.data.registry import load_dataset
    from glmtune.evaluate.classify import classify_report, quick_subset
    from glmtune.infer.predictor import Predictor
    p = Predictor(trained_cls_dir)
    recs = quick_subset(load_dataset(test_file), 10, 0)
    max_len = 36
    room = max(len(p.tokenizer.encode("\n" + r["messages"][-1]["content"], add_special_tokens=False)) + 1 for r in recs)
    longer = sum(len(p.prompt_ids(r["messages"][:-1])) > max_len - room for r in recs)
    m = classify_report(trained_cls_dir, test_file, tmp_path / "o", quick=10, max_len=max_len, predictor=p)
    assert m["n_samples"] == 10 and m["invalid_count"] == 0
    assert 0 < m["truncated"] == longer
    assert sorted(m["per_class"][k]["support"] for k in m["per_class"]) == [2] * 5


def test_cli_writes_metrics(trained_cls_dir, test_file, tmp_path):
    from glmtune.cli.main import main

    labels = tmp_path / "labels.yaml"
    labels.write_text("7: 办理开通\n1: 办理取消\n29: 办理缴费\n12: 投诉费用\n19: 投诉网络\n", encoding="utf-8")
    out = tmp_path / "out"
    # the CLI's entry point in this process (a subprocess would cost a torch import)
    main(["eval", "classify", "--model", str(trained_cls_dir), "--data", str(test_file), "--labels", str(labels),
          "--quick", "20", "--out", str(out)])
    m = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert m["mode"] == "constrained" and m["n_samples"] == 20 and m["invalid_count"] == 0
    assert set(m["labels"]) == {"办理开通", "办理取消", "办理缴费", "投诉费用", "投诉网络"}
    assert (out / "confusion_matrix.png").exists()


def _generate_only_predictor(tokenizer_dir):
    """A stand-in Predictor whose back-end (named like vLLM's) can only generate; it always answers 意图：7."""
    from types import SimpleNamespace

    from glmtune.infer.backends import Output
    from glmtune.models.tokenizer import load_tokenizer
    from glmtune.templates import get_template

    class GenerateOnly:
        name = "vllm"

        def generate(self, prompts, adapter, stop_ids, gen):
            return [Output(tok("意图：7", add_special_tokens=False)["input_ids"], "stop") for _ in prompts]

    tok, tpl = load_tokenizer(tokenizer_dir), get_template("glm4")
    return SimpleNamespace(tokenizer=tok, template=tpl, backend=GenerateOnly(), default_adapter=None,
                           stop_ids=tpl.stop_token_ids(tok), decode=lambda ids: tok.decode(ids))


def test_test_data_is_read_as_every_command_reads_it(glm4_tokenizer_dir, tmp_path, monkeypatch):
    """`eval classify --data` takes what `glmtune train` takes (glmtune.data.registry.load_dataset): here a
    datasets.yaml name (the old JSONL-only reader said "file not found")."""
    from glmtune.evaluate.classify import classify_report
    recs = _records()
    (tmp_path / "cls.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs),
                                        encoding="utf-8")
    (tmp_path / "datasets.yaml").write_text("cls_test:\n  file: cls.jsonl\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    m = classify_report("stand-in", "cls_test", tmp_path / "o", mode="generate",
                        predictor=_generate_only_predictor(glm4_tokenizer_dir))
    assert m["n_samples"] == 20 and m["invalid_count"] == 0
    assert m["accuracy"] == pytest.approx(4 / 20)  # always 意图：7, and 4 of the 20 dialogues are intent 7


def test_records_without_label_or_answer_name_file_and_line(tmp_path):
    from glmtune.data.registry import load_dataset
    from glmtune.errors import InputError
    from glmtune.evaluate.classify import labelled_records
    good = _records()[0]
    cases = [({"messages": good["messages"]}, "field 'label': the record has no label"),
             ({**good, "messages": good["messages"] + [{"role": "user", "content": "还有吗"}]},
              "the last message must be the assistant's answer")]
    for i, (bad, problem) in enumerate(cases):
        path = tmp_path / f"bad{i}.jsonl"
        path.write_text(json.dumps(good, ensure_ascii=False) + "\n" + json.dumps(bad, ensure_ascii=False) + "\n",
                        encoding="utf-8")
        with pytest.raises(InputError) as e:
            labelled_records(load_dataset(path))
        assert f"{path}:2:" in str(e.value) and problem in str(e.value) and "\n" not in str(e.value)


def test_a_backend_that_cannot_score_is_named(glm4_tokenizer_dir):
    """Constrained mode runs the model's own forward passes through the back-end's public `scoring`;
    a back-end without it (vLLM's offline engine) gets a clear error, and generate mode still runs."""
    from glmtune.errors import InputError
    from glmtune.evaluate.classify import build_label_set, classify

    predictor = _generate_only_predictor(glm4_tokenizer_dir)
    records = _records()[:8]
    labels = build_label_set(records)
    with pytest.raises(InputError, match=r"the vllm back-end cannot score labels.*--mode generate"):
        classify(predictor, records, labels, mode="constrained")
    res = classify(predictor, records, labels, mode="generate")
    assert len(res.y_pred) == 8 and res.probs is None
def test_two_labels_report_and_predictions_written_as_made(trained_cls_dir, test_file, tmp_path, monkeypatch):
    """Binary sets are the commonest case: the report works (top-k only where k < 2 labels), and a
    run that dies mid-way keeps its predictions and continues from them to the same result."""
    from glmtune.evaluate import label_scoring
    from glmtune.evaluate.classify import PredictionLog, classify_report
    from glmtune.infer.predictor import Predictor
    two = tmp_path / "two.jsonl"
    rows = [r for r in map(json.loads, test_file.read_text(encoding="utf-8").splitlines()) if r["label"] in (7, 1)]
    two.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    p = Predictor(trained_cls_dir)
    ref = classify_report(trained_cls_dir, two, tmp_path / "ref", predictor=p, batch_size=8)
    assert ref["n_labels"] == 2 and ref["n_samples"] == len(rows) == 40
    assert set(ref["top_k"]) == {"top_1_accuracy", "mean_confidence"}
    assert ref["top_k"]["top_1_accuracy"] == pytest.approx(ref["accuracy"])

    real_score, calls = label_scoring.LabelScorer.score, []

    def dies_on_third_batch(self, batch):
        calls.append(len(batch))
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real_score(self, batch)
    monkeypatch.setattr(label_scoring.LabelScorer, "score", dies_on_third_batch)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="killed"):
        classify_report(trained_cls_dir, two, out, predictor=p, batch_size=8)
    partial = (out / PredictionLog.NAME).read_text(encoding="utf-8").splitlines()
    assert len(partial) == 1 + 16 and not (out / "metrics.json").exists()  # header + two batches
    monkeypatch.setattr(label_scoring.LabelScorer, "score", real_score)
    m = classify_report(trained_cls_dir, two, out, predictor=p, batch_size=8)
    assert m["resumed"] == 16 and m["accuracy"] == ref["accuracy"]
    assert (out / "predictions.jsonl").read_text() == (tmp_path / "ref" / "predictions.jsonl").read_text()
    assert not (out / PredictionLog.NAME).exists()
    (out / PredictionLog.NAME).write_text(json.dumps({"run": {"mode": "other"}}) + "\n")
    with pytest.raises(Exception, match="predictions of another run"):
        classify_report(trained_cls_dir, two, out, predictor=p, batch_size=8)


def test_shared_prefix_cache_goes_by_the_decoders_own_name(trained_cls_dir):
    """transformers 5.24 renamed forward's `past_key_values` to `cache` (and the output field) and
    warns on the old name; the scorer passes and reads the cache under whichever name the installed
    decoder's forward takes, so it runs without a deprecated spelling on 5.17 and on 5.24."""
    import warnings

    import torch
    from transformers import AutoModelForCausalLM

    from glmtune.evaluate.label_scoring import LabelScorer
    model = AutoModelForCausalLM.from_pretrained(trained_cls_dir, dtype=torch.float32).eval()
    prompts = [list(range(10, 40)) + tail for tail in ([41, 42], [43])]
    answers = [[5, 6, 99], [5, 9, 99], [11, 99]]
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        _, shared = LabelScorer(model, "cpu", answers, 0, prompts[0][:30]).score(prompts)
        _, alone = LabelScorer(model, "cpu", answers, 0).score(prompts)
    assert shared.shape == (2, 3) and torch.allclose(shared, alone, atol=1e-4)
