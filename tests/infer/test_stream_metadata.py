"""GLM's metadata line in the predictor: cut by the template's `answer_text` (tests/templates/test_answers.py
has the cases), whatever the template is called, and a model that never writes it still streams."""
from __future__ import annotations

from glmtune.infer.predictor import Predictor


def test_the_metadata_line_is_the_templates_not_its_names(random_glm4_dir):
    """A GLM-4 family registered under its own name (a fine-tune's template) reads answers as GLM-4 does:
    the predictor used to branch on the names "glm4" / "chatglm3" and left the metadata line in."""
    from glmtune.templates.glm import GLM4Template

    class FineTunedGLM4(GLM4Template):
        name = "my-glm4"

    p = Predictor(random_glm4_dir, max_new_tokens=4)
    p.template = FineTunedGLM4()
    assert p.decode(p.tokenizer.encode("\n你好", add_special_tokens=False)) == "你好"


def test_a_model_without_the_metadata_line_streams_piece_by_piece(random_glm4_dir):
    """A random GLM-4 never writes the newline: its answer still arrives token by token."""
    p = Predictor(random_glm4_dir, max_new_tokens=12)
    pieces: list[str] = []
    text, out = p.generate_stream(p.prompt_ids(p.messages_for("我想取消我的流量包")), pieces.append)
    raw = p.tokenizer.decode(out.token_ids, skip_special_tokens=False)
    assert "\n" not in raw and len(out.token_ids) == 12  # the case under test: no metadata line
    assert text == raw and "".join(pieces) == text
    assert len(pieces) >= 6, pieces  # held back until the end, it would be one piece
