"""GLM's metadata line and streaming: what is held back mid-stream, what the final answer keeps.

GLM-4/ChatGLM3 answers start with a metadata line (empty, or a tool name) and a newline. Only an
empty line is cut, so the only text a stream may hold back is leading whitespace without a newline
yet; anything else streams at once (a model that never writes the line must not be frozen).
"""
from __future__ import annotations

import pytest

from glmtune.infer.predictor import Predictor, strip_metadata

CASES = [  # (template, generated text, the answer)
    ("glm4", "\n你好！我是一个小模型。", "你好！我是一个小模型。"),
    ("glm4", "  \nHi", "Hi"),
    ("glm4", 'get_weather\n{"city": "北京"}', 'get_weather\n{"city": "北京"}'),  # a tool call: whole
    ("glm4", "你好，没有元数据行", "你好，没有元数据行"),  # no metadata line at all
    ("glm4", " Hello world\nsecond line", " Hello world\nsecond line"),
    ("chatglm3", "\n Hi there", "Hi there"),
    ("chatglm3", "interpreter\n```python\nprint(1)\n```", "interpreter\n```python\nprint(1)\n```"),
    ("qwen", "\nHi", "\nHi"),  # other families have no metadata line
]


@pytest.mark.parametrize("template,text,answer", CASES)
def test_every_stream_state_grows_into_the_answer(template, text, answer):
    assert strip_metadata(template, text) == answer
    states = [strip_metadata(template, text[:n], final=False) for n in range(len(text) + 1)]
    assert states[-1] == answer
    assert all(later.startswith(earlier) for earlier, later in zip(states, states[1:])), states


def test_only_leading_whitespace_is_held_back():
    held = ["", " ", "  ", "\n"]
    assert [strip_metadata("glm4", t, final=False) for t in held] == ["", "", "", ""]
    assert strip_metadata("glm4", "你", final=False) == "你"
    assert strip_metadata("glm4", " get_we", final=False) == " get_we"
    assert strip_metadata("glm4", "\n你", final=False) == "你"


def test_a_model_without_the_metadata_line_streams_piece_by_piece(random_glm4_dir):
    """A random GLM-4 never writes the newline: its answer still arrives token by token."""
    p = Predictor(random_glm4_dir, max_new_tokens=12)
    pieces: list[str] = []
    text, out = p.generate_stream(p.prompt_ids(p.messages_for("我想取消我的流量包")), pieces.append)
    raw = p.tokenizer.decode(out.token_ids, skip_special_tokens=False)
    assert "\n" not in raw and len(out.token_ids) == 12  # the case under test: no metadata line
    assert text == raw and "".join(pieces) == text
    assert len(pieces) >= 6, pieces  # held back until the end, it would be one piece
