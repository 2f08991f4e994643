"""Each reader turns its format into validated canonical records with meta source/line."""
from __future__ import annotations

import json

import pytest

from cmcc_fixture import write_cmcc_csv
from glmtune.data.cmcc import CMCC_INTENTS, cmcc_answer, cmcc_system_prompt, parse_intent
from glmtune.data.readers import read_records
from glmtune.data.sample import sample_path


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def roles(rec):
    return [m["role"] for m in rec["messages"]]


def test_cmcc_csv_becomes_classification_prompt(tmp_path):
    recs = read_records(write_cmcc_csv(tmp_path / "c.csv", per_label=1))
    assert len(recs) == 34
    rec = next(r for r in recs if r["label"] == 7)
    assert roles(rec) == ["system", "user", "assistant"]
    assert rec["messages"][2]["content"] == "意图：7：办理开通" == cmcc_answer(7)
    assert rec["messages"][0]["content"] == cmcc_system_prompt()
    assert "33：咨询（含查询）电商货品信息" in rec["messages"][0]["content"]
    assert "[SEP]" not in rec["messages"][1]["content"] and rec["messages"][1]["content"].startswith("您好请讲\n")
    assert rec["meta"]["source"].endswith("c.csv") and rec["meta"]["line"] == 9  # header + 7 rows before it
    assert parse_intent(rec["messages"][2]["content"]) == 7


def test_parse_intent_by_name():
    assert parse_intent("我觉得是办理开通") == 7
    assert parse_intent("意图：99：什么") is None or parse_intent("意图：99：什么") in CMCC_INTENTS


def test_csv_with_columns_label_map_and_system_file(tmp_path):
    src = write(tmp_path / "r.csv", "review,stars\n很好用,5\n太差了,1\n")
    write(tmp_path / "map.yaml", "'5': 好评\n'1': 差评\n")
    write(tmp_path / "sys.txt", "判断评论的情感。\n")
    recs = read_records(src, "csv", text_col="review", label_col="stars", label_map=tmp_path / "map.yaml",
                        system_file=tmp_path / "sys.txt")
    assert [r["label"] for r in recs] == ["好评", "差评"]
    assert recs[0]["messages"] == [{"role": "system", "content": "判断评论的情感。"},
                                   {"role": "user", "content": "很好用"}, {"role": "assistant", "content": "好评"}]
    assert [r["meta"]["line"] for r in recs] == [2, 3]


def test_label_map_as_txt_list(tmp_path):
    src = write(tmp_path / "r.csv", "text,label\n好,1\n坏,0\n")
    write(tmp_path / "labels.txt", "负面\n正面\n")
    recs = read_records(src, label_map=tmp_path / "labels.txt")
    assert [r["label"] for r in recs] == ["正面", "负面"]


def test_alpaca_with_history_and_system(tmp_path):
    src = write(tmp_path / "a.json", json.dumps([
        {"instruction": "翻译", "input": "hello", "output": "你好", "system": "你是翻译", "history": [["在吗", "在"]]},
    ], ensure_ascii=False))
    (rec,) = read_records(src)
    assert roles(rec) == ["system", "user", "assistant", "user", "assistant"]
    assert rec["messages"][3]["content"] == "翻译\nhello"
    assert rec["meta"]["line"] == 1


def test_sharegpt_with_function_call_and_observation(tmp_path):
    row = {"conversations": [{"from": "human", "value": "北京天气"},
                             {"from": "function_call", "value": json.dumps({"name": "weather", "arguments": {"city": "北京"}})},
                             {"from": "observation", "value": "{\"temp\": 20}"},
                             {"from": "gpt", "value": "北京20度"}],
           "system": "你是助手", "tools": json.dumps([{"type": "function", "function": {"name": "weather"}}])}
    (rec,) = read_records(write(tmp_path / "s.jsonl", json.dumps(row, ensure_ascii=False) + "\n"))
    assert roles(rec) == ["system", "user", "assistant", "observation", "assistant"]
    assert rec["messages"][2]["tool_calls"][0]["function"]["name"] == "weather"
    assert rec["tools"][0]["function"]["name"] == "weather"


def test_messages_jsonl_keeps_tools_and_label(tmp_path):
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
           "tools": [{"type": "function", "function": {"name": "f"}}], "label": 3}
    (rec,) = read_records(write(tmp_path / "m.jsonl", "\n" + json.dumps(row) + "\n"))
    assert rec["tools"] == row["tools"] and rec["label"] == 3 and rec["meta"]["line"] == 2


