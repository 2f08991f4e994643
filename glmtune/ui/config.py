"""Config tab: a form over the training config, validated by the same pydantic model as `glmtune train`.

The form is generated from `glmtune.train.config.TrainConfig`: each field's label is its YAML key,
its hint is the field's description (the `--explain` text) and its choices come from the type, so
the page cannot drift from the config. Values are typed as in `--set KEY=VALUE` (parsed as YAML).
Errors show beside the section of the key they name. Every path in the config must lie in the workspace.
"""
from __future__ import annotations

import typing
from pathlib import Path

import yaml

from glmtune.errors import ConfigError
from glmtune.ui.common import error, ok
from glmtune.ui.workspace import Workspace

# The keys the form shows, per section (the rest keep their defaults; a loaded YAML keeps them too).
FORM_KEYS = {
    "model": ["path", "dtype", "trust_remote_code"],
    "data": ["datasets", "dev", "template", "cutoff_len", "packing", "train_on"],
    "method": ["name", "r", "alpha", "dropout", "target_modules", "num_virtual_tokens", "prefix_projection",
               "trainable_layers"],
    "train": ["max_steps", "epochs", "batch_size", "grad_accum", "lr", "scheduler", "warmup_ratio", "seed"],
    "speed": ["attention", "liger", "compile", "fused_lora", "cuda_graphs"],
    "eval": ["every"],
    "output": ["dir", "save_every", "keep_last"],
}
# What the form starts with: LoRA on the tiny GLM-4 model the "Build tiny model" button writes, the
# split the Data tab writes (the same recipe as `glmtune demo`).
STARTER = {
    "model": {"path": "models/tiny-glm4", "dtype": "fp32"},
    "data": {"datasets": ["data/train.jsonl"], "dev": "data/dev.jsonl", "template": "glm4", "cutoff_len": 1024,
             "packing": False},
    "method": {"name": "lora", "r": 16, "alpha": 32},
    "train": {"max_steps": 30, "batch_size": 4, "lr": 5e-3, "scheduler": "cosine", "warmup_ratio": 0.1},
    "eval": {"every": 10},
    "output": {"dir": "runs/lora", "save_every": 10, "keep_last": 2},
}
FIELDS_PER_ROW = 4


def form_fields() -> list[tuple[str, str, typing.Any]]:
    """(section, key, pydantic FieldInfo) in form order."""
    from glmtune.train.config import TrainConfig
    out = []
    for section, keys in FORM_KEYS.items():
        model = TrainConfig.model_fields[section].annotation
        out += [(section, key, model.model_fields[key]) for key in keys]
    return out


def choices_of(annotation) -> list[str] | None:
    """Dropdown choices for Literal / bool-or-Literal fields (as the YAML text a user would type)."""
    if annotation is bool:
        return None
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return [str(a) for a in args]
    literals = [a for a in args if typing.get_origin(a) is typing.Literal]
    if literals and all(a in (bool, type(None)) or typing.get_origin(a) is typing.Literal for a in args):
        found = [str(v) for lit in literals for v in typing.get_args(lit)]
        if bool in args:
            found += ["true", "false"]
        if type(None) in args:
            found = ["", *found]
        return found
    return None


def _is_text(annotation) -> bool:
    """Fields kept as typed (paths, names): YAML would turn a path like `yes` or `1e3` into a bool/number."""
    return annotation in (str, str | None)


def value_text(value) -> str | bool:
    """A config value as the form shows it."""
    if isinstance(value, bool):
        return value
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return "" if value is None else str(value)


def form_values(raw: dict) -> list:
    """Form values for a config dict (missing keys: the field's default)."""
    values = []
    for section, key, info in form_fields():
        if key in raw.get(section, {}):
            value = raw[section][key]
        else:
            value = None if info.is_required() else info.get_default(call_default_factory=True)
        text = value_text(value)
        choices = choices_of(info.annotation)
        if choices is not None and isinstance(text, bool):
            text = "true" if text else "false"
        values.append(text)
    return values


