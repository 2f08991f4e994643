"""Chat templates: exact text, token ids, loss masks, generation prompts and stop ids.

Usage::

    tpl = get_template("glm4")
    enc = tpl.encode(tokenizer, messages)    # enc.input_ids, enc.labels (-100 = not trained)
    prompt_ids = tpl.encode_prompt(tokenizer, messages[:-1])
"""
from glmtune.templates.base import IGNORE_INDEX, IMAGE_MARK, TRAIN_ON, Encoded, Segment, Template
from glmtune.templates.registry import (get_template, list_templates, register_template,
                                        render_jinja, resolve_template, template_for_model)

__all__ = ["IGNORE_INDEX", "IMAGE_MARK", "TRAIN_ON", "Encoded", "Segment", "Template", "get_template",
           "list_templates", "register_template", "render_jinja", "resolve_template",
           "template_for_model"]
