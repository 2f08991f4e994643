"""Chat templates: exact text, token ids, loss masks, generation prompts and stop ids.

Usage::

    tpl = get_template("glm4")
    enc = tpl.encode(tokenizer, messages)    # enc.input_ids, enc.labels (-100 = not trained)
    prompt_ids = tpl.encode_prompt(tokenizer, messages[:-1])

A model folder's template: ``get_template(**glmtune.models.folder.read_model_folder(path).template_args())``.
"""
from glmtune.templates.base import IGNORE_INDEX, IMAGE_MARK, TRAIN_ON, Encoded, Segment, Template, segment_ids
from glmtune.templates.registry import get_template, list_templates, register_template

__all__ = ["IGNORE_INDEX", "IMAGE_MARK", "TRAIN_ON", "Encoded", "Segment", "Template", "get_template",
           "list_templates", "register_template", "segment_ids"]
