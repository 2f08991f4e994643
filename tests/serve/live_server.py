"""A served app on a free loopback port in a thread of this process (shared by the serve tests and the
tests that serve a model folder without paying a `glmtune serve` subprocess)."""
from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn in a background thread of this process, on 127.0.0.1 at a free port."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    limit_concurrency=None, backlog=256))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


@contextmanager
def served(*args: str, env: dict | None = None):
    """`glmtune serve ARGS` through the CLI's command in this process, the app it builds on a LiveServer
    (the folder, adapter and limit options go where `glmtune serve` sends them; --host/--port are the
    LiveServer's). For tests about what is served; the server process is tests/serve/test_serve_cli.py's."""
    from typer.testing import CliRunner

    import glmtune.serve.app as serve_app
    from glmtune.cli.main import app, register_commands
    from glmtune.infer.predictor import Predictor

    register_commands()
    built, real_serve, real_close = {}, serve_app.serve, Predictor.close
    serve_app.serve = lambda predictor, host, port, header_timeout, **app_kwargs: built.update(
        app=serve_app.create_app(predictor, **app_kwargs), predictor=predictor)
    # the command closes its predictor once serve() returns; here the app outlives the command
    Predictor.close = lambda self: None
    try:
        res = CliRunner().invoke(app, ["serve", *map(str, args)], env=env)
    finally:
        serve_app.serve, Predictor.close = real_serve, real_close
    assert res.exit_code == 0 and "app" in built, res.output
    try:
        with LiveServer(built["app"]) as live:
            yield live
    finally:
        built["predictor"].close()
