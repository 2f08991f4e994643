"""`glmtune ui`: one page, one tab per pipeline stage, each a thin view over the CLI's functions.

Tabs: Data, [Synthesize], Config, Train, Evaluate, Chat, [Align]. Synthesize and Align appear only
when their modules and commands are installed (no placeholder tab). Security: loopback by default,
a login required on any other address, every path inside the workspace, uploads size-limited,
nothing that runs model code until a button asks for it.
"""
from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from glmtune.errors import InputError
from glmtune.ui.workspace import MAX_UPLOAD_MB, Workspace

AUTH_ENV = "GLMTUNE_UI_AUTH"
# Highlight trained tokens in the Data tab's record preview; keep long renders scrollable; logs in a
# monospace font (rich's tables line up).
CSS = """
mark.trained { background: #c8f7c5; color: #05400a; border-radius: 2px; padding: 0 1px; }
[id$="-log"] textarea { font-family: ui-monospace, "DejaVu Sans Mono", monospace !important; font-size: 0.8em; }
pre.render { white-space: pre-wrap !important; max-height: 360px !important; overflow-y: auto !important; font-size: 0.85em; }
"""

# Optional tabs: (tab title, [(command words, module that must exist)]).
OPTIONAL_TABS = [
    ("Synthesize", [(("data", "crawl"), "glmtune.data.crawl"), (("data", "synthesize"), "glmtune.synth.synthesize"),
                    (("data", "augment"), "glmtune.synth.augment")]),
    ("Align", [(("align",), "glmtune.align")]),  # a group: one form per subcommand (rm, dpo, grpo, ppo)
]


def build_app(workspace: str | Path, commands=None):
    """The gradio Blocks of the whole UI over ``workspace`` (not launched). ``commands``: the CLI's
    click command tree; the Synthesize / Align forms are built from it (absent without it)."""
    import gradio as gr

    from glmtune.ui import chat, cli_form, config, data, evaluate, train
    from glmtune.ui.jobs import JobSlot

    ws = Workspace(workspace)
    optional = {title: [leaf for w, m in cmds if (c := cli_form.find_command(w, m, commands)) is not None
                        for leaf in cli_form.leaf_commands(w, c)]
                for title, cmds in OPTIONAL_TABS}
    with gr.Blocks(title="glmtune") as blocks:
        gr.Markdown(f"## glmtune · workspace `{ws.root}`")
        with gr.Tab("Data", elem_id="tab-data"):
            data.build(ws)
        if optional["Synthesize"]:
            with gr.Tab("Synthesize", elem_id="tab-synthesize"):
                for words, cmd in optional["Synthesize"]:
                    cli_form.build_form(ws, words, cmd, JobSlot(" ".join(words)))
        with gr.Tab("Config", elem_id="tab-config"):
            config.build(ws)
        with gr.Tab("Train", elem_id="tab-train"):
            train.build(ws, JobSlot("training"))
        with gr.Tab("Evaluate", elem_id="tab-evaluate"):
            evaluate.build(ws)
        with gr.Tab("Chat", elem_id="tab-chat"):
            chat.build(ws, chat.LoadedModel())
        if optional["Align"]:
            with gr.Tab("Align", elem_id="tab-align"):
                for words, cmd in optional["Align"]:
                    cli_form.build_form(ws, words, cmd, JobSlot(" ".join(words)))
    return blocks


def prepare_demo(ws: Workspace) -> None:
    """`glmtune ui --demo`: the built-in CMCC-34 sample in uploads/ and the tiny GLM-4 model the
    Config tab's defaults point at, so every tab works with its default values."""
    import shutil

    from glmtune.data.sample import sample_path
    from glmtune.ui.config import build_tiny_model
    src = sample_path("cmcc34")
    dest = ws.resolve(f"uploads/{src.name}")
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
    build_tiny_model(ws, "models/tiny-glm4")


def parse_auth(auth: str | None) -> tuple[str, str] | None:
    """`user:pass` (from --auth or $GLMTUNE_UI_AUTH) -> (user, pass)."""
    text = auth if auth is not None else os.environ.get(AUTH_ENV)
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise InputError("--auth must be USER:PASSWORD", field="--auth", fix="e.g. --auth admin:s3cret")
    return user, password


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, auth: tuple[str, str] | None) -> None:
    """Anything reachable from other machines needs a login: the page can train and read the workspace."""
    if not is_loopback(host) and auth is None:
        raise InputError(f"binding {host} exposes the UI to other machines without a login", field="--host",
                         fix=f"add --auth USER:PASSWORD (or set {AUTH_ENV}), or keep the default 127.0.0.1")


def _signals_for_jobs() -> None:
    """Stop sends SIGINT to a run. A server started in the background (`glmtune ui &`) has SIGINT
    ignored, and children inherit an ignored signal; a handler is reset to the default on exec."""
    import signal
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    # SIGTERM (a service manager, a test) = Ctrl-C: gradio closes its server, and the atexit hooks
    # stop the running jobs
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def launch(workspace: str | Path, *, host: str = "127.0.0.1", port: int = 7860, auth: str | None = None,
           max_upload_mb: float = MAX_UPLOAD_MB, demo: bool = False, block: bool = True, commands=None):
    """Start the server (blocking unless ``block=False``) and print its URL; returns gradio's
    (app, local url, share url)."""
    credentials = parse_auth(auth)
    check_bind(host, credentials)
    _signals_for_jobs()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from an offline box
    if demo:
        prepare_demo(Workspace(workspace))
    blocks = build_app(workspace, commands)
    blocks.queue(default_concurrency_limit=4)
    # quiet: gradio would also print "To create a public link, set `share=True`", advice glmtune refuses
    # (a share link exposes the workspace to the internet); the URL is printed here instead
    launched = blocks.launch(server_name=host, server_port=port, auth=credentials, share=False, inbrowser=False,
                             max_file_size=f"{max_upload_mb:g}mb", show_error=True, ssr_mode=False,
                             prevent_thread_lock=True, css=CSS, footer_links=[], quiet=True)
    print(f"glmtune ui on {launched[1]} (workspace: {workspace}; Ctrl-C to stop)", flush=True)
    if block:
        blocks.block_thread()
    return launched
