"""Terminal chat: a read-answer loop with history, streaming output and slash commands.

Ctrl-C while an answer streams stops that answer (the generation thread ends at its next token)
and returns to the prompt; Ctrl-C at the prompt ends the chat (exit status 130).
"""
from __future__ import annotations

import sys
from typing import Callable, TextIO

HELP = ("commands: /image PATH (attach a picture to your next message; vision-language models), "
        "/reset (forget the conversation), /system TEXT (set the system prompt), /exit")
USER_PROMPT = "you> "
BOT_PREFIX = "glm> "


def run_chat(predictor, system: str | None = None, *, read: Callable[[str], str] = input,
             out: TextIO | None = None, **gen) -> None:
    """Chat until /exit or end of input. History holds the visible answers (no RAG passages) and
    the pictures attached to each user turn. ``out`` defaults to the ``sys.stdout`` of the call, not
    of the import (a test runner or a redirect may have replaced it since)."""
    from glmtune.errors import GlmtuneError

    out = sys.stdout if out is None else out

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
        try:
            answer = stream_answer(predictor, query, history, system, out, **gen)
        except GlmtuneError as e:  # e.g. a picture that became unreadable: say so, keep chatting
            out.write(f"\n(error: {e})\n")
            continue
        out.write("\n")
        if answer is None:
            out.write("(answer stopped; Ctrl-C again at the prompt to quit)\n")
            continue  # a cut answer is not history the model should build on
        if predictor.last_sources:
            out.write(f"(sources: {', '.join(s['id'] for s in predictor.last_sources)})\n")
        # the answer as the model's template reads it back (GLM-4.5+: reasoning and tool calls apart)
        reply = {k: v for k, v in predictor.parse(answer).items() if v is not None}
        history += [{"role": "user", "content": query}, reply]


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


def stream_answer(predictor, query, history, system, out: TextIO, **gen) -> str | None:
    """Write the answer as it streams; None when Ctrl-C stopped it (generation is stopped and its
    thread finished before this returns, so the next question starts on an idle model)."""
    answer = ""
    stream = predictor.stream(query, history=history, system=system, **gen)
    shown = ShownParts(out, predictor.template.output_stream())
    try:
        for piece in stream:
            answer += piece
            shown.write(piece)
    except KeyboardInterrupt:
        stream.close()  # runs the stream's cleanup: cancel, then wait for the generation thread
        return None
    shown.finish()
    return answer


class ShownParts:
    """Write a streamed answer: as it comes, or (GLM-4.5+ templates, ``parser``) its reasoning after
    ``[thinking]``, then the answer, then each tool call as ``[tool call] name {arguments}``."""

    def __init__(self, out: TextIO, parser=None):
        self.out, self.parser, self.last = out, parser, None

    def write(self, piece: str) -> None:
        if self.parser is None:
            self._put(piece)
        else:
            for delta in self.parser.feed(piece):
                self._delta(delta)
        self.out.flush()

    def finish(self) -> None:
        if self.parser is not None:
            for delta in self.parser.finish():
                self._delta(delta)
        self.out.flush()

    def _delta(self, delta: dict) -> None:
        key, value = next(iter(delta.items()))
        if key == "reasoning_content":
            self._put(value, "[thinking] " if self.last != key else "")
        elif key == "content":
            self._put(value, "\n" if self.last == "reasoning_content" else "")
        else:
            for call in value:
                fn = call["function"]
                self._put(f"[tool call] {fn['name']} {fn['arguments']}", "\n" if self.last else "")
        self.last = key

    def _put(self, text: str, lead: str = "") -> None:
        self.out.write(lead + text)
