"""GLM-5.x (glm_moe_dsa) against glmtune's glm47: the one public GLM-5.1 chat template found
(tests/templates/official/glm51_chat_template.jinja, provenance in its header) agrees with glm47 on every
generation prompt without tools, and differs in three ways pinned here (so a folder shipping it is refused,
glmtune/models/folder.py UNSUPPORTED_TEMPLATES, rather than trained with a near miss)."""
from __future__ import annotations

from pathlib import Path

import pytest

from glmtune.templates import get_template
from test_glm45 import BATTERY, official_messages

GLM51 = (Path(__file__).parent / "official" / "glm51_chat_template.jinja").read_text(encoding="utf-8")
NO_TOOLS = sorted(case for case, (_, tools) in BATTERY.items() if not tools)


def glm51(tok, messages, tools=None, gen=False, **kw):
    return tok.apply_chat_template(official_messages(messages), chat_template=GLM51, tools=tools, tokenize=False,
                                   add_generation_prompt=gen, **kw)


@pytest.mark.parametrize("kw", [{}, {"enable_thinking": False}], ids=["thinking", "no-thinking"])
@pytest.mark.parametrize("case", NO_TOOLS)
def test_generation_prompts_without_tools_agree(case, kw, glm45_tok):
    messages, _ = BATTERY[case]
    for t in [t for t, m in enumerate(messages) if m["role"] == "user"]:
        assert get_template("glm47", **kw).render(messages[:t + 1], add_generation_prompt=True) == \
            glm51(glm45_tok, messages[:t + 1], gen=True, **kw)


def test_where_glm47_differs(glm45_tok):
    glm47 = get_template("glm47")
    # 1. tools: the bare function object (its `strict` / `defer_loading` keys dropped), not the OpenAI wrapper
    messages, tools = BATTERY["tools-no-system-and-no-call"]
    strict = [{**tools[0], "function": {**tools[0]["function"], "strict": True}}]
    assert '\n{"name": "get_weather", "description"' in glm51(glm45_tok, messages[:1], strict, gen=True)
    assert '"strict"' not in glm51(glm45_tok, messages[:1], strict, gen=True)
    assert '\n{"type": "function", "function": {"name": "get_weather"' in glm47.render(messages[:1], tools=tools,
                                                                                       add_generation_prompt=True)
    # 2. an answer after the last user message without reasoning: an empty block, not a lone </think>
    messages, _ = BATTERY["single"]
    assert glm51(glm45_tok, messages).endswith("<|assistant|><think></think>你好！有什么可以帮你？")
    assert glm47.render(messages).endswith("<|assistant|></think>你好！有什么可以帮你？")
    # 3. reasoning is kept as written, not stripped
    messages, _ = BATTERY["reasoning-history-and-last"]
    assert glm51(glm45_tok, messages).endswith("<think>\n 9 = 3*3.  \n</think>No: 9 = 3 × 3.")
    assert glm47.render(messages).endswith("<think>9 = 3*3.</think>No: 9 = 3 × 3.")
