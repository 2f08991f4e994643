"""glmz1 (GLM-Z1-9B/32B-0414) against its official chat template (tests/templates/official/glmz1_chat_template.jinja,
source in its header), on the GLM-4.5 battery plus Z1's own quirks, with the GLM-4 tokenizer (Z1 ships the
GLM-4-0414 vocabulary: `<think>` is text there, not a special token).

The oracle: every generation prompt is the official template's, byte for byte and id for id. A whole
conversation is the official rendering with one documented change: the assistant message(s) ending it carry
their reasoning as the model writes it after the prompt (`\\n<think>` + `{reasoning}</think>{answer}`), where
the official template drops it; the test puts a marker where the template writes such an answer and swaps it."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from glmtune.templates import IGNORE_INDEX, get_template
from glmtune.templates.glm45 import split_reasoning
from test_glm45 import BATTERY, SEARCH, WEATHER, call

OFFICIAL = (Path(__file__).parent / "official" / "glmz1_chat_template.jinja").read_text(encoding="utf-8")
MARK = "\x00answer{}\x00"

Z1_BATTERY = {**BATTERY,
    "whitespace-and-think-in-every-role": ([
        {"role": "system", "content": "  Keep   spaces </think> here \n"},
        {"role": "user", "content": "  what is </think> this?  "},
        {"role": "assistant", "content": "\n\n It is a tag.  \n"},
        {"role": "user", "content": ""},
        {"role": "assistant", "content": ""}], None),
    "bare-function-tools": ([
        {"role": "user", "content": "搜一下"},
        {"role": "assistant", "content": "好的", "tool_calls": [call("search", {"query": "x"})]},
        {"role": "observation", "content": "  结果 \n"},
        {"role": "assistant", "content": "找到了。", "reasoning_content": "读结果"}],
        [SEARCH["function"], WEATHER]),
}


def official_messages(messages):
    """The conversation as the official template reads it: tool calls as GLM-4 `metadata` turns (name, JSON
    arguments), tool results as `observation`; each answer ending the conversation replaced by a marker."""
    last_other = max((i for i, m in enumerate(messages) if m["role"] != "assistant"), default=-1)
    out, reasoning = [], {}
    for turn, msg in enumerate(copy.deepcopy(messages)):
        role = "observation" if msg["role"] == "tool" else msg["role"]
        if role != "assistant":
            out.append({"role": role, "content": msg["content"]})
            continue
        if turn > last_other and not (msg.get("tool_calls") and not msg["content"]):
            reasoning[len(reasoning)] = split_reasoning(msg)[0].strip()
            answer = msg["content"].split("</think>")[-1].strip()
            out.append({"role": "assistant", "content": MARK.format(len(reasoning) - 1) + answer})
        elif not msg.get("tool_calls") or msg["content"]:
            out.append({"role": "assistant", "content": msg["content"]})
        for c in msg.get("tool_calls") or []:
            args = c["function"]["arguments"]
            out.append({"role": "assistant", "metadata": c["function"]["name"],
                        "content": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)})
    return out, reasoning


def official(tok, messages, tools, gen):
    msgs, reasoning = official_messages(messages)
    text = tok.apply_chat_template(msgs, chat_template=OFFICIAL, tools=tools, tokenize=False,
                                   add_generation_prompt=gen)
    for k, r in reasoning.items():
        text = text.replace("\n" + MARK.format(k), f"\n<think>{r}</think>")
    return text


def prompt_ends(messages):
    return [t for t, m in enumerate(messages) if m["role"] != "assistant"
            and t + 1 < len(messages) and messages[t + 1]["role"] == "assistant"]


@pytest.mark.parametrize("case", sorted(Z1_BATTERY))
def test_prompts_are_the_official_templates(case, glm4_tok):
    messages, tools = Z1_BATTERY[case]
    tpl = get_template("glmz1")
    for t in prompt_ends(messages):
        text = tpl.render(messages[:t + 1], tools=tools, add_generation_prompt=True)
        assert text == official(glm4_tok, messages[:t + 1], tools, True)
        assert text.endswith("<|assistant|>\n<think>")
        # the served prompt's ids are what the tokenizer makes of the official text
        assert tpl.encode_prompt(glm4_tok, messages[:t + 1], tools=tools) == \
            glm4_tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("case", sorted(Z1_BATTERY))
def test_conversations_render_as_official_plus_the_final_thinking(case, glm4_tok):
    messages, tools = Z1_BATTERY[case]
    tpl = get_template("glmz1")
    text = tpl.render(messages, tools=tools)
    assert text == official(glm4_tok, messages, tools, False)
    assert glm4_tok.decode(tpl.encode(glm4_tok, messages, tools=tools, add_eos=False).input_ids) == text


def test_the_final_answer_is_what_the_model_writes_after_the_served_prompt(glm4_tok):
    """Training = the served prompt's ids + the answer the model writes; history reasoning is not trained."""
    messages, _ = BATTERY["reasoning-history-and-last"]
    tpl = get_template("glmz1")
    enc = tpl.encode(glm4_tok, messages)
    trained = [glm4_tok.decode(enc.input_ids[a:b]) for a, b in enc.trained_spans()]
    assert trained == ["\nYes.<|user|>", "9 = 3*3.</think>No: 9 = 3 × 3.<|endoftext|>"]
    start = enc.trained_spans()[-1][0]
    assert enc.input_ids[:start] == tpl.encode_prompt(glm4_tok, messages[:3])
    assert all(lab in (IGNORE_INDEX, tid) for lab, tid in zip(enc.labels, enc.input_ids))
    # an answer without reasoning is an empty thinking, still after the same prompt
    ids = tpl.answer_ids(glm4_tok, messages[:3], "No.")
    assert glm4_tok.decode(ids) == "</think>No.<|endoftext|>"


