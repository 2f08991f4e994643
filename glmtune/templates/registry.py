"""Template registry: templates are a plugin boundary, so families register by name.

Which template a model folder uses is one of the folder's facts (glmtune.models.folder):
``get_template(**read_model_folder(path).template_args(name))``. Templates never read model folders.
"""
from __future__ import annotations

from typing import Callable

from glmtune.errors import InputError
from glmtune.templates.base import Template
from glmtune.templates.chatml import ChatMLTemplate, Llama3Template
from glmtune.templates.glm import ChatGLM2Template, ChatGLM3Template, GLM4Template, GLMZ1Template
from glmtune.templates.glm45 import GLM45Template, GLM47Template

_REGISTRY: dict[str, Callable[..., Template]] = {}


def register_template(name: str, factory: Callable[..., Template]) -> None:
    """Add a family; ``factory(**options)`` builds a Template (a Template subclass works)."""
    _REGISTRY[name] = factory


def list_templates() -> list[str]:
    return sorted(_REGISTRY)


def get_template(name: str, **options) -> Template:
    """The template of a family; options go to its constructor (qwen: ``default_system``; glm45/glm47:
    ``enable_thinking``, glm47 also ``clear_thinking``)."""
    if name not in _REGISTRY:
        raise InputError(f"unknown template '{name}'", field="template",
                         fix=f"use one of {', '.join(list_templates())}")
    return _REGISTRY[name](**options)


register_template("glm4", GLM4Template)
register_template("glmz1", GLMZ1Template)
register_template("glm45", GLM45Template)
register_template("glm47", GLM47Template)
register_template("chatglm3", ChatGLM3Template)
register_template("chatglm2", ChatGLM2Template)
register_template("qwen", ChatMLTemplate)
register_template("llama3", Llama3Template)
