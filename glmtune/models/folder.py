"""A model folder's facts, read in one place.

A glmtune model folder is a Hugging Face folder (config.json, weights, tokenizer files) plus
`glmtune.json` (`{"template": "glm4", ...}`). Everything a command needs to know about the folder
before loading weights comes from here: the model type and whether it runs remote code
(config.json), the template family and its default system prompt (glmtune.json, else the chat
template the tokenizer ships, else file names), and glmtune.json's own entries (base model,
method). Nothing here imports torch, transformers or glmtune.templates: the template *name* and
options are facts, building the Template object is the caller's `get_template(**args)`.

    folder = read_model_folder("models/glm-4-9b-chat")
    folder.model_type, folder.remote_code, folder.family, folder.default_system
    tpl = get_template(**folder.template_args())          # or template_args("chatglm3") to override
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from glmtune.errors import InputError

META_FILE = "glmtune.json"
# The template families a folder's files can name; glmtune.templates registers one template each
# (tests/models/test_folder.py keeps the two lists equal).
FAMILIES = ("glm4", "glmz1", "glm45", "glm47", "chatglm3", "chatglm2", "qwen", "llama3")
_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/=]+ \d+\s*$")
GLM_MODEL_TYPES = {"glm", "glm4", "chatglm", "glm4_moe", "glm4_moe_lite", "glm_moe_dsa"}
# GLM-4.5+ model types -> their template family when no chat template says (GLM-4.7 is also glm4_moe: its
# shipped template tells it apart). GLM-5 (glm_moe_dsa) speaks GLM-4.7's form in plain chat; its tool and
# reasoning rendering may differ (a GLM-5.1 template is refused below), so a folder's shipped template wins.
GLM45_MODEL_TYPES = {"glm4_moe": "glm45", "glm4_moe_lite": "glm47", "glm_moe_dsa": "glm47"}
# Shipped chat templates glmtune does not reproduce: a marker in the template -> why (the folder's family
# stops there with this reason; glmtune.json {"template": ...} still chooses one knowingly).
UNSUPPORTED_TEMPLATES = {
    "thinking_indices": "this is GLM-5.1's chat template, which glm47 does not reproduce: it lists each tool as "
                        "its bare function (no `strict`/`defer_loading` keys), keeps reasoning unstripped and "
                        "writes `<think></think>` before an answer without reasoning after the last user turn "
                        "(tests/templates/test_glm5.py)",
    "你是一个专业的深度研究助手": "this is GLM-Z1-Rumination's chat template (a fixed deep-research system prompt "
                         "and tool list, system messages ignored, no `<think>` in the generation prompt), "
                         "which no glmtune template reproduces",
}


def read_json(path: Path) -> dict:
    """A JSON object from a model folder ({} when the file is missing); invalid JSON names the file."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise InputError(f"invalid JSON ({e.msg})", file=path, line=e.lineno,
                         fix="restore the file from the model's original download") from None
    return data if isinstance(data, dict) else {}


