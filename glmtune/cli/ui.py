"""`glmtune ui`: the web UI (gradio, the `ui` extra), a thin view over the same functions as the CLI."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from glmtune.cli.main import app


@app.command("ui")
def ui_cmd(
    host: str = typer.Option("127.0.0.1", help="Address to bind. Anything but loopback needs --auth."),
    port: int = typer.Option(7860, help="Port to listen on."),
    workspace: Path = typer.Option(Path("glmtune_workspace"), help="The only folder the page may read or write "
                                                                   "(uploads, data, configs, runs, reports)."),
    auth: Optional[str] = typer.Option(None, help="USER:PASSWORD login (default: $GLMTUNE_UI_AUTH)."),
    max_upload_mb: float = typer.Option(200, help="Largest file the page accepts, in MB."),
    demo: bool = typer.Option(False, help="Put the built-in CMCC-34 sample and a tiny random GLM-4 model in the "
                                          "workspace, so every tab works with its defaults on a CPU."),
) -> None:
    """Web UI: data -> config -> train (live loss curve) -> evaluate -> chat, in a browser page."""
    import importlib.util

    from glmtune.errors import InputError
    if importlib.util.find_spec("gradio") is None:
        raise InputError("the web UI needs gradio", field="ui", fix='pip install -e ".[ui]"')
    from glmtune.ui.app import launch

    launch(workspace, host=host, port=port, auth=auth, max_upload_mb=max_upload_mb, demo=demo,
           commands=cli_commands())


def cli_commands():
    """Every `glmtune` command as a click tree (the UI builds its command forms from it)."""
    import typer

    from glmtune.cli.main import register_commands
    register_commands()
    return typer.main.get_command(app)
