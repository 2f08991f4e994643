"""A model that speaks GLM-4.5 (glm45 template, GLM-4.5 tokenizer; a tiny GLM-4-architecture model trained
here to think and call a tool) served with the real openai client: `reasoning_content` comes back apart from
the content and XML tool calls as OpenAI `tool_calls`, streamed too; `Predictor.chat_message` agrees."""
from __future__ import annotations

import json

import openai
import pytest

from conftest import API_KEY, LiveServer
from tiny_trained import GLM45_CALL, WEATHER_TOOLS, trained_tiny_glm45

ASK = [{"role": "user", "content": "北京天气？"}]


@pytest.fixture(scope="module")
def predictor(tmp_path_factory, glm45_tokenizer_dir):
    from glmtune import Predictor

    return Predictor(trained_tiny_glm45(tmp_path_factory.mktemp("glm45"), glm45_tokenizer_dir), max_new_tokens=64)


@pytest.fixture(scope="module")
def client(predictor):
    from glmtune.serve.app import create_app

    with LiveServer(create_app(predictor, api_key=API_KEY, timeout=60, model_name="tiny45")) as live:
        yield openai.OpenAI(base_url=f"{live.url}/v1", api_key=API_KEY, max_retries=0)


def test_tool_call_and_reasoning_come_back_parsed(client, predictor):
    r = client.chat.completions.create(model="tiny45", messages=ASK, tools=WEATHER_TOOLS)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert msg.model_extra["reasoning_content"] == "需要查天气。" and msg.content == ""
    assert [(c.function.name, json.loads(c.function.arguments), c.type) for c in msg.tool_calls] == \
        [("get_weather", {"city": "北京"}, "function")]
    assert msg.tool_calls[0].id.startswith("call_")
    # the raw answer is GLM's XML; Predictor reads it back the same way
    raw = predictor.chat(ASK, tools=WEATHER_TOOLS)
    assert "<tool_call>get_weather" in raw and "<arg_value>北京</arg_value>" in raw
    mine = predictor.chat_message(ASK, tools=WEATHER_TOOLS)
    assert (mine["content"], mine["reasoning_content"], mine["tool_calls"][0]["function"]) == \
        (msg.content, "需要查天气。", {"name": "get_weather", "arguments": msg.tool_calls[0].function.arguments})


def test_streamed_deltas_add_up_to_the_same_message(client):
    whole = client.chat.completions.create(model="tiny45", messages=ASK, tools=WEATHER_TOOLS).choices[0].message
    chunks = list(client.chat.completions.create(model="tiny45", messages=ASK, tools=WEATHER_TOOLS, stream=True))
    reasoning = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    calls = [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
    assert (reasoning, content) == (whole.model_extra["reasoning_content"], whole.content)
    assert [(t.index, t.function.name, t.function.arguments) for t in calls] == \
        [(0, "get_weather", whole.tool_calls[0].function.arguments)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_result_round_trip_in_openai_shape(client):
    """The client sends back the assistant's tool call (arguments as a JSON string) with its reasoning and
    the tool's result; the server renders them as in training and the model answers."""
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "北京"}, ensure_ascii=False)}}
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [call],
                       "reasoning_content": GLM45_CALL["reasoning_content"]},
                      {"role": "tool", "tool_call_id": "call_1", "content": "晴，25 度"}]
    r = client.chat.completions.create(model="tiny45", messages=messages, tools=WEATHER_TOOLS)
    assert r.choices[0].message.content == "北京晴，25 度。"
    assert r.choices[0].message.model_extra["reasoning_content"] == "工具说晴。"
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls


def test_chat_template_kwargs(client, predictor):
    r = client.chat.completions.create(model="tiny45", messages=[{"role": "user", "content": "你好"}],
                                       extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert r.choices[0].finish_reason in ("stop", "length")
    off = predictor.template.variant(enable_thinking=False)
    assert off.render([{"role": "user", "content": "你好"}], add_generation_prompt=True).endswith(
        "你好/nothink<|assistant|>\n<think></think>")
    with pytest.raises(openai.BadRequestError, match="no option 'clear_thinking'"):
        client.chat.completions.create(model="tiny45", messages=ASK,
                                       extra_body={"chat_template_kwargs": {"clear_thinking": False}})
    r = client.chat.completions.create(model="tiny45", messages=[{"role": "user", "content": "你好"}])
    assert (r.choices[0].message.content, r.choices[0].message.model_extra["reasoning_content"]) == ("你好！", "打招呼。")