def raw_from_form(values: list, base: dict | None = None) -> dict:
    """The config dict the form describes (over ``base``: keys the form doesn't show)."""
    raw = yaml.safe_load(yaml.safe_dump(base or {})) or {}
    for (section, key, info), value in zip(form_fields(), values):
        sec = raw.setdefault(section, {})
        if isinstance(value, bool):
            sec[key] = value
            continue
        text = str(value if value is not None else "").strip()
        if text == "":
            sec.pop(key, None)  # the default (or "required key is missing")
        elif section == "data" and key == "datasets":
            sec[key] = [p.strip() for p in text.split(",") if p.strip()]
        elif key == "target_modules" and "," in text:
            sec[key] = [p.strip() for p in text.split(",") if p.strip()]
        elif _is_text(info.annotation):
            sec[key] = text
        else:
            try:
                sec[key] = yaml.safe_load(text)
            except yaml.YAMLError:
                sec[key] = text  # pydantic then names the key and the expected type
    return {k: v for k, v in raw.items() if v != {} or k in ("model", "data", "output")}


def check_workspace_paths(ws: Workspace, raw: dict, source: str | None):
    """Validate with the pydantic model, then require every path the run reads or writes to lie in the
    workspace (read paths must exist); the model folder is checked as `glmtune train` checks it."""
    from glmtune.errors import InputError
    from glmtune.train.config import check_model, validate_config

    cfg = validate_config(raw, source, check_paths=False)

    def inside(path: str, field: str, must_exist: bool) -> str:
        try:
            return str(ws.resolve(path, field=field, must_exist=must_exist))
        except InputError as e:
            raise ConfigError(e.problem, file=source, field=field, fix=e.fix) from None

    absolute = cfg.model_copy(deep=True)
    absolute.model.path = inside(cfg.model.path, "model.path", True)
    absolute.data.datasets = [inside(p, "data.datasets", True) for p in cfg.data.datasets]
    if cfg.data.dev:
        absolute.data.dev = inside(cfg.data.dev, "data.dev", True)
    absolute.output.dir = inside(cfg.output.dir, "output.dir", False)
    check_model(absolute, source)
    return cfg


def save(ws: Workspace, values: list, name: str, base: dict | None = None) -> str:
    """Validate the form and write it as YAML (only keys that differ from the defaults)."""
    path = ws.resolve(name, field="config file")
    if path.suffix not in (".yaml", ".yml"):
        raise ConfigError("a config file ends in .yaml", field="config file", fix=f"e.g. {Path(name).stem}.yaml")
    raw = raw_from_form(values, base)
    cfg = check_workspace_paths(ws, raw, ws.relative(path))
    from glmtune.io import write_text_atomic
    text = yaml.safe_dump(cfg.model_dump(mode="json", exclude_defaults=True), sort_keys=False, allow_unicode=True)
    write_text_atomic(path, text)
    return ok(f"saved {ws.relative(path)} (valid; start it in the Train tab)")


def load_yaml(path: Path, shown_name: str) -> dict:
    """Read a YAML config (a workspace file or an upload) as `glmtune train` does; errors name the line."""
    from glmtune.train.config import load_config
    try:
        cfg = load_config(path, check_paths=False)
    except ConfigError as e:
        raise ConfigError(e.problem, file=shown_name, line=e.line, field=e.field, fix=e.fix) from None
    return cfg.model_dump(mode="json", exclude_defaults=True)


def build_tiny_model(ws: Workspace, folder: str) -> str:
    """A random GLM-4-shaped model (2 layers, the real tokenizer) to try the whole pipeline on a CPU."""
    from glmtune.models.tiny import BUILTIN_GLM4_TOKENIZER, build_tiny_glm4
    out = ws.resolve(folder, field="model.path")
    if (out / "config.json").exists():
        return ok(f"{folder} already holds a model")
    build_tiny_glm4(out, BUILTIN_GLM4_TOKENIZER)
    return ok(f"built a tiny random GLM-4 model in {folder}")


def section_messages(e: Exception | None) -> list[str]:
    """One message per form section: the error goes beside the section its key belongs to."""
    sections = list(FORM_KEYS)
    msgs = [""] * len(sections)
    if e is not None:
        field = getattr(e, "field", None) or ""
        head = field.split(".")[0]
        msgs[sections.index(head) if head in sections else 0] = error(e)
    return msgs


