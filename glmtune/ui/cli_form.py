"""A form for any `glmtune` command, generated from its own options, run as a child process.

Used by the optional tabs (Synthesize: `glmtune data crawl` / `data synthesize`; Align: `glmtune align`):
the options, their defaults and help come from the typer command itself, so the form is exactly
what the command accepts. A tab appears only when its module and its command exist.
Path-typed options are resolved inside the workspace; so is any other value that names an
existing file or folder (a URL or a model name is passed as typed).
"""
from __future__ import annotations

import importlib.util
import time
import typing
from pathlib import Path, PurePath

from glmtune.errors import InputError
from glmtune.ui.common import ok
from glmtune.ui.jobs import JobSlot, glmtune_command
from glmtune.ui.workspace import Workspace


def find_command(words: tuple[str, ...], module: str, root):
    """The click command for `glmtune WORDS...` in ``root`` (the CLI's command tree, handed over by
    `glmtune ui`: the UI does not import the CLI), or None when it (or the module behind it) isn't there."""
    if root is None or importlib.util.find_spec(module) is None:
        return None
    cmd = root
    for word in words:
        cmd = getattr(cmd, "commands", {}).get(word)
        if cmd is None:
            return None
    return cmd


def leaf_commands(words: tuple[str, ...], cmd) -> list[tuple[tuple[str, ...], object]]:
    """A command, or every subcommand of a group (`glmtune align` -> rm, dpo, grpo, ppo), in order."""
    subs = getattr(cmd, "commands", None)
    if not subs:
        return [(words, cmd)]
    return [leaf for name, sub in subs.items() for leaf in leaf_commands((*words, name), sub)]


def form_params(cmd) -> list:
    return [p for p in cmd.params if p.name != "help" and not getattr(p, "hidden", False)]


def _is_flag(param) -> bool:
    return getattr(param, "is_flag", False) or getattr(param, "is_bool_flag", False)


def default_of(param):
    value = param.default
    if _is_flag(param):
        return bool(value)
    if value is None or callable(value) or type(value).__name__ == "Sentinel":
        return ""
    return value if isinstance(value, str) else str(value)


def _is_option(param) -> bool:
    return param.param_type_name == "option"


def _is_path(param) -> bool:
    """A Path-typed parameter (typer keeps the annotation; plain click has a click.Path type)."""
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    if annotation is not None:
        kinds = typing.get_args(annotation) or (annotation,)
        return any(isinstance(k, type) and issubclass(k, PurePath) for k in kinds)
    return type(getattr(param, "type", None)).__name__ == "Path"


def argv(ws: Workspace, words: tuple[str, ...], params: list, values: list) -> list[str]:
    """The command line the form describes; every path inside the workspace."""
    args: list[str] = list(words)
    for param, value in zip(params, values):
        name = param.opts[0] if _is_option(param) else param.name.upper()
        if _is_flag(param):
            if param.secondary_opts:
                args.append(param.opts[0] if value else param.secondary_opts[0])
            elif value:
                args.append(param.opts[0])
            continue
        text = str(value).strip()
        if not text:
            if param.required:
                raise InputError("required", field=name, fix="fill it in")
            continue
        if _is_path(param) or _names_a_path(ws, text):
            text = ws.relative(ws.resolve(text, field=name))
        args += [param.opts[0], text] if _is_option(param) else [text]
    return args


def _names_a_path(ws: Workspace, text: str) -> bool:
    if "://" in text:
        return False
    return Path(text).expanduser().exists() or (ws.root / text).exists()


def build_form(ws: Workspace, words: tuple[str, ...], cmd, slot: JobSlot) -> None:
    """Components for one command: a field per option, Run / Stop, and the tail of its output."""
    import gradio as gr

    from glmtune.errors import GlmtuneError
    from glmtune.ui.common import error

    gr.Markdown(f"#### `glmtune {' '.join(words)}`: {(cmd.help or '').strip().splitlines()[0] if cmd.help else ''}")
    params = form_params(cmd)
    comps = []
    elem = "-".join(words)
    with gr.Row():
        for p in params:
            label = p.opts[0] if p.opts else p.name
            if _is_flag(p):
                comps.append(gr.Checkbox(default_of(p), label=label, info=getattr(p, "help", None)))
            else:
                comps.append(gr.Textbox(default_of(p), label=label + (" (required)" if p.required else ""),
                                        info=getattr(p, "help", None), elem_id=f"{elem}-{p.name}", min_width=220))
    with gr.Row():
        run = gr.Button("Run", variant="primary", elem_id=f"{elem}-run")
        stop = gr.Button("Stop", variant="stop", elem_id=f"{elem}-stop")
    status = gr.Markdown(elem_id=f"{elem}-status")
    state = gr.Markdown(elem_id=f"{elem}-state")
    log = gr.Textbox(label="Output (last lines)", lines=10, max_lines=10, elem_id=f"{elem}-log")

    def on_run(*values):
        try:
            args = argv(ws, words, params, list(values))
            log_path = ws.ui_path("logs", f"{elem}-{time.strftime('%Y%m%d-%H%M%S')}.log")
            job = slot.start(glmtune_command(*args), cwd=ws.root, log=log_path)
            return ok(f"started (pid {job.proc.pid}): glmtune {' '.join(args)}")
        except GlmtuneError as e:
            return error(e)

    def on_tick():
        job = slot.job
        if job is None:
            return gr.skip(), gr.skip()
        return f"**{job.state()}**", job.tail(30)

    run.click(on_run, comps, status)
    stop.click(slot.stop, None, status)
    gr.Timer(2.0).tick(on_tick, None, [state, log])
