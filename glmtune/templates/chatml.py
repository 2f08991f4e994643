"""ChatML (Qwen, SmolLM2, ...) and Llama-3 templates.

Both end an assistant turn with their own end token (``<|im_end|>`` / ``<|eot_id|>``), so the
trained output of a turn is its content plus that token; the header before it is prompt.
"""
from __future__ import annotations

from glmtune.templates.base import Segment, Template


class ChatMLTemplate(Template):
    """``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message.

    ``default_system`` is the system message the model's own chat template inserts when a
    conversation has none (Qwen2.5: "You are Qwen, created by Alibaba Cloud. ..."); None inserts
    nothing. ``glmtune.models.folder.ModelFolder.default_system`` reads it from the model folder.
    """

    name = "qwen"
    stop_tokens = ("<|im_end|>", "<|endoftext|>")

    def __init__(self, default_system: str | None = None):
        self.default_system = default_system

    def segments(self, messages, tools=None, add_generation_prompt=False, add_eos=True):
        if messages[0]["role"] != "system" and self.default_system is not None:
            messages = [{"role": "system", "content": self.default_system}] + list(messages)
            shift = -1
        else:
            shift = 0
        segs = []
        for i, msg in enumerate(messages):
            turn = i + shift
            segs.append(Segment("<|im_start|>", special=True, turn=turn))
            if msg["role"] == "assistant":
                segs += [Segment("assistant\n", turn=turn),
                         Segment(msg["content"], turn=turn, trained=True),
                         Segment("<|im_end|>", special=True, turn=turn, trained=True)]
            else:
                segs += [Segment(f"{msg['role']}\n{msg['content']}", turn=turn),
                         Segment("<|im_end|>", special=True, turn=turn)]
            segs.append(Segment("\n", turn=turn))
        if add_generation_prompt:
            segs += [Segment("<|im_start|>", special=True, turn=len(messages) + shift),
                     Segment("assistant\n", turn=len(messages) + shift)]
        return segs


class Llama3Template(Template):
    """``<|begin_of_text|>`` then ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``.

    Content is stripped, as Meta's template does (``message['content'] | trim``).
    """

    name = "llama3"
    stop_tokens = ("<|eot_id|>", "<|end_of_text|>")

    def segments(self, messages, tools=None, add_generation_prompt=False, add_eos=True):
        segs = [Segment("<|begin_of_text|>", special=True)]
        for turn, msg in enumerate(messages):
            segs += self._header(msg["role"], turn)
            trained = msg["role"] == "assistant"
            segs += [Segment(msg["content"].strip(), turn=turn, trained=trained),
                     Segment("<|eot_id|>", special=True, turn=turn, trained=trained)]
        if add_generation_prompt:
            segs += self._header("assistant", len(messages))
        return segs

    @staticmethod
    def _header(role: str, turn: int) -> list[Segment]:
        return [Segment("<|start_header_id|>", special=True, turn=turn), Segment(role, turn=turn),
                Segment("<|end_header_id|>", special=True, turn=turn), Segment("\n\n", turn=turn)]
