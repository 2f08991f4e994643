"""`Predictor`: chat with a model folder from Python (one answer, a stream, or a batch).

Prompts are built ONLY by the model's template (`tpl.encode_prompt`), the same code that encodes
training data, so serving cannot drift from training; generation stops on the template's stop ids.

    p = Predictor("out/run1/merged")                       # template from glmtune.json
    p("你好")                                               # greedy by default
    p("Hi", history=[("Hello", "Hi!")], system="Be brief", max_new_tokens=64)
    p.chat([{"role": "user", "content": "Hello"}, ...])     # a whole conversation (a query is one turn)
    p.chat_message(messages, tools=tools)                   # GLM-4.5+: {"content", "reasoning_content", "tool_calls"}
    for piece in p.stream("Tell me a story"): print(piece, end="")
    p.batch(["q1", "q2"], batch_size=8)
    p = Predictor(base, adapter={"intent": "out/a", "summary": "out/b"}); p("..", adapter="summary")
    vl = Predictor("models/qwen2-vl")                      # a vision-language folder: content parts
    vl([{"type": "image", "image": "cat.png", "max_pixels": 512 * 512}, {"type": "text", "text": "What is it?"}])
"""
from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

from glmtune.data.records import check_content, content_images, content_text
from glmtune.errors import GlmtuneError, InputError
from glmtune.infer.backends import BACKENDS, GenConfig, Output, check_adapter_name
from glmtune.infer.vision import ImageLimits, first_image_field, has_images, text_messages

# How a retrieved passage enters the prompt: prepended to the user's question in the last user turn
# (every family has a user role; ChatGLM2 has no system role).
RAG_PROMPT = "Answer using the reference passages when they help.\n\n{passages}\n\nQuestion: {query}"


