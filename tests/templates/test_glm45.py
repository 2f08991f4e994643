"""GLM-4.5+ templates against the official chat templates (tests/templates/official/, sources in their
headers): a battery of conversations renders byte-identically through glmtune and through transformers'
`apply_chat_template` with that template, and the ids are the GLM-4.5 tokenizer's ids of that text."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from glmtune.templates import IGNORE_INDEX, get_template

OFFICIAL = Path(__file__).parent / "official"
# family -> the official templates it renders (GLM-4.6 differs from 4.5 only where a call has no arguments)
JINJA = {"glm45": ["glm45_chat_template.jinja", "glm46_chat_template.jinja"], "glm47": ["glm47_chat_template.jinja"]}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "查询城市天气 (weather)",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "description": "Web search",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"},
                                                    "filters": {"type": "object"}}}}}


def call(name, arguments):
    return {"id": f"call_{name}", "type": "function", "function": {"name": name, "arguments": arguments}}


BATTERY = {  # id -> (messages, tools)
    "single": ([{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你？"}], None),
    "system-multiturn": ([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
        {"role": "user", "content": "And 2+2?\n  (explain)"}, {"role": "assistant", "content": "  4, because 2+2=4.\n"}],
        None),
    "reasoning-history-and-last": ([
        {"role": "user", "content": "Is 7 prime?"},
        {"role": "assistant", "content": "Yes.", "reasoning_content": "7 has no divisors but 1 and 7."},
        {"role": "user", "content": "And 9?"},
        {"role": "assistant", "content": "No: 9 = 3 × 3.", "reasoning_content": "\n 9 = 3*3.  \n"}], None),
    "inline-think": ([
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "<think>\nIt is Paris.\n</think>\n\nParis."},
        {"role": "user", "content": "Of Japan?"},
        {"role": "assistant", "content": "<think>Tokyo.</think>Tokyo."}], None),
    "empty-reasoning-string": ([
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>x</think>hello", "reasoning_content": ""}],
        None),
    "one-tool-call": ([
        {"role": "system", "content": "你是天气助手"},
        {"role": "user", "content": "北京明天天气？"},
        {"role": "assistant", "content": "", "reasoning_content": "Need the weather tool.",
         "tool_calls": [call("get_weather", {"city": "北京", "days": 1})]},
        {"role": "tool", "tool_call_id": "call_get_weather", "content": '{"temp": 21, "sky": "晴"}'},
        {"role": "assistant", "content": "明天北京晴，21 度。"}], [WEATHER]),
    "parallel-calls-string-arguments": ([
        {"role": "user", "content": "Weather in Paris and Rome, and search news."},
        {"role": "assistant", "content": "Checking both.",
         "tool_calls": [call("get_weather", '{"city": "Paris"}'), call("get_weather", '{"city": "Rome", "days": 3}'),
                        call("search", {"query": "news", "filters": {"lang": ["en", "fr"], "recent": True, "n": 2.5}})]},
        {"role": "tool", "content": "Paris: 18C"}, {"role": "tool", "content": "Rome: 25C"},
        {"role": "tool", "content": "[]"},
        {"role": "assistant", "content": "Paris 18C, Rome 25C; no news."}], [WEATHER, SEARCH]),
    "non-ascii-arguments": ([
        {"role": "user", "content": "查一下“东京”和 Zürich"},
        {"role": "assistant", "content": "", "tool_calls": [
            call("search", {"query": "東京 天気 😀", "filters": {"地区": "日本", "null": None}})]},
        {"role": "observation", "content": "结果：晴 ☀️"},
        {"role": "assistant", "content": "东京晴。", "reasoning_content": "读取结果。"}], [SEARCH]),
    "tools-no-system-and-no-call": ([
        {"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi"}], [WEATHER]),
    "call-then-user": ([
        {"role": "user", "content": "Rome?"},
        {"role": "assistant", "content": "", "reasoning_content": "old thought", "tool_calls": [call("get_weather", {"city": "Rome"})]},
        {"role": "tool", "content": "25C"}, {"role": "assistant", "content": "25C."},
        {"role": "user", "content": "Thanks /nothink"}, {"role": "assistant", "content": "You're welcome."}], [WEATHER]),
}
KWARGS = [{}, {"enable_thinking": False}]


def official_messages(messages):
    """The same conversation in the shape the official template reads: tool results as role 'tool',
    tool-call arguments as objects (it iterates `arguments.items()`)."""
    out = copy.deepcopy(messages)
    for msg in out:
        if msg["role"] == "observation":
            msg["role"] = "tool"
        for c in msg.get("tool_calls") or []:
            if isinstance(c["function"]["arguments"], str):
                c["function"]["arguments"] = json.loads(c["function"]["arguments"])
    return out


def official(tok, jinja_file, messages, tools, gen, **kwargs):
    template = (OFFICIAL / jinja_file).read_text(encoding="utf-8")
    return tok.apply_chat_template(official_messages(messages), chat_template=template, tools=tools, tokenize=False,
                                   add_generation_prompt=gen, **kwargs)


def cases():
    for family, files in JINJA.items():
        for jinja_file in files:
            for case, (messages, tools) in BATTERY.items():
                for kw in KWARGS + ([{"clear_thinking": False}] if family == "glm47" else []):
                    prompts = [False] + [t for t, m in enumerate(messages) if m["role"] != "assistant"
                                         and t + 1 < len(messages) and messages[t + 1]["role"] == "assistant"]
                    for gen in prompts:
                        name = "-".join([jinja_file.split("_")[0], case, *[f"{k}={v}" for k, v in kw.items()],
                                         f"prompt{gen}" if gen is not False else "full"])
                        yield pytest.param(family, jinja_file, case, kw, gen, id=name)


@pytest.mark.parametrize("family,jinja_file,case,kw,gen", list(cases()))
def test_battery_matches_official_template(family, jinja_file, case, kw, gen, glm45_tok):
    messages, tools = BATTERY[case]
    tpl = get_template(family, **kw)
    msgs = messages if gen is False else messages[:gen + 1]
    text = tpl.render(msgs, tools=tools, add_generation_prompt=gen is not False)
    assert text == official(glm45_tok, jinja_file, msgs, tools, gen is not False, **kw)
    if gen is False:
        ids = tpl.encode(glm45_tok, msgs, tools=tools, add_eos=False).input_ids
    else:
        ids = tpl.encode_prompt(glm45_tok, msgs, tools=tools)
    # template text is tokenized as the model's tokenizer does; message text never turns into control
    # tokens, so where a message spells one ("<think>" kept in content) only the decoded text agrees
    assert glm45_tok.decode(ids) == text
    if not any(tag in json.dumps(msgs, ensure_ascii=False) for tag in ("<think>", "</think>", "/nothink")):
        assert ids == glm45_tok(text, add_special_tokens=False)["input_ids"]


def test_glm45_tokenizer_has_the_official_ids(glm45_tok):
    ids = {t: glm45_tok.convert_tokens_to_ids(t) for t in
           ("<|endoftext|>", "[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "<|observation|>", "<think>",
            "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<arg_key>",
            "</arg_key>", "<arg_value>", "</arg_value>", "/nothink")}
    assert ids == {"<|endoftext|>": 151329, "[gMASK]": 151331, "<sop>": 151333, "<|user|>": 151336,
                   "<|assistant|>": 151337, "<|observation|>": 151338, "<think>": 151350, "</think>": 151351,
                   "<tool_call>": 151352, "</tool_call>": 151353, "<tool_response>": 151354,
                   "</tool_response>": 151355, "<arg_key>": 151356, "</arg_key>": 151357, "<arg_value>": 151358,
                   "</arg_value>": 151359, "/nothink": 151360}


def trained(tok, enc):
    return [tok.decode(enc.input_ids[a:b]) for a, b in enc.trained_spans()]


def test_glm45_trains_what_the_template_renders_for_the_assistant(glm45_tok):
    """Earlier turns' reasoning is dropped by the template, so it is not trained; the last turn's is."""
    messages, _ = BATTERY["reasoning-history-and-last"]
    enc = get_template("glm45").encode(glm45_tok, messages)
    assert trained(glm45_tok, enc) == ["\n<think></think>\nYes.<|user|>",
                                       "\n<think>9 = 3*3.</think>\nNo: 9 = 3 × 3.<|endoftext|>"]
    assert all(lab in (IGNORE_INDEX, tid) for lab, tid in zip(enc.labels, enc.input_ids))


def test_keep_reasoning_opts_a_turn_in(glm45_tok):
    messages = copy.deepcopy(BATTERY["reasoning-history-and-last"][0])
    messages[1]["keep_reasoning"] = True
    enc = get_template("glm45").encode(glm45_tok, messages)
    assert trained(glm45_tok, enc)[0] == "\n<think>7 has no divisors but 1 and 7.</think>\nYes.<|user|>"
    # glm47: the official clear_thinking=False keeps every turn's; keep_reasoning the marked ones
    msgs47 = BATTERY["reasoning-history-and-last"][0]
    assert trained(glm45_tok, get_template("glm47", clear_thinking=False).encode(glm45_tok, msgs47))[0] == \
        trained(glm45_tok, get_template("glm47").encode(glm45_tok, messages))[0] == \
        "7 has no divisors but 1 and 7.</think>Yes.<|user|>"


def test_tool_call_turn_ends_with_observation_token(glm45_tok):
    messages, tools = BATTERY["one-tool-call"]
    enc = get_template("glm45").encode(glm45_tok, messages[:3], tools=tools)
    assert trained(glm45_tok, enc) == [
        "\n<think>Need the weather tool.</think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
        "<arg_value>北京</arg_value>\n<arg_key>days</arg_key>\n<arg_value>1</arg_value>\n</tool_call><|observation|>"]


@pytest.mark.parametrize("family", ["glm45", "glm47"])
@pytest.mark.parametrize("thinking", [True, False])
def test_prompt_is_prefix_and_trained_ids_follow_it(family, thinking, glm45_tok):
    """Training ids of an answer = the generation prompt + what the model writes after it."""
    messages, tools = BATTERY["one-tool-call"]
    tpl = get_template(family, enable_thinking=thinking)
    enc = tpl.encode(glm45_tok, messages, tools=tools)
    for turn, (start, _) in zip([2, 4], enc.turn_spans):
        prompt = tpl.encode_prompt(glm45_tok, messages[:turn], tools=tools)
        reasoning = bool(messages[turn].get("reasoning_content"))
        if reasoning == thinking or (family == "glm45" and thinking):
            assert enc.input_ids[:start] == prompt
        else:  # e.g. GLM-4.7 prompts `<think>` but renders a turn without reasoning `</think>answer`
            assert enc.input_ids[:start] != prompt


def test_no_thinking_prompt_trains_no_empty_block(glm45_tok):
    tpl = get_template("glm45", enable_thinking=False)
    msgs = [{"role": "user", "content": "hi"}]
    ids = tpl.answer_ids(glm45_tok, msgs, "hello")
    assert glm45_tok.decode(ids) == "\nhello<|endoftext|>"
    assert tpl.render(msgs, add_generation_prompt=True) == "[gMASK]<sop><|user|>\nhi/nothink<|assistant|>\n<think></think>"


def test_options_and_tool_call_errors():
    from glmtune.errors import InputError

    with pytest.raises(InputError, match="no option 'clear_thinking'"):
        get_template("glm45", clear_thinking=False)
    with pytest.raises(InputError, match="no option 'enable_thinking'"):
        get_template("glm4").variant(enable_thinking=False)
    assert get_template("glm47").variant(enable_thinking=False).render(
        [{"role": "user", "content": "x"}], add_generation_prompt=True).endswith("<|assistant|></think>")
    bad = [{"role": "user", "content": "x"},
           {"role": "assistant", "content": "", "tool_calls": [call("f", "{not json")]}]
    with pytest.raises(InputError, match="not valid JSON") as e:
        get_template("glm45").render(bad)
    assert e.value.field == "messages[1].tool_calls[0].function.arguments"
    with pytest.raises(InputError, match="must be an object"):
        get_template("glm45").render([bad[0], {**bad[1], "tool_calls": [call("f", "[1, 2]")]}])


@pytest.mark.parametrize("family", ["glm45", "glm47"])
def test_cutoff_truncates_dialogue_and_keeps_the_last_answer(family, glm45_tok):
    """Training's overflow policy (glmtune.data.cutoff) walks these segments too: old dialogue text is cut,
    control tokens and the last answer are kept whole."""
    from glmtune.data.cutoff import fit_records

    messages, tools = BATTERY["call-then-user"]
    long = copy.deepcopy(messages)
    long[0]["content"] = "Rome? " + "very long question " * 40
    tpl = get_template(family)
    full = tpl.encode(glm45_tok, long, tools=tools)
    (example,), report = fit_records([{"messages": long, "tools": tools}], tpl, glm45_tok, len(full) - 50)
    assert report.truncated == 1 and len(example.input_ids) <= len(full) - 50
    last = full.turn_spans[-1]
    answer = full.input_ids[last[0]:last[1]]
    assert example.input_ids[-len(answer):] == answer
    assert [t for t in example.labels if t != IGNORE_INDEX][-len(answer):] == answer
    for token in ("<tool_call>", "</tool_call>", "<|observation|>", "<tool_response>"):
        tid = glm45_tok.convert_tokens_to_ids(token)
        assert example.input_ids.count(tid) == full.input_ids.count(tid)