def test_keep_reasoning_and_tool_calls(glm4_tok):
    messages = copy.deepcopy(BATTERY["reasoning-history-and-last"][0])
    messages[1]["keep_reasoning"] = True
    enc = get_template("glmz1").encode(glm4_tok, messages)
    assert glm4_tok.decode(enc.input_ids[slice(*enc.trained_spans()[0])]) == \
        "7 has no divisors but 1 and 7.</think>Yes.<|user|>"
    messages, tools = BATTERY["one-tool-call"]
    enc = get_template("glmz1").encode(glm4_tok, messages[:3], tools=tools)
    # a call ending the conversation: GLM-4's metadata form, ended by <|observation|>
    assert [glm4_tok.decode(enc.input_ids[a:b]) for a, b in enc.trained_spans()] == \
        ['get_weather\n{"city": "北京", "days": 1}<|observation|>']


def test_output_parses_back_to_reasoning_and_answer(glm4_tok):
    tpl = get_template("glmz1")
    assert tpl.parse_output("\n让我想想。\n</think>\n\n答案是 4。") == \
        {"role": "assistant", "content": "答案是 4。", "reasoning_content": "让我想想。"}
    # cut off while thinking: all of it is reasoning
    assert tpl.parse_output("still thinking")["reasoning_content"] == "still thinking"
    stream = tpl.output_stream()
    deltas = [d for piece in ("想", "想。</th", "ink>答", "案") for d in stream.feed(piece)] + stream.finish()
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "想想。"
    assert "".join(d.get("content", "") for d in deltas) == "答案"
    assert tpl.stop_token_ids(glm4_tok) == [151329, 151336, 151338]


def test_stats_count_the_reasoning_glmz1_renders(glm4_tok):
    from glmtune.data.stats import reasoning_counts

    messages, _ = BATTERY["reasoning-history-and-last"]  # history reasoning dropped, the last turn's rendered
    assert reasoning_counts([{"messages": messages}], get_template("glmz1"), glm4_tok) == \
        (len(glm4_tok("9 = 3*3.", add_special_tokens=False)["input_ids"]), 1)
