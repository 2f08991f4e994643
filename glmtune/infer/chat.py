"""Terminal chat: a read-answer loop with history, streaming output and slash commands."""
from __future__ import annotations

import sys
from typing import Callable, TextIO

HELP = ("commands: /image PATH (attach a picture to your next message; vision-language models), "
        "/reset (forget the conversation), /system TEXT (set the system prompt), /exit")
USER_PROMPT = "you> "
BOT_PREFIX = "glm> "


def run_chat(predictor, system: str | None = None, *, read: Callable[[str], str] = input,
             out: TextIO = sys.stdout, **gen) -> None:
    """Chat until /exit or end of input. History holds the visible answers (no RAG passages) and
    the pictures attached to each user turn."""
    from glmtune.errors import GlmtuneError

    history: list[dict] = []
    pending: list[dict] = []  # image parts for the next message
    out.write(f"glmtune chat with {predictor.model_dir.name} ({predictor.template.name}). {HELP}\n")
    while True:
        try:
            line = read(USER_PROMPT).strip()
        except EOFError:
            out.write("\n")
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history, pending = [], []
            out.write("(conversation cleared)\n")
            continue
        if line == "/image" or line.startswith("/image "):
            try:
                pending.append(image_part(predictor, line[len("/image"):].strip()))
                out.write(f"(image {len(pending)} attached to your next message)\n")
            except GlmtuneError as e:
                out.write(f"(error: {e})\n")
            continue
        if line == "/system" or line.startswith("/system "):
            system = line[len("/system"):].strip() or None
            history = []  # an answer given under another system prompt would mislead the model
            out.write(f"(system prompt {'set' if system else 'cleared'}; conversation cleared)\n")
            continue
        if line.startswith("/"):
            out.write(f"unknown command {line.split()[0]}. {HELP}\n")
            continue
        query = pending + [{"type": "text", "text": line}] if pending else line
        pending = []
        out.write(BOT_PREFIX)
        answer = ""
        try:
            for piece in predictor.stream(query, history=history, system=system, **gen):
                answer += piece
                out.write(piece)
                out.flush()
        except GlmtuneError as e:  # e.g. a picture that became unreadable: say so, keep chatting
            out.write(f"\n(error: {e})\n")
            continue
        out.write("\n")
        if predictor.last_sources:
            out.write(f"(sources: {', '.join(s['id'] for s in predictor.last_sources)})\n")
        history += [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]


def image_part(predictor, path: str) -> dict:
    """An image part for ``path``, read once now so a bad path is reported at once, not after the
    next question (InputError: missing file, not an image, too large, text-only model)."""
    from glmtune.errors import InputError
    from glmtune.infer.vision import load_images

    if not path:
        raise InputError("/image needs a file path", fix="/image photos/cat.png")
    part = {"type": "image", "image": path}
    predictor.check_images([{"role": "user", "content": [part]}])
    load_images([part], predictor.image_limits)
    return part
