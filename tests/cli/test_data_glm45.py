"""GLM-4.5+ records through `glmtune data`: convert (sharegpt function_call/observation, OpenAI messages with
tool_calls and reasoning_content), validation, stats (reasoning tokens), render --plain/--no-thinking/--ids."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import glmtune.cli.data  # noqa: F401  (registers the `data` group)
from glmtune.cli.main import app
from glmtune.data.readers import read_records
from glmtune.errors import InputError
from glmtune.models.tokenizer import load_tokenizer
from glmtune.templates import get_template

runner = CliRunner()
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "天气",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
OPENAI = {"tools": TOOLS, "messages": [
    {"role": "system", "content": "你是天气助手"},
    {"role": "user", "content": "北京呢？"},
    {"role": "assistant", "content": None, "reasoning_content": "查北京。",
     "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "晴"},
    {"role": "assistant", "content": "北京晴。", "reasoning_content": "结果是晴。"},
    {"role": "user", "content": "上海呢？"},
    {"role": "assistant", "content": "<think>再查上海。</think>上海多云。"}]}
SHAREGPT = {"tools": json.dumps(TOOLS, ensure_ascii=False), "conversations": [
    {"from": "human", "value": "北京和上海？"},
    {"from": "function_call", "value": json.dumps([{"name": "get_weather", "arguments": {"city": "北京"}},
                                                   {"name": "get_weather", "arguments": {"city": "上海"}}], ensure_ascii=False)},
    {"from": "observation", "value": "北京晴"}, {"from": "observation", "value": "上海雨"},
    {"from": "gpt", "value": "北京晴，上海雨。"}]}


def invoke(*args):
    result = runner.invoke(app, ["data", *map(str, args)])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result


PARALLEL = {"tools": TOOLS, "messages": [  # SHAREGPT in canonical form
    {"role": "user", "content": "北京和上海？"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}},
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "上海"}}}]},
    {"role": "observation", "content": "北京晴"}, {"role": "observation", "content": "上海雨"},
    {"role": "assistant", "content": "北京晴，上海雨。"}]}


@pytest.fixture
def files(tmp_path):
    src = tmp_path / "raw.jsonl"
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in (OPENAI, PARALLEL)) + "\n", encoding="utf-8")
    return tmp_path


def test_convert_keeps_calls_reasoning_and_tool_results(files):
    (files / "openai.jsonl").write_text(json.dumps(OPENAI, ensure_ascii=False) + "\n", encoding="utf-8")
    (files / "sharegpt.jsonl").write_text(json.dumps(SHAREGPT, ensure_ascii=False) + "\n", encoding="utf-8")
    invoke("convert", files / "openai.jsonl", "--out", files / "a.jsonl")
    invoke("convert", files / "sharegpt.jsonl", "--out", files / "b.jsonl")
    a, = read_records(files / "a.jsonl")
    assert a["messages"][2]["reasoning_content"] == "查北京。" and a["messages"][2]["content"] == ""
    assert a["messages"][2]["tool_calls"][0]["function"]["arguments"] == '{"city": "北京"}'
    assert a["messages"][3] == {"role": "tool", "tool_call_id": "c1", "content": "晴"} and a["tools"] == TOOLS
    b, = read_records(files / "b.jsonl")
    assert {k: v for k, v in b.items() if k != "meta"} == PARALLEL
    # a record-level keep_reasoning opts every assistant turn in (a turn's own false wins)
    opted = {**OPENAI, "keep_reasoning": True}
    opted["messages"] = [*OPENAI["messages"][:4], {**OPENAI["messages"][4], "keep_reasoning": False}, *OPENAI["messages"][5:]]
    (files / "opted.jsonl").write_text(json.dumps(opted, ensure_ascii=False) + "\n", encoding="utf-8")
    c, = read_records(files / "opted.jsonl")
    assert [m.get("keep_reasoning") for m in c["messages"]] == [None, None, True, None, False, None, True]
    text = get_template("glm45").render(c["messages"], tools=TOOLS)
    assert "\n<think>查北京。</think>" in text and "<think>结果是晴。</think>" not in text


def test_bad_calls_and_reasoning_name_file_line_and_field(tmp_path):
    bad = json.loads(json.dumps(OPENAI))
    bad["messages"][2]["tool_calls"][0]["function"]["arguments"] = "{city: 北京}"
    ok = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning_content": 3}]}
    (tmp_path / "bad.jsonl").write_text(json.dumps(OPENAI, ensure_ascii=False) + "\n" + json.dumps(bad, ensure_ascii=False)
                                        + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"bad.jsonl:2: field 'messages\[2\].tool_calls\[0\].function.arguments': "
                                         r"tool call arguments are not valid JSON"):
        read_records(tmp_path / "bad.jsonl")
    (tmp_path / "bad2.jsonl").write_text(json.dumps(ok) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"bad2.jsonl:1: field 'messages\[1\].reasoning_content': reasoning_content "
                                         r"must be text, got int"):
        read_records(tmp_path / "bad2.jsonl")


def test_render_plain_no_thinking_and_ids_are_training_ids(files, glm45_tokenizer_dir):
    f = files / "raw.jsonl"
    plain = invoke("render", f, "--template", "glm45", "--plain").stdout
    assert plain == get_template("glm45").render(OPENAI["messages"], tools=TOOLS)
    assert "<|assistant|>\n<think></think>\n北京晴。<|user|>" in plain  # history reasoning dropped
    assert plain.endswith("<|assistant|>\n<think>再查上海。</think>\n上海多云。")
    gen = invoke("render", f, "--template", "glm45", "--plain", "--add-generation-prompt", "--no-thinking").stdout
    assert gen.endswith("<|user|>\n上海呢？/nothink<|assistant|>\n<think></think>")
    ids = json.loads(invoke("render", f, "--template", "glm45", "--tokenizer", glm45_tokenizer_dir, "--ids").stdout)
    tok = load_tokenizer(glm45_tokenizer_dir)
    assert ids == get_template("glm45").encode(tok, OPENAI["messages"], tools=TOOLS).input_ids
    assert tok.decode(ids) == plain + "<|endoftext|>"
    marked = invoke("render", f, "--template", "glm47", "--tokenizer", glm45_tokenizer_dir, "--index", "1").stdout
    assert "[[" in marked or "\x1b[" in marked
    result = runner.invoke(app, ["data", "render", str(f), "--template", "glm45", "--ids"])
    assert result.exit_code != 0 and "--tokenizer" in str(result.exception or result.output)


def test_stats_count_reasoning_tokens_and_dropped_turns(files, glm45_tokenizer_dir):
    out = invoke("stats", files / "raw.jsonl", "--template", "glm45", "--tokenizer", glm45_tokenizer_dir, "--json")
    stats = json.loads(out.stdout)
    tok = load_tokenizer(glm45_tokenizer_dir)
    # rendered: the last turn's inline reasoning only; left out: the two earlier turns' reasoning_content
    assert stats["reasoning_tokens"] == len(tok("再查上海。", add_special_tokens=False)["input_ids"])
    assert stats["reasoning_dropped"] == 2
    table = invoke("stats", files / "raw.jsonl", "--template", "glm45", "--tokenizer", glm45_tokenizer_dir).output
    assert "reasoning tokens / turns left out" in table
