"""Malformed inputs: every error names the file and the line (or the field where no line exists),
and no output file (nor a temp file) is left behind."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from glmtune.data.pipeline import clean_file, convert_file, split_file
from glmtune.errors import InputError

HEADER = "sentence_sep,c_numerical,label_raw\n"
GOOD_ROW = '"您好请讲[SEP]我想开通流量包[SEP]好的",7,办理开通\n'


def jsonl(*objs) -> str:
    return "".join((o if isinstance(o, str) else json.dumps(o, ensure_ascii=False)) + "\n" for o in objs)


def msgs(*pairs) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


OK = msgs(("user", "你好"), ("assistant", "你好呀"))

# name -> (file name, file content (str or bytes), convert kwargs, expected line, expected field)
CONVERT_CASES = {
    "invalid_jsonl": ("a.jsonl", jsonl(OK, '{"messages": [', OK), {}, 2, None),
    "invalid_json_array": ("a.json", '[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]',
                           {}, 3, None),
    "gbk_encoding": ("a.csv", (HEADER + GOOD_ROW).encode("utf-8") + '"您好[SEP]取消",1,办理取消\n'.encode("gbk"),
                     {}, 3, None),
    "cmcc_missing_column": ("a.csv", 'sentence_sep,label_raw\n"您好[SEP]开通",办理开通\n', {"format": "cmcc"}, 1,
                            "c_numerical"),
    "csv_missing_text_col": ("a.csv", "text,label\n你好,好\n", {"text_col": "content", "format": "classification"},
                             1, "content"),
    "empty_turn": ("a.jsonl", jsonl(OK, msgs(("user", "  "), ("assistant", "嗯"))), {}, 2, "messages[0].content"),
    "assistant_first": ("a.jsonl", jsonl(msgs(("assistant", "嗯"), ("user", "你好"))), {}, 1, "messages[0].role"),
    "two_users": ("a.jsonl", jsonl(OK, OK, msgs(("user", "a"), ("user", "b"), ("assistant", "c"))), {}, 3,
                  "messages[1].role"),
    "system_not_first": ("a.jsonl", jsonl(msgs(("user", "a"), ("system", "s"), ("assistant", "c"))), {}, 1,
                         "messages[1].role"),
    "observation_without_call": ("a.jsonl", jsonl(msgs(("user", "a"), ("assistant", "b"), ("observation", "{}"),
                                                       ("assistant", "c"))), {}, 1, "messages[2].role"),
    "no_assistant": ("a.jsonl", jsonl(msgs(("system", "s"), ("user", "a"))), {}, 1, "messages"),
    "unknown_role": ("a.jsonl", jsonl({"messages": [{"role": "narrator", "content": "x"}]}), {}, 1,
                     "messages[0].role"),
    "label_not_in_map": ("a.csv", "text,label\n好评,pos\n差评,neg\n一般,meh\n", {"label_map": "MAP"}, 4, "label"),
    "empty_file": ("a.jsonl", "", {}, 1, None),
    "unknown_format": ("a.jsonl", jsonl(OK), {"format": "parquet"}, None, "format"),
    "undetectable_keys": ("a.jsonl", jsonl({"question": "a", "answer": "b"}), {}, 1, "format"),
    "cmcc_id_out_of_range": ("a.csv", HEADER + GOOD_ROW + '"您好[SEP]问题",34,办理开通\n', {}, 3, "c_numerical"),
    "cmcc_name_mismatch": ("a.csv", HEADER + GOOD_ROW + '"您好[SEP]问题",1,办理开通\n', {}, 3, "label_raw"),
    "cmcc_empty_dialogue": ("a.csv", HEADER + '"[SEP] [SEP]",7,办理开通\n', {}, 2, "sentence_sep"),
    "csv_too_many_fields": ("a.csv", HEADER + GOOD_ROW + '您好[SEP]开通,7,办理开通,多余\n', {}, 3, None),
    "sharegpt_unknown_speaker": ("a.jsonl", jsonl({"conversations": [{"from": "human", "value": "a"},
                                                                     {"from": "robot", "value": "b"}]}), {}, 1,
                                 "conversations[1].from"),
    "alpaca_bad_history": ("a.json", json.dumps([{"instruction": "a", "output": "b", "history": [["only one"]]}]),
                           {}, 1, "history[0]"),
    "json_not_a_list": ("a.json", "42", {}, 1, None),
    "jsonl_row_not_object": ("a.jsonl", jsonl(OK, "[1, 2]"), {}, 2, None),
    "content_not_string": ("a.jsonl", jsonl({"messages": [{"role": "user", "content": 3},
                                                          {"role": "assistant", "content": "b"}]}), {}, 1,
                           "messages[0].content"),
    "roleplay_without_persona": ("a.jsonl", jsonl({"conversation": [{"role": "user", "content": "a"},
                                                                    {"role": "assistant", "content": "b"}]}),
                                 {"format": "roleplay"}, 1, "persona"),
    "sharegpt_bad_function_call": ("a.jsonl", jsonl({"conversations": [{"from": "human", "value": "a"},
                                                                       {"from": "function_call", "value": "{oops"}]}),
                                   {}, 1, "conversations[1].value"),
}


def assert_names(err: InputError, file: Path, line: int | None, field: str | None) -> None:
    msg = str(err)
    assert str(file) in msg
    if line is not None:
        assert f"{file}:{line}:" in msg, msg
    if field is not None:
        assert f"field '{field}'" in msg, msg
    assert line is not None or field is not None


def assert_nothing_written(folder: Path, *outs: Path) -> None:
    for out in outs:
        assert not out.exists()
    assert not list(folder.rglob("*.tmp"))


@pytest.mark.parametrize("case", sorted(CONVERT_CASES))
def test_convert_rejects(case, tmp_path):
    name, content, kwargs, line, field = CONVERT_CASES[case]
    src = tmp_path / name
    (src.write_bytes if isinstance(content, bytes) else lambda c: src.write_text(c, encoding="utf-8"))(content)
    if kwargs.get("label_map") == "MAP":
        (tmp_path / "map.json").write_text(json.dumps({"pos": "正面", "neg": "负面"}), encoding="utf-8")
        kwargs = {**kwargs, "label_map": tmp_path / "map.json"}
    out = tmp_path / "out.jsonl"
    with pytest.raises(InputError) as e:
        convert_file(src, out, **kwargs)
    assert_names(e.value, src, line, field)
    assert_nothing_written(tmp_path, out)


def test_missing_file(tmp_path):
    out = tmp_path / "out.jsonl"
    with pytest.raises(InputError) as e:
        convert_file(tmp_path / "nope.jsonl", out)
    assert_names(e.value, tmp_path / "nope.jsonl", None, "path")
    assert_nothing_written(tmp_path, out)


def test_label_map_invalid_json(tmp_path):
    src = tmp_path / "a.csv"
    src.write_text("text,label\n好评,pos\n", encoding="utf-8")
    bad = tmp_path / "map.json"
    bad.write_text('{"pos": "正面",\n "neg": }', encoding="utf-8")
    with pytest.raises(InputError) as e:
        convert_file(src, tmp_path / "out.jsonl", label_map=bad)
    assert_names(e.value, bad, 2, None)
    assert_nothing_written(tmp_path, tmp_path / "out.jsonl")


def _good_jsonl(tmp_path: Path, n: int = 10) -> Path:
    src = tmp_path / "ok.jsonl"
    src.write_text(jsonl(*[{**msgs(("user", f"问题{i}"), ("assistant", f"回答{i}")), "label": i % 2}
                           for i in range(n)]), encoding="utf-8")
    return src


@pytest.mark.parametrize("ratios", ["8:x:1", "8:-1:1", "0:1:1", "1:1:1:1", "5"])
def test_bad_ratios(ratios, tmp_path):
    src = _good_jsonl(tmp_path)
    with pytest.raises(InputError) as e:
        split_file(src, tmp_path / "out", ratios=ratios)
    assert "field 'ratios'" in str(e.value)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_stratify_field_missing_names_line(tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text(jsonl({**OK, "label": 1}, {**OK, "label": 0}, OK, {**OK, "label": 1}), encoding="utf-8")
    with pytest.raises(InputError) as e:
        split_file(src, tmp_path / "out", ratios="1:1", stratify="label")
    assert_names(e.value, src, 3, "label")
    assert_nothing_written(tmp_path, tmp_path / "out" / "train.jsonl", tmp_path / "out" / "dev.jsonl")


def test_clean_bad_regex_leaves_nothing(tmp_path):
    src = _good_jsonl(tmp_path)
    out = tmp_path / "clean.jsonl"
    with pytest.raises(InputError) as e:
        clean_file(src, out, self_intro="([")
    assert "field 'self_intro'" in str(e.value)
    assert_nothing_written(tmp_path, out)


def test_output_over_input_refused(tmp_path):
    src = _good_jsonl(tmp_path)
    before = src.read_text(encoding="utf-8")
    with pytest.raises(InputError) as e:
        clean_file(src, src)
    assert_names(e.value, src, None, "out")
    assert src.read_text(encoding="utf-8") == before


REGISTRY_CASES = {
    "unknown_name": ("ok:\n  file: ok.jsonl\n", "missing_ds", None, "missing_ds"),
    "invalid_yaml": ("ok:\n  file: ok.jsonl\n  format: [messages\n", "ok", 4, None),
    "no_files": ("ok:\n  file: ok.jsonl\nbad:\n  format: messages\n", "bad", 3, "bad.files"),
    "unknown_format": ("bad:\n  file: ok.jsonl\n  format: xml\n", "bad", 1, "bad.format"),
    "missing_listed_file": ("ok:\n  file: ok.jsonl\nbad:\n  files: [ok.jsonl, gone.jsonl]\n", "bad", 3, "bad.files"),
    "unknown_key": ("bad:\n  file: ok.jsonl\n  colums: {text: a}\n", "bad", 1, "bad.colums"),
    "empty_registry": ("", "ok", 1, None),
}


@pytest.mark.parametrize("case", sorted(REGISTRY_CASES))
def test_registry_errors(case, tmp_path):
    text, name, line, field = REGISTRY_CASES[case]
    _good_jsonl(tmp_path)
    reg = tmp_path / "datasets.yaml"
    reg.write_text(text, encoding="utf-8")
    out = tmp_path / "out.jsonl"
    with pytest.raises(InputError) as e:
        convert_file(name, out, registry=reg)
    assert_names(e.value, reg, line, field)
    assert_nothing_written(tmp_path, out)


def test_registry_file_missing(tmp_path):
    with pytest.raises(InputError) as e:
        convert_file("ds", tmp_path / "out.jsonl", registry=tmp_path / "nope.yaml")
    assert_names(e.value, tmp_path / "nope.yaml", None, "registry")