def field_component(section: str, key: str, info, value):
    """The input for one config key: its YAML key as label, its description as hint."""
    import gradio as gr

    label, hint, elem = f"{section}.{key}", info.description, f"cfg-{section}-{key}"
    choices = choices_of(info.annotation)
    if (section, key) == ("data", "template"):
        from glmtune.templates import list_templates
        choices = ["", *list_templates()]
    if info.annotation is bool:
        return gr.Checkbox(value, label=label, info=hint, elem_id=elem)
    if choices is not None:
        return gr.Dropdown(choices, value=value, label=label, info=hint, elem_id=elem)
    return gr.Textbox(value, label=label, info=hint, elem_id=elem, min_width=200)


def build(ws: Workspace) -> dict:
    """The Config tab; returns the components other tabs wire to (the saved config's path)."""
    import gradio as gr

    from glmtune.errors import GlmtuneError

    gr.Markdown("Every field is a key of the training YAML (`glmtune train --explain` lists them all). "
                "Values are typed as in `--set KEY=VALUE`; an empty field keeps the default.")
    with gr.Row():
        name = gr.Textbox("configs/lora.yaml", label="Config file (workspace path)", elem_id="cfg-name")
        load_btn = gr.Button("Load from workspace", elem_id="cfg-load")
        upload = gr.File(label="…or upload a YAML config", file_types=[".yaml", ".yml"], elem_id="cfg-upload")
    status = gr.Markdown(elem_id="cfg-status")
    base = gr.State({})  # keys of a loaded YAML that the form doesn't show
    inputs, notes = [], []
    starter = form_values(STARTER)
    fields = form_fields()
    for section in FORM_KEYS:
        with gr.Group():
            gr.Markdown(f"**{section}**")
            members = [i for i, (sec, _, _) in enumerate(fields) if sec == section]
            for row in range(0, len(members), FIELDS_PER_ROW):
                with gr.Row(equal_height=True):
                    inputs += [field_component(*fields[i], starter[i]) for i in members[row:row + FIELDS_PER_ROW]]
            if section == "model":
                tiny_btn = gr.Button("Build a tiny random GLM-4 model in model.path (to try the pipeline on a CPU)",
                                     elem_id="cfg-build-tiny", size="sm")
            notes.append(gr.Markdown(elem_id=f"cfg-error-{section}"))
    save_btn = gr.Button("Validate and save", variant="primary", elem_id="cfg-save")

    def on_save(name_text, base_raw, *values):
        try:
            return (save(ws, list(values), name_text, base_raw), *section_messages(None))
        except GlmtuneError as e:
            return (error(e), *section_messages(e))

    def fill(raw: dict, message: str):
        return (message, raw, *form_values(raw), *section_messages(None))

    def on_load(name_text):
        try:
            path = ws.resolve(name_text, field="config file", must_exist=True)
            return fill(load_yaml(path, name_text), ok(f"loaded {name_text}"))
        except GlmtuneError as e:
            return (error(e), *[gr.skip()] * (1 + len(inputs) + len(notes)))

    def on_upload(file):
        # An uploaded YAML only fills the form; it is written to the workspace when saved, so a broken
        # upload leaves nothing behind.
        if not file:
            return (gr.skip(),) * (2 + len(inputs) + len(notes))
        try:
            from glmtune.ui.workspace import safe_name
            shown = safe_name(Path(file).name)
            return fill(load_yaml(Path(file), shown), ok(f"loaded upload {shown}; press Validate and save"))
        except GlmtuneError as e:
            return (error(e), *[gr.skip()] * (1 + len(inputs) + len(notes)))

    def on_tiny(path_text):
        try:
            return build_tiny_model(ws, path_text)
        except GlmtuneError as e:
            return error(e)

    save_btn.click(on_save, [name, base, *inputs], [status, *notes])
    load_btn.click(on_load, name, [status, base, *inputs, *notes])
    upload.upload(on_upload, upload, [status, base, *inputs, *notes])
    tiny_btn.click(on_tiny, inputs[0], status)
    return {"name": name}



