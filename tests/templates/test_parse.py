"""Reading GLM-4.5+ output back: what a template renders after its generation prompt parses back into the
message it came from (reasoning, content, tool calls), whole and streamed in any pieces."""
from __future__ import annotations

import json

import pytest

from glmtune.templates import get_template
from glmtune.templates.parse import GLMStreamParser, parse_glm_output

PROMPT = [{"role": "user", "content": "北京和上海的天气？"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                     "code": {"type": "string"}}}}}]
ANSWERS = [
    {"role": "assistant", "content": "你好！", "reasoning_content": "用户在打招呼。"},
    {"role": "assistant", "content": "Plain answer, no reasoning.\n\nSecond paragraph."},
    {"role": "assistant", "content": "Let me check.", "reasoning_content": "Two cities: two calls.",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京", "days": 2}}},
                    {"type": "function", "function": {"name": "get_weather",
                                                      "arguments": {"city": "上海", "code": "021", "extra": [1, {"a": None}]}}}]},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                                                         "arguments": {"city": "x < y"}}}]},
]


def model_output(tpl, answer):
    """The text the model writes after the generation prompt for ``answer`` (end token excluded)."""
    full = tpl.render([*PROMPT, answer], tools=TOOLS)
    prompt = tpl.render(PROMPT, tools=TOOLS, add_generation_prompt=True)
    assert full.startswith(prompt)
    return full[len(prompt):]


def expected(answer, thinking_shown):
    calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
             for c in answer.get("tool_calls", [])]
    return answer["content"].strip(), answer.get("reasoning_content", "") if thinking_shown else "", calls


def comparable(msg):
    calls = [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
             for c in msg.get("tool_calls", [])]
    return msg["content"], msg["reasoning_content"] or "", calls


@pytest.mark.parametrize("family", ["glm45", "glm47"])
@pytest.mark.parametrize("index", range(len(ANSWERS)))
def test_parse_inverts_the_template(family, index):
    tpl, answer = get_template(family), ANSWERS[index]
    if family == "glm47" and not answer.get("reasoning_content"):
        answer = {**answer, "reasoning_content": "r"}  # GLM-4.7 thinks first (its prompt ends in <think>)
    text = model_output(tpl, answer)
    msg = tpl.parse_output(text, tools=TOOLS)
    assert comparable(msg) == expected(answer, True)
    assert msg["role"] == "assistant"
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in msg.get("tool_calls", []))


@pytest.mark.parametrize("family", ["glm45", "glm47"])
@pytest.mark.parametrize("index", range(len(ANSWERS)))
@pytest.mark.parametrize("size", [1, 3, 7, 1000])
def test_stream_deltas_join_to_the_whole_parse(family, index, size):
    tpl = get_template(family)
    answer = ANSWERS[index] if family == "glm45" else {**ANSWERS[index], "reasoning_content": "r r"}
    text = model_output(tpl, answer)
    parser = tpl.output_stream(tools=TOOLS)
    deltas = []
    for start in range(0, len(text), size):
        deltas += parser.feed(text[start:start + size])
    deltas += parser.finish()
    joined = {"reasoning_content": "", "content": "", "tool_calls": []}
    for d in deltas:
        assert len(d) == 1
        key, value = next(iter(d.items()))
        joined[key] += value
    whole = tpl.parse_output(text, tools=TOOLS)
    assert joined["content"] == whole["content"]
    assert joined["reasoning_content"] == (whole["reasoning_content"] or "")
    assert [c["function"] for c in joined["tool_calls"]] == [c["function"] for c in whole.get("tool_calls", [])]
    assert [c["index"] for c in joined["tool_calls"]] == list(range(len(joined["tool_calls"])))


def test_stream_holds_back_a_partial_tag_and_trailing_space():
    p = GLMStreamParser()
    assert p.feed("\n<thi") == []
    assert p.feed("nk>Step ") == [{"reasoning_content": "Step"}]
    assert p.feed("one</think>\nHi ") == [{"reasoning_content": " one"}, {"content": "Hi"}]
    assert p.feed("there<tool_") == [{"content": " there"}]
    assert p.feed("call>f\n<arg_key>a</arg_key>\n<arg_value>1</arg_value>\n</tool_call>")[0]["tool_calls"][0][
        "function"] == {"name": "f", "arguments": '{"a": 1}'}
    assert p.finish() == []
    assert p.message()["tool_calls"] == p.calls


def test_argument_values_follow_the_tool_schema():
    text = ("<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>42</arg_value>\n<arg_key>days</arg_key>\n"
            "<arg_value>3</arg_value>\n<arg_key>other</arg_key>\n<arg_value>not json</arg_value>\n</tool_call>")
    args = json.loads(parse_glm_output(text, tools=TOOLS)["tool_calls"][0]["function"]["arguments"])
    assert args == {"city": "42", "days": 3, "other": "not json"}
    # without a schema a value that reads as JSON is JSON
    assert json.loads(parse_glm_output(text)["tool_calls"][0]["function"]["arguments"])["city"] == 42


def test_unfinished_output():
    # cut while thinking (max tokens): it is all reasoning; an unclosed call is not a call
    assert parse_glm_output("\n<think>still going", tools=TOOLS) == {
        "role": "assistant", "content": "", "reasoning_content": "still going"}
    msg = parse_glm_output("Answer<tool_call>get_weather<arg_key>city")
    assert msg["content"] == "Answer" and "tool_calls" not in msg
    assert get_template("glm47").parse_output("plan</think>done")["reasoning_content"] == "plan"
    assert get_template("glm47", enable_thinking=False).parse_output("done") == {
        "role": "assistant", "content": "done", "reasoning_content": None}
    assert get_template("qwen").parse_output("<think>x</think>y") == {"role": "assistant", "content": "<think>x</think>y"}
