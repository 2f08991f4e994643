"""What every tab shares: status messages the page shows, and a guard that turns errors into them."""
from __future__ import annotations

import functools
import html
import re

from glmtune.errors import GlmtuneError

_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]<>#|~])")


def md_escape(text: str) -> str:
    """User text (paths, error messages) shown literally inside Markdown."""
    return _MD_SPECIAL.sub(r"\\\1", str(text))


def ok(text: str) -> str:
    return f"**done:** {md_escape(text)}"


def error(e: BaseException | str) -> str:
    """The one-line error glmtune's CLI would print, as the page shows it."""
    return f"**error:** {md_escape(e)}"


def guarded(n_outputs: int):
    """Wrap a handler so a GlmtuneError (bad path, bad file, bad config) becomes the status message:
    the first output gets the error, the others are left as they are (gradio.skip())."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except GlmtuneError as e:
                return _error_outputs(e, n_outputs)
            except (OSError, ValueError) as e:  # unreadable file, bad number: still a message, not a crash
                return _error_outputs(f"{type(e).__name__}: {e}", n_outputs)
        return run
    return wrap


def _error_outputs(e: BaseException | str, n_outputs: int):
    import gradio as gr
    if n_outputs == 1:
        return error(e)
    return (error(e), *[gr.skip() for _ in range(n_outputs - 1)])


def html_escape(text: str) -> str:
    return html.escape(text, quote=False)
