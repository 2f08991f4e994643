"""Chat tab: load a model folder (+ adapter or checkpoint) into a glmtune Predictor, stream answers
with history, system prompt and temperature; Unload drops it and returns the memory.

Nothing is loaded until Load is pressed. One model per UI server (a second Load replaces the first),
so memory use is what the status line says.
"""
from __future__ import annotations

import gc
import threading
import time
from typing import Iterator

from glmtune.ui.common import ok
from glmtune.ui.workspace import Workspace


class LoadedModel:
    """The one Predictor the Chat tab talks to."""

    def __init__(self):
        self.predictor = None
        self.description = ""
        self._lock = threading.Lock()

    def load(self, ws: Workspace, model: str, adapter: str) -> str:
        from glmtune.infer.predictor import Predictor
        model_dir = ws.resolve(model, field="model", must_exist=True)
        adapter_dir = ws.resolve(adapter, field="adapter", must_exist=True) if adapter.strip() else None
        with self._lock:
            self._drop()
            self.predictor = Predictor(model_dir, adapter=adapter_dir)
            self.description = f"{model}" + (f" + {adapter}" if adapter_dir else "")
        net = getattr(self.predictor.backend, "model", None)  # the vllm back-end keeps its own
        size = f", {sum(p.numel() for p in net.parameters()) / 1e6:.1f}M parameters" if net is not None else ""
        return ok(f"loaded {self.description} (template {self.predictor.template.name}{size})")

    def unload(self) -> str:
        with self._lock:
            if self.predictor is None:
                return "no model is loaded"
            what = self.description
            self._drop()
        return ok(f"unloaded {what}; its memory is freed")

    def _drop(self) -> None:
        self.predictor, self.description = None, ""
        gc.collect()
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def text_of(content) -> str:
    """A chat message's text (gradio sends a string or a list of typed parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "")
    return "".join(text_of(part) for part in content or [] if not isinstance(part, dict) or
                   part.get("type", "text") == "text")


def reply(loaded: LoadedModel, message: str, history: list, system: str, temperature: float,
          max_new_tokens: float) -> Iterator[tuple[list, str]]:
    """Stream the answer into the chat: yields (history with the growing answer, cleared input box)."""
    from glmtune.errors import InputError
    predictor = loaded.predictor
    if predictor is None:
        raise InputError("no model is loaded", field="model", fix="press Load first")
    past = [{"role": m["role"], "content": text_of(m["content"])} for m in history or []]
    messages = ([{"role": "system", "content": system}] if system.strip() else []) + past + \
               [{"role": "user", "content": message}]
    answer = ""

    def shown() -> list:
        return past + [{"role": "user", "content": message}, {"role": "assistant", "content": answer}]

    for piece in predictor.stream_chat(messages, temperature=float(temperature), max_new_tokens=int(max_new_tokens)):
        answer += piece
        yield shown(), ""  # a new list each time: gradio diffs what it sent last against this
    yield shown(), ""


def build(ws: Workspace, loaded: LoadedModel) -> None:
    import gradio as gr

    from glmtune.errors import GlmtuneError
    from glmtune.ui.common import error

    with gr.Row():
        model = gr.Textbox("models/tiny-glm4", label="Model folder", elem_id="chat-model")
        adapter = gr.Textbox("runs/lora/final", label="Adapter or checkpoint folder (optional)", elem_id="chat-adapter")
        load_btn = gr.Button("Load", variant="primary", elem_id="chat-load")
        unload_btn = gr.Button("Unload", elem_id="chat-unload")
    status = gr.Markdown(elem_id="chat-status")
    with gr.Row():
        system = gr.Textbox("", label="System prompt", elem_id="chat-system", scale=3)
        temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature (0 = greedy)")
        max_new = gr.Number(64, label="Max new tokens", precision=0, elem_id="chat-max-new")
    bot = gr.Chatbot(label="Chat", elem_id="chat-bot", height=320)
    with gr.Row():
        box = gr.Textbox(label="Message", placeholder="Type and press Enter", elem_id="chat-input", scale=4)
        clear = gr.Button("Clear history", elem_id="chat-clear")

    def on_load(m, a):
        try:
            return loaded.load(ws, m, a)
        except GlmtuneError as e:
            return error(e)

    def on_send(message, history, sys_prompt, temp, max_tokens):
        if not message.strip():
            yield gr.skip(), gr.skip(), gr.skip()
            return
        start, what = time.time(), loaded.description
        try:
            for shown, cleared in reply(loaded, message, history, sys_prompt, temp, max_tokens):
                yield shown, cleared, gr.skip()
        except GlmtuneError as e:
            yield gr.skip(), gr.skip(), error(e)
            return
        # the status line says when the answer is complete (the chat bubble alone cannot tell)
        yield gr.skip(), gr.skip(), ok(f"{what} answered in {time.time() - start:.1f} s")

    load_btn.click(on_load, [model, adapter], status)
    unload_btn.click(loaded.unload, None, status)
    box.submit(on_send, [box, bot, system, temperature, max_new], [bot, box, status])
    clear.click(lambda: [], None, bot)