def test_prompt_completion_single_turn(tmp_path):
    (rec,) = read_records(write(tmp_path / "p.jsonl", '{"prompt": "1+1", "completion": "2"}\n'))
    assert rec["messages"] == [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]


def test_conversation_lists_in_three_shapes(tmp_path):
    rows = [{"conversation": [{"human": "a", "assistant": "b"}, {"human": "c", "assistant": "d"}]},
            {"conversation": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            {"conversation": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}], "system": "s"}]
    recs = read_records(write(tmp_path / "c.jsonl", "".join(json.dumps(r) + "\n" for r in rows)))
    assert roles(recs[0]) == ["user", "assistant", "user", "assistant"]
    assert roles(recs[2]) == ["system", "user", "assistant"]


def test_roleplay_persona_and_system_file(tmp_path):
    row = {"persona": "你是书店老板", "conversation": [{"role": "user", "content": "有书吗"},
                                                  {"role": "assistant", "content": "有的"}]}
    (rec,) = read_records(write(tmp_path / "r.jsonl", json.dumps(row, ensure_ascii=False) + "\n"))
    assert rec["messages"][0] == {"role": "system", "content": "你是书店老板"}
    write(tmp_path / "sys.txt", "你是猫")
    row2 = {"conversation": row["conversation"]}
    (rec2,) = read_records(write(tmp_path / "r2.jsonl", json.dumps(row2, ensure_ascii=False) + "\n"), "roleplay",
                           system_file=tmp_path / "sys.txt")
    assert rec2["messages"][0]["content"] == "你是猫"


def test_json_list_line_numbers_and_jsonl_in_json(tmp_path):
    src = write(tmp_path / "x.json", '[\n  {"prompt": "a", "completion": "b"},\n\n  {"prompt": "c", "completion": "d"}\n]')
    assert [r["meta"]["line"] for r in read_records(src)] == [2, 4]
    src2 = write(tmp_path / "y.json", '{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n')
    assert len(read_records(src2)) == 2


def test_columns_mapping_renames_keys(tmp_path):
    src = write(tmp_path / "q.jsonl", '{"question": "a", "answer": "b"}\n')
    (rec,) = read_records(src, "prompt_completion", columns={"prompt": "question", "completion": "answer"})
    assert rec["messages"][1]["content"] == "b"


def test_reading_converted_output_keeps_origin(tmp_path):
    from glmtune.io import write_jsonl_atomic
    recs = read_records(write(tmp_path / "p.jsonl", '{"prompt": "a", "completion": "b"}\n'))
    write_jsonl_atomic(tmp_path / "out.jsonl", recs)
    (again,) = read_records(tmp_path / "out.jsonl")
    assert again["meta"]["origin"].endswith("p.jsonl:1") and again["meta"]["source"].endswith("out.jsonl")


@pytest.mark.parametrize("name,count", [("cmcc34", 204), ("roleplay", 10)])
def test_builtin_samples_read(name, count):
    recs = read_records(sample_path(name))
    assert len(recs) == count
    if name == "cmcc34":
        assert {r["label"] for r in recs} == set(range(34))


def test_unclosed_csv_quote_is_reported_where_it_opens(tmp_path):
    """The quote on line 2 swallowed the rest of the file: it was "line 4: fewer fields than the header"."""
    import os
    import subprocess
    import sys

    from glmtune.errors import InputError

    write(tmp_path / "bad.csv", 'text,label\n"hello,a\nfoo,b\nbar,c\n')
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run([sys.executable, "-m", "glmtune", "data", "convert", "bad.csv", "--out", "x.jsonl"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == ('error: bad.csv:2: a quoted field opens on this line and is never closed. '
                                   'Fix: close the quote, or double a quote meant literally ("")')
    with pytest.raises(InputError, match="never closed") as e:  # further down, after good rows and a blank line
        read_records(write(tmp_path / "late.csv", 'text,label\nok,a\n\nfine,b\nbad,"c\n'))
    assert e.value.line == 5
    # a closed multi-line cell, a blank line and a short row read as before (line = where the row ends)
    recs = read_records(write(tmp_path / "ok.csv", 'text,label\n"two\nlines",a\n\nplain,b\n'))
    assert [(r["meta"]["line"], r["messages"][0]["content"], r["label"]) for r in recs] == \
        [(3, "two\nlines", "a"), (5, "plain", "b")]
    with pytest.raises(InputError, match=r"fewer fields than the header \(missing label\)") as e:
        read_records(write(tmp_path / "short.csv", "text,label\nok,a\nbad\n"))
    assert e.value.line == 3 and e.value.field == "label"
