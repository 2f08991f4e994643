"""Template registry: templates are a plugin boundary, so families register by name."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from glmtune.errors import InputError
from glmtune.templates.base import Template
from glmtune.templates.chatml import ChatMLTemplate, Llama3Template
from glmtune.templates.glm import ChatGLM2Template, ChatGLM3Template, GLM4Template

_REGISTRY: dict[str, Callable[..., Template]] = {}


def register_template(name: str, factory: Callable[..., Template]) -> None:
    """Add a family; ``factory(**options)`` builds a Template (a Template subclass works)."""
    _REGISTRY[name] = factory


def list_templates() -> list[str]:
    return sorted(_REGISTRY)


def get_template(name: str, **options) -> Template:
    """The template of a family; options go to its constructor (qwen: ``default_system``)."""
    if name not in _REGISTRY:
        raise InputError(f"unknown template '{name}'", field="template",
                         fix=f"use one of {', '.join(list_templates())}")
    return _REGISTRY[name](**options)


def template_for_model(path: str | Path) -> Template:
    """The template a model folder needs (glmtune.json, its chat template, or its files).

    For ChatML models the default system prompt is taken from the folder's own chat template,
    so training matches what ``apply_chat_template`` gives that model (Qwen2.5 adds one; Qwen3
    and others do not).
    """
    from glmtune.models.tokenizer import detect_family

    family = detect_family(path)
    if family is None:
        raise InputError("cannot tell which chat template this model uses", file=Path(path),
                         fix='add glmtune.json with {"template": "glm4"} (or chatglm3, chatglm2, '
                             'qwen, llama3), or pass --template')
    if family == "qwen":
        return get_template(family, default_system=chatml_default_system(path))
    return get_template(family)


def resolve_template(name: str | None, model_path: str | Path | None) -> Template:
    """The template for a model folder, ``name`` overriding the guess. When ``name`` is the
    folder's own family, the folder's details (e.g. Qwen2.5's default system prompt) are kept, so
    training, data stats and serving build the same prompts as the model's own chat template."""
    if model_path is None:
        if name is None:
            raise InputError("no template and no model folder to read one from", field="template",
                             fix="pass a template name (glm4, chatglm3, chatglm2, qwen, llama3)")
        return get_template(name)
    if name is None:
        return template_for_model(model_path)
    from glmtune.models.tokenizer import detect_family
    return template_for_model(model_path) if detect_family(model_path) == name else get_template(name)


def chatml_default_system(path: str | Path) -> str | None:
    """Render the folder's chat template for one user message and read off an injected system."""
    from glmtune.models.tokenizer import read_chat_template

    template = read_chat_template(path)
    if isinstance(template, list):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not isinstance(template, str):
        return None
    probe = "\x00probe\x00"
    try:
        text = render_jinja(template, [{"role": "user", "content": probe}])
    except Exception:  # a template we cannot render offline simply gives no default
        return None
    head = "<|im_start|>system\n"
    if not text.startswith(head) or "<|im_end|>" not in text:
        return None
    system = text[len(head):text.index("<|im_end|>")]
    return None if probe in system else system


def render_jinja(template: str, messages: list[dict], add_generation_prompt: bool = False,
                 **extra) -> str:
    """Render a HF chat template the way transformers does (sandbox, trim/lstrip, tojson)."""
    import json

    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages,
                                            add_generation_prompt=add_generation_prompt, **extra)


register_template("glm4", GLM4Template)
register_template("chatglm3", ChatGLM3Template)
register_template("chatglm2", ChatGLM2Template)
register_template("qwen", ChatMLTemplate)
register_template("llama3", Llama3Template)
