"""The `glmtune` command. Thin: parse arguments, call one function per command.

Each command group lives in its own module and registers itself on the app; heavy libraries are
imported inside the command functions so `glmtune --help` stays fast.
"""
from __future__ import annotations

import atexit
import os
import signal
import sys

import typer
from rich.console import Console
from rich.markup import escape

from glmtune.errors import GlmtuneError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="glmtune: fine-tune GLM-family and Hugging Face chat models, from raw data to a served model.")
err = Console(stderr=True)


def register_commands() -> None:
    """Import every command group so each registers its commands on ``app`` (a missing optional group is skipped)."""
    from glmtune.cli import data, demo  # noqa: F401  (each module registers its commands)
    for name in ("train", "align", "model", "eval", "infer", "serve", "rag", "ui"):
        try:
            __import__(f"glmtune.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"glmtune.cli.{name}":
                raise


def main(argv: list[str] | None = None) -> None:
    as_program = argv is None  # the console script / `python -m glmtune`, not a test calling main([...])
    try:
        run_command(argv, as_program)
    except KeyboardInterrupt:
        # A second Ctrl-C that landed while the first one's exit ran, before the handler of
        # exit_at_once_on_ctrl_c was in place (click turns the first into Abort, and its handling
        # takes a few ms): without this it escapes and Python ends the process by SIGINT, not 130.
        if not as_program:
            raise
        _flush_streams()
        os._exit(130)


def run_command(argv: list[str] | None, as_program: bool) -> None:
    """Run the command line; errors become their exit status (main catches a late Ctrl-C)."""
    register_commands()
    try:
        # Non-standalone click *returns* a typer.Exit's code instead of exiting: pass it on, or a
        # failed `--nproc N` run (exit code of `accelerate launch`) would end with status 0.
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and code != 0:
            sys.exit(code)
    except GlmtuneError as e:
        # escape: messages quote user text and fixes such as `pip install -e ".[real]"`, not rich markup
        err.print(f"[bold red]error:[/] {escape(str(e))}", markup=True, highlight=False, soft_wrap=True)
        leave(getattr(e, "exit_code", 2))  # 2: bad input; a DistributedError carries its own
    except KeyboardInterrupt:
        if as_program:
            exit_at_once_on_ctrl_c()
        err.print("[yellow]interrupted[/]")
        sys.exit(130)
    except SystemExit:
        raise
    except OSError as e:  # the machine said no (disk full, permissions) where no stage caught it
        err.print(f"[bold red]error:[/] {escape(str(e))}", markup=True, highlight=False, soft_wrap=True)
        leave(1)
    except Exception as e:  # click usage errors come through here in non-standalone mode
        # by class name: newer typer raises those of its own vendored copy of click, which are not
        # click's classes (a missing required option was a traceback)
        kinds = {c.__name__ for c in type(e).__mro__}
        if "Abort" in kinds:
            sys.exit(130)
        if "ClickException" in kinds:
            e.show()
            sys.exit(e.exit_code)
        raise
    finally:
        if as_program:
            exit_at_once_on_ctrl_c()


def leave(code: int) -> None:
    """End with ``code`` after an error was printed. In a process of a distributed run whose process
    group is up, at once (``os._exit`` after flushing): interpreter shutdown there destroys the
    group's C++ threads while they still run, which aborts the process ("terminate called without an
    active exception", status -6), and the launcher then reports a signal instead of the error's
    code. Nothing is lost: output files are written atomically or appended and flushed as they go."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        import logging

        logging.shutdown()
        _flush_streams()
        os._exit(code)
    sys.exit(code)


def _flush_streams() -> None:
    """Flush stdout and stderr before ``os._exit`` (which skips it); a closed stream is left alone."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def exit_at_once_on_ctrl_c() -> None:
    """From here on the process is ending: a further Ctrl-C ends it at once (status 130).

    Without this, impatient Ctrl-Cs (three in a row) land in interpreter shutdown, in atexit hooks
    (torch's import tabulate) or threading's join of worker threads, and print "Exception ignored
    in ..." tracebacks, or kill the process by SIGINT. Nothing is left to save: output files are
    written atomically or appended and synced as they go."""
    def now(signum, frame):
        _flush_streams()
        os._exit(130)

    try:
        signal.signal(signal.SIGINT, now)
    except ValueError:  # not the main thread: signals are not ours to handle
        return
    # Late in shutdown Python puts SIG_DFL back in place of a Python handler, and a Ctrl-C then kills
    # the process by SIGINT (status -2, not 130); it leaves an ignored signal ignored. atexit hooks run
    # before that point (the last registered first), so from this one on a Ctrl-C is ignored.
    atexit.register(signal.signal, signal.SIGINT, signal.SIG_IGN)


if __name__ == "__main__":
    # Run as `python -m glmtune.cli.main` this file is `__main__`; the command modules register on
    # the importable `glmtune.cli.main.app`, so call that module's main.
    from glmtune.cli.main import main as _main
    _main()