@dataclass
class ModelFolder:
    """What a model (or tokenizer / adapter) folder says about itself; files are read on first use."""

    path: Path

    # -- the files ---------------------------------------------------------------------------------
    @cached_property
    def config(self) -> dict:
        """config.json."""
        return read_json(self.path / "config.json")

    @cached_property
    def meta(self) -> dict:
        """glmtune.json: template, default_system, method, base_model, merged_from, source."""
        return read_json(self.path / META_FILE)

    @cached_property
    def tokenizer_config(self) -> dict:
        return read_json(self.path / "tokenizer_config.json")

    @cached_property
    def chat_template(self):
        """``chat_template.jinja`` (transformers 5 saves it there) or the ``chat_template`` entry of
        tokenizer_config.json (a string, or a list of named templates)."""
        if (self.path / "chat_template.jinja").exists():
            return (self.path / "chat_template.jinja").read_text(encoding="utf-8")
        return self.tokenizer_config.get("chat_template")

    # -- what follows from them --------------------------------------------------------------------
    @property
    def model_type(self) -> str | None:
        """config.json's model_type ('glm4', 'chatglm', 'qwen2', ...), None when unknown."""
        return self.config.get("model_type")

    @property
    def is_glm(self) -> bool:
        return self.model_type in GLM_MODEL_TYPES

    @property
    def routed_experts(self) -> int:
        """How many routed experts each MoE layer has (config.json n_routed_experts / num_local_experts /
        num_experts; 0 for a dense model)."""
        cfg = self.config.get("text_config") or self.config
        return int(next((cfg[k] for k in ("n_routed_experts", "num_local_experts", "num_experts") if cfg.get(k)), 0))

    @property
    def remote_code(self) -> bool:
        """Whether AutoModelForCausalLM would run the folder's own modelling code (config.json `auto_map`
        names it; transformers checks the same key) when trust_remote_code allows it."""
        return "AutoModelForCausalLM" in (self.config.get("auto_map") or {})

    @property
    def is_remote_chatglm(self) -> bool:
        """A remote-code ChatGLM checkpoint: model_type chatglm, or an auto_map naming modeling_chatglm
        (`glmtune model import-chatglm` turns it into a native folder)."""
        auto_map = self.config.get("auto_map") or {}
        return self.model_type == "chatglm" or any("modeling_chatglm" in str(v) for v in auto_map.values())

    @property
    def is_vision(self) -> bool:
        """An image-text-to-text architecture (Qwen2-VL, GLM-4V, LLaVA, ...): it takes images."""
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

        return (self.model_type or "") in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    @cached_property
    def family(self) -> str | None:
        """The template family; None when nothing says.

        Order: an explicit glmtune.json wins; then the chat template the tokenizer ships (it is what
        the model was tuned with: SmolLM2 is a Llama model that speaks ChatML); then tokenizer and
        model class names; then the file format of ``tokenizer.model``.
        """
        explicit = self.meta.get("template")
        if explicit:
            return str(explicit)
        template = _default_template(self.chat_template)
        for marker, why in UNSUPPORTED_TEMPLATES.items():
            if isinstance(template, str) and marker in template:
                raise InputError(f"the folder's chat template: {why}", file=self.path,
                                 fix='add glmtune.json with {"template": "glm47"} (or another family) to train '
                                     'and serve with that template anyway, knowing where it differs')
        by_template = family_from_chat_template(self.chat_template)
        if by_template:
            return by_template
        names = " ".join(str(d.get(k, "")) for d in (self.tokenizer_config, self.config)
                         for k in ("name_or_path", "_name_or_path", "tokenizer_class")).lower()
        for key, fam in (("chatglm4", "glm4"), ("glm-4", "glm4"), ("chatglm3", "chatglm3"),
                         ("chatglm2", "chatglm2"), ("qwen", "qwen"), ("llama-3", "llama3")):
            if key in names:
                return fam
        model_type = str(self.model_type or "").lower()
        if model_type in GLM45_MODEL_TYPES:
            return GLM45_MODEL_TYPES[model_type]
        if model_type in ("glm", "glm4", "chatglm4"):
            return "glm4"
        if model_type.startswith("qwen"):
            return "qwen"
        if (self.path / "tokenizer.model").exists() and is_tiktoken_file(self.path / "tokenizer.model"):
            return "glm4"
        return None

    @cached_property
    def default_system(self) -> str | None:
        """The system prompt the model's own chat template inserts when a conversation has none
        (Qwen2.5, SmolLM2), so glmtune's ChatML template renders what ``apply_chat_template`` gives:
        glmtune.json's `default_system` when recorded (GGUF import), else read off the chat template."""
        if "default_system" in self.meta:
            return self.meta["default_system"]
        return chatml_default_system(self.chat_template) if self.family == "qwen" else None

    def template_args(self, name: str | None = None) -> dict:
        """Arguments for ``glmtune.templates.get_template(**args)``: the folder's family, or ``name``
        overriding it. When ``name`` is the folder's own family, the folder's details (a ChatML
        default system prompt) are kept, so training, stats and serving build the model's prompts."""
        family = self.family
        if name is None and family is None:
            raise InputError("cannot tell which chat template this model uses", file=self.path,
                             fix='add glmtune.json with {"template": "glm4"} (or glmz1, glm45, glm47, chatglm3, '
                                 'chatglm2, qwen, llama3), or pass --template')
        chosen = name or family
        if chosen == family == "qwen":
            return {"name": chosen, "default_system": self.default_system}
        return {"name": chosen}


def read_model_folder(path: str | Path) -> ModelFolder:
    """The facts of a model folder (files are read lazily; a missing file reads as empty)."""
    return ModelFolder(Path(path))


def write_glmtune_meta(model_dir: str | Path, **meta) -> None:
    """Add entries to a folder's glmtune.json (atomically): it tells every command which template
    the folder uses, and records where a trained folder came from."""
    from glmtune.io import write_json_atomic

    path = Path(model_dir) / META_FILE
    write_json_atomic(path, {**read_json(path), **meta})


def family_from_chat_template(template) -> str | None:
    """Map the markers of a chat template to a family (a list of named templates: the default)."""
    template = _default_template(template)
    if not isinstance(template, str):
        return None
    if "[gMASK]<sop>" in template and "<arg_key>" in template:
        # GLM-4.5+: XML tool calls. GLM-4.7 writes `<|user|>{{ ... }}` (no newline after role tokens).
        return "glm47" if "<|user|>{{" in template.replace(" ", "") else "glm45"
    if "[gMASK]<sop>" in template and "split('</think>')" in template and "<think>{% endif %}" in template:
        return "glmz1"  # GLM-Z1-0414: the GLM-4 layout, reasoning dropped from history, the prompt opens <think>
    for marker, fam in (("[gMASK]<sop>", "glm4"), ("[gMASK]sop", "chatglm3"),
                        ("<|im_start|>", "qwen"), ("<|start_header_id|>", "llama3"),
                        ("[Round", "chatglm2")):
        if marker in template:
            return fam
    return None


def chatml_default_system(template) -> str | None:
    """Render a ChatML chat template for one user message and read off an injected system."""
    template = _default_template(template)
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


def is_tiktoken_file(path: Path) -> bool:
    """tiktoken rank files are text lines ``<base64> <rank>``; sentencepiece files are protobuf."""
    with open(path, "rb") as f:
        first = f.readline(4096)
    return bool(_TIKTOKEN_LINE.match(first))


def _default_template(template):
    if isinstance(template, list):
        return next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template