class Predictor:
    """Load a model folder (+ optional LoRA adapters) and answer chat messages.

    ``adapter``: one folder (named after the folder), or ``{name: folder}`` for several; the first is
    the default for calls that name none, ``adapter="base"`` switches adapters off for that call.
    ``rag``: a store written by ``glmtune rag index``; a passage is added to the prompt only when its
    cosine similarity to the question is at least ``rag_threshold`` (see :mod:`glmtune.infer.rag`).
    Message content is a string or a list of text/image parts; images need a vision-language model
    folder (its processor is loaded too) and are checked against ``image_limits``. ``p(query)`` and
    ``p.stream(query)`` take one user turn (see :meth:`messages_for`); ``p.chat(messages)`` a conversation.
    """

    def __init__(self, model: str | Path, adapter: str | Path | dict | None = None, backend: str = "hf",
                 template: str | None = None, rag: str | Path | None = None, rag_threshold: float = 0.3,
                 rag_top_k: int = 2, embedding_model: str | Path | None = None,
                 device: str | None = None, dtype: str = "auto", max_new_tokens: int = 512,
                 image_limits: ImageLimits | None = None, **backend_kwargs):
        from glmtune.models.folder import read_model_folder
        from glmtune.models.loading import check_model_dir, is_vision_model
        from glmtune.models.tokenizer import load_tokenizer
        from glmtune.templates import get_template

        self.model_dir = check_model_dir(model)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.template = get_template(**read_model_folder(self.model_dir).template_args(template))
        self.stop_ids = self.template.stop_token_ids(self.tokenizer)
        if not self.stop_ids:
            raise InputError(f"template '{self.template.name}' has no stop token in this tokenizer",
                             file=self.model_dir, fix="check glmtune.json 'template' or pass template=")
        adapters = _adapter_map(adapter)
        self.default_adapter = next(iter(adapters), None)
        if backend not in BACKENDS:
            raise InputError(f"unknown backend '{backend}'", field="backend", fix="use hf or vllm")
        self.backend = BACKENDS[backend](self.model_dir, self.tokenizer, adapters, device=device,
                                         dtype=dtype, **backend_kwargs)
        self.vision = None
        if is_vision_model(self.model_dir):
            from glmtune.infer.vision import VisionEncoder
            self.vision = VisionEncoder(self.model_dir)
        self.image_limits = image_limits or ImageLimits()
        self.default_gen = {"max_new_tokens": max_new_tokens}
        self.retriever = None
        if rag is not None:
            from glmtune.infer.rag import Retriever
            self.retriever = Retriever(rag, embedding_model=embedding_model)
        self.rag_threshold, self.rag_top_k = rag_threshold, rag_top_k
        self.last_sources: list[dict] = []  # passages the last call put into its prompt

    @classmethod
    def from_model(cls, model, tokenizer, template: str, max_new_tokens: int = 512) -> "Predictor":
        """A Predictor over a model and tokenizer already in memory (HF backend, no RAG)."""
        from glmtune.infer.backends import HFBackend
        from glmtune.templates import get_template
        self = cls.__new__(cls)
        self.model_dir, self.tokenizer, self.template = None, tokenizer, get_template(template)
        self.stop_ids = self.template.stop_token_ids(tokenizer)
        self.backend = HFBackend.from_model(model, tokenizer)
        self.default_adapter = self.backend.adapters[0] if self.backend.adapters else None
        self.default_gen = {"max_new_tokens": max_new_tokens}
        self.retriever, self.rag_threshold, self.rag_top_k, self.last_sources = None, 0.0, 0, []
        self.vision, self.image_limits = None, ImageLimits()
        return self

    def close(self) -> None:
        """Let go of the back-end's engine (and its process, where it has one)."""
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

    @property
    def adapters(self) -> list[str]:
        return list(self.backend.adapters)

    # -- building prompts --------------------------------------------------------------------------
    def messages_for(self, query: str | list[dict], history=None, system: str | None = None) -> list[dict]:
        """The conversation ``__call__`` / ``stream`` answer: ``system``, ``history``, then ``query``.

        ``query`` is the new user turn only: text, or a list of content parts (``{"type": "text"}`` /
        ``{"type": "image"}``). A list of messages is refused, not guessed at: earlier turns go
        through ``history`` (``[(user, assistant), ...]`` pairs or message dicts) and a whole
        conversation through :meth:`chat` / :meth:`stream_chat`.
        """
        _check_query(query)
        msgs = [{"role": "system", "content": system}] if system else []
        for item in history or []:
            if isinstance(item, dict):
                msgs.append(item)
            else:
                user, answer = item
                msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        return msgs + [{"role": "user", "content": query}]

    def prompt_ids(self, messages: Sequence[dict], tools: list | None = None, template=None) -> list[int]:
        """The exact ids generation starts from (RAG passages already in ``messages`` if wanted).
        ``template``: a variant of the model's (``self.template.variant(enable_thinking=False)``).

        With images: a :class:`~glmtune.infer.vision.VisionPrompt` (ids + the processor's tensors)."""
        messages, template = list(messages), template or self.template
        if not has_images(messages):
            return template.encode_prompt(self.tokenizer, text_messages(messages), tools=tools)
        self.check_images(messages)
        return self.vision.encode(template, self.tokenizer, messages, tools, self.image_limits)

    def check_images(self, messages: Sequence[dict], file=None, line: int | None = None) -> None:
        """Refuse images for a text-only model, naming the record (``file``:``line``) and message."""
        if self.vision is None and has_images(messages):
            name = self.model_dir.name if self.model_dir is not None else "this model"
            raise InputError(f"the conversation has an image, but {name} is a text-only model", file=file,
                             line=line, field=first_image_field(messages),
                             fix="use a vision-language model folder (Qwen2-VL, GLM-4V, LLaVA, ...) "
                                 "or drop the image parts")

    def prepare(self, messages: Sequence[dict], tools: list | None = None,
                template=None) -> tuple[list[int], list[dict]]:
        """Prompt ids with retrieved passages added when close enough, and those passages.

        Thread-safe (servers call it per request); the single-user calls also set ``last_sources``.
        """
        messages, sources = self._with_rag(list(messages))
        return self.prompt_ids(messages, tools, template), sources

    def _prepare(self, messages: Sequence[dict], tools) -> list[int]:
        ids, self.last_sources = self.prepare(messages, tools)
        return ids

    def _with_rag(self, messages: list[dict]) -> tuple[list[dict], list[dict]]:
        if self.retriever is None or not messages or messages[-1].get("role") != "user":
            return messages, []
        content = messages[-1]["content"]
        query = content_text(content)
        hits = [h for h in self.retriever.search(query, k=self.rag_top_k)
                if h["similarity"] >= self.rag_threshold]
        if not hits:
            return messages, []
        passages = "\n\n".join(f"[{i + 1}] {h['text']}" for i, h in enumerate(hits))
        text = RAG_PROMPT.format(passages=passages, query=query)
        if isinstance(content, list):  # pictures first, then passages + question as one text part
            text = content_images(content) + [{"type": "text", "text": text}]
        return messages[:-1] + [{**messages[-1], "content": text}], hits

    # -- answering -----------------------------------------------------------------------------------
    def __call__(self, query: str | list[dict], history=None, system: str | None = None, adapter: str | None = None,
                 **gen) -> str:
        return self.chat(self.messages_for(query, history, system), adapter=adapter, **gen)

    def chat(self, messages: Sequence[dict], adapter: str | None = None, tools: list | None = None,
             **gen) -> str:
        return self.generate(self._prepare(messages, tools), adapter=adapter, **gen)[0]

    def chat_message(self, messages: Sequence[dict], adapter: str | None = None, tools: list | None = None,
                     **gen) -> dict:
        """The answer as an OpenAI assistant message: ``content``, and for GLM-4.5+ templates
        ``reasoning_content`` and ``tool_calls`` (arguments as JSON strings) read back from the output."""
        return self.parse(self.chat(messages, adapter=adapter, tools=tools, **gen), tools)

    def parse(self, answer: str, tools: list | None = None) -> dict:
        """An answer's text (as :meth:`chat` returns it) as an OpenAI assistant message (the template's
        ``parse_output``: the content alone, or GLM-4.5+ reasoning and tool calls split off)."""
        return self.template.parse_output(answer, tools)

    def generate(self, prompt_ids: list[int], adapter: str | None = None, **gen) -> tuple[str, Output]:
        """Answer one prepared prompt: ``(text, Output)`` (ids, finish reason) for servers."""
        out = self.backend.generate([prompt_ids], self._adapter(adapter), self.stop_ids, self.gen_config(gen))[0]
        return self.decode(out.token_ids), out

    def stream(self, query: str | list[dict], history=None, system: str | None = None, adapter: str | None = None,
               **gen) -> Iterator[str]:
        """Yield the answer in pieces; joined they equal ``__call__``'s answer."""
        return self.stream_chat(self.messages_for(query, history, system), adapter=adapter, **gen)

    def stream_chat(self, messages: Sequence[dict], adapter: str | None = None, tools=None,
                    **gen) -> Iterator[str]:
        prompt = self._prepare(messages, tools)
        pieces: queue.Queue = queue.Queue()
        cancel = threading.Event()

        def work():
            try:
                self.generate_stream(prompt, pieces.put, adapter=adapter, cancel=cancel, **gen)
                pieces.put(_DONE)
            except BaseException as e:  # hand the error to the consuming thread
                pieces.put(e)

        worker = threading.Thread(target=work, daemon=True, name="glmtune-stream")
        worker.start()
        try:
            while (item := pieces.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancel.set()  # the consumer stopped early: stop generating
            # ... and wait for it: a process exiting while torch runs in a thread can abort
            _join_through_ctrl_c(worker, timeout=30)

    def generate_stream(self, prompt_ids: list[int], on_text, adapter: str | None = None,
                        cancel: threading.Event | None = None, **gen) -> tuple[str, Output]:
        """Generate on the calling thread, calling ``on_text(piece)`` as text becomes final."""
        decoder = StreamDecoder(self)
        on_tokens = lambda ids: _emit(on_text, decoder.update(ids))  # noqa: E731
        out = self.backend.generate([prompt_ids], self._adapter(adapter), self.stop_ids, self.gen_config(gen),
                                    on_tokens=on_tokens, cancel=cancel)[0]
        text = self.decode(out.token_ids)
        _emit(on_text, decoder.finish(text))
        return text, out

    def batch(self, items: Sequence, adapter: str | None = None, batch_size: int = 8,
              **gen) -> list[str]:
        """Answer many prompts, ``batch_size`` at a time, left-padded.

        Items: a question string, a message list, or a canonical record ``{"messages", "tools"?}``.
        """
        prompts = [self._prepare(*self._as_prompt(it)) for it in items]
        answers: list[str] = []
        for start in range(0, len(prompts), batch_size):
            outs = self.backend.generate(prompts[start:start + batch_size], self._adapter(adapter),
                                         self.stop_ids, self.gen_config(gen))
            answers += [self.decode(o.token_ids) for o in outs]
        return answers

    # -- helpers -------------------------------------------------------------------------------------
    def decode(self, token_ids: list[int], final: bool = True) -> str:
        """Answer text of generated ids (stop token already cut), without the GLM metadata line."""
        text = self.tokenizer.decode(token_ids, skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)
        return self.template.answer_text(text, final)

    def _as_prompt(self, item) -> tuple[list[dict], list | None]:
        if isinstance(item, str):
            return self.messages_for(item), None
        if isinstance(item, dict) and "messages" in item:
            return list(item["messages"]), item.get("tools")
        if isinstance(item, (list, tuple)) and all(isinstance(m, dict) for m in item):
            return list(item), None
        raise InputError(f"a batch item must be a string, a message list or a record, "
                         f"not {type(item).__name__}", field="items")

    def _adapter(self, adapter: str | None) -> str | None:
        return self.default_adapter if adapter is None else adapter

    def gen_config(self, gen: dict) -> GenConfig:
        """The settings of one call: the predictor's defaults, overridden by ``gen`` (GenConfig's keywords)."""
        return GenConfig.from_kwargs(**{**self.default_gen, **gen})


_DONE = object()


def _check_query(query) -> None:
    """A query is one user turn's content; a message list passed as one would be read as empty parts."""
    if isinstance(query, list) and query and all(isinstance(m, dict) and "role" in m for m in query):
        raise InputError("query is a list of messages, not content parts", field="query",
                         fix="pass the new user text (or parts) as query and earlier turns as history=, "
                             "or call predictor.chat(messages)")
    check_content(query, "query")


class StreamDecoder:
    """Turn growing token ids into text pieces that never change once emitted.

    Decodes incrementally: each update decodes only the ids from ``prefix`` (a few tokens back, so a
    SentencePiece word's leading space and a byte-level character split across tokens come out as in
    the whole text) and appends what is new; a trailing U+FFFD (half a multi-byte character, e.g.
    Chinese) waits for the next token. A server streaming 64 answers thus decodes a few tokens per
    answer per step, not whole answers. The template's ``answer_text`` then cuts the metadata line.
    """

    def __init__(self, predictor: Predictor):
        self.p, self.emitted = predictor, ""
        self.raw, self.prefix, self.read = "", 0, 0  # decoded text of ids[:read]; decode windows start at prefix
        self.stops, self.cut = set(predictor.stop_ids), None  # cut: where the first stop id is, once seen
        self.fast_decode = rust_decode(predictor.tokenizer)

    def update(self, ids: list[int]) -> str:
        if self.cut is None:  # only the ids not looked at before can hold the first stop id
            self.cut = next((i for i in range(self.read, len(ids)) if ids[i] in self.stops), None)
        cut = len(ids) if self.cut is None else self.cut
        if cut > self.read:
            window = self._decode(ids[self.prefix:self.read])
            text = self._decode(ids[self.prefix:cut])
            if len(text) > len(window) and not text.endswith("\ufffd"):
                self.raw += text[len(window):]
                self.prefix, self.read = self.read, cut
        return self._advance(self.p.template.answer_text(self.raw, final=False))

    def finish(self, final_text: str) -> str:
        return self._advance(final_text)

    def _decode(self, ids: list[int]) -> str:
        if self.fast_decode is not None:
            return self.fast_decode(ids, skip_special_tokens=False)
        return self.p.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _advance(self, text: str) -> str:
        if not text.startswith(self.emitted) or len(text) <= len(self.emitted):
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece


def rust_decode(tokenizer):
    """The Rust tokenizer's own ``decode`` where it is what ``tokenizer.decode`` runs (a fast tokenizer
    whose class keeps transformers' ``_decode``, asked with no clean-up), else None. A streamed token
    costs two decodes; transformers' Python around the Rust call was most of their time (~20 of
    ~25 µs per call)."""
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(tokenizer, PreTrainedTokenizerFast) or backend is None:
        return None
    if type(tokenizer)._decode is not PreTrainedTokenizerFast._decode:
        return None
    return backend.decode


def _join_through_ctrl_c(thread: threading.Thread, timeout: float) -> None:
    """Join ``thread`` even when Ctrl-C comes again meanwhile (a user stopping an answer often
    presses it several times), then pass that Ctrl-C on: the caller still gets an idle model."""
    deadline = time.monotonic() + timeout
    interrupted = False
    while thread.is_alive() and (left := deadline - time.monotonic()) > 0:
        try:
            thread.join(left)
        except KeyboardInterrupt:
            interrupted = True
    if interrupted:
        raise KeyboardInterrupt


def _emit(on_text, piece: str) -> None:
    if piece:
        on_text(piece)


def _adapter_map(adapter) -> dict[str, Path]:
    """Predictor's ``adapter`` as {name: folder}, every name checked before any weights load."""
    if adapter is None:
        return {}
    if isinstance(adapter, dict):
        return {check_adapter_name(str(k)): Path(v) for k, v in adapter.items()}
    path = Path(adapter)
    if not path.is_dir():
        raise GlmtuneError(f"adapter folder not found: {path}. Fix: pass the folder training wrote "
                           f"(it holds adapter_config.json)")
    return {check_adapter_name(path.name or "adapter"): path}
