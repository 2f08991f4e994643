"""Terminal chat: a read-answer loop with history, streaming output and slash commands.

Ctrl-C while an answer streams stops that answer (the generation thread ends at its next token)
and returns to the prompt; Ctrl-C at the prompt ends the chat (exit status 130).
"""
from __future__ import annotations

import sys
from typing import Callable, TextIO

HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt), /exit"
USER_PROMPT = "you> "
BOT_PREFIX = "glm> "


def run_chat(predictor, system: str | None = None, *, read: Callable[[str], str] = input,
             out: TextIO = sys.stdout, **gen) -> None:
    """Chat until /exit or end of input. History holds the visible answers (no RAG passages)."""
    history: list[tuple[str, str]] = []
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
            history = []
            out.write("(conversation cleared)\n")
            continue
        if line == "/system" or line.startswith("/system "):
            system = line[len("/system"):].strip() or None
            history = []  # an answer given under another system prompt would mislead the model
            out.write(f"(system prompt {'set' if system else 'cleared'}; conversation cleared)\n")
            continue
        if line.startswith("/"):
            out.write(f"unknown command {line.split()[0]}. {HELP}\n")
            continue
        out.write(BOT_PREFIX)
        answer = stream_answer(predictor, line, history, system, out, **gen)
        out.write("\n")
        if answer is None:
            out.write("(answer stopped; Ctrl-C again at the prompt to quit)\n")
            continue  # a cut answer is not history the model should build on
        if predictor.last_sources:
            out.write(f"(sources: {', '.join(s['id'] for s in predictor.last_sources)})\n")
        history.append((line, answer))


def stream_answer(predictor, line: str, history, system, out: TextIO, **gen) -> str | None:
    """Write the answer as it streams; None when Ctrl-C stopped it (generation is stopped and its
    thread finished before this returns, so the next question starts on an idle model)."""
    answer = ""
    stream = predictor.stream(line, history=history, system=system, **gen)
    try:
        for piece in stream:
            answer += piece
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        stream.close()  # runs the stream's cleanup: cancel, then wait for the generation thread
        return None
    return answer
