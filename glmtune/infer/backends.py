"""Inference back-ends: token ids in, token ids / text out. The template never lives here.

A back-end receives finished prompt ids (built by the template in :mod:`glmtune.infer.predictor`)
and the stop ids, so HF and vLLM see exactly the prompt training saw. Back-ends are a plugin
boundary: ``BACKENDS`` maps a name to a class. A prompt with images is a
:class:`~glmtune.infer.vision.VisionPrompt`: its ids plus the processor's tensors and pictures.
"""
from __future__ import annotations

import contextlib
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from glmtune.errors import GlmtuneError, InputError

log = logging.getLogger("glmtune.infer")

BASE = "base"  # reserved adapter name meaning "the base model, adapters switched off"
# An adapter's name becomes a module key inside peft (torch refuses "." in those: a KeyError deep in
# loading) and the `model` id requests pick it by, so it is a plain name: no dots, no path separators.
ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]+")


def check_adapter_name(name: str, *, field: str = "adapter") -> str:
    """``name`` if it can name an adapter, else an InputError naming ``field`` (e.g. ``--adapter``)."""
    if name == BASE:
        raise InputError(f"'{BASE}' is reserved for the model without adapters", field=field,
                         fix="give the adapter another name (NAME=DIR)")
    if not ADAPTER_NAME.fullmatch(name):
        raise InputError(f"adapter name '{name}' is not a plain name (letters, digits, - and _ only)", field=field,
                         fix="name it explicitly as NAME=DIR, e.g. intent-v2=out/run/final")
    return name


@dataclass
class GenConfig:
    """Decoding settings. ``temperature`` 0 (the default) means greedy, so answers are reproducible."""
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None

    @classmethod
    def from_kwargs(cls, **gen) -> "GenConfig":
        # OpenAI's name `max_tokens` and HF's `max_new_tokens` both work; `do_sample=False` forces greedy.
        if "max_tokens" in gen:
            gen.setdefault("max_new_tokens", gen.pop("max_tokens"))
        if gen.pop("do_sample", None) is False:
            gen["temperature"] = 0.0
        unknown = set(gen) - set(cls.__dataclass_fields__)
        if unknown:
            raise InputError(f"unknown generation option(s) {sorted(unknown)}", field="gen",
                             fix=f"use {', '.join(cls.__dataclass_fields__)}")
        cfg = cls(**{k: v for k, v in gen.items() if v is not None})
        if cfg.max_new_tokens < 1:
            raise InputError("max_new_tokens must be at least 1", field="max_new_tokens")
        return cfg

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass
class Output:
    """One generated answer: new token ids (stop token cut off), and why generation ended."""
    token_ids: list[int]
    finish_reason: str  # "stop" (a stop token) | "length" (max_new_tokens) | "cancelled"


OnTokens = Callable[[list[int]], None]  # called with all new ids so far, after each step


class HFBackend:
    """transformers + glmtune's generation engine (:mod:`glmtune.infer.engine`).

    Text prompts generate through the engine: continuous batching over a static KV cache, CUDA-graphed
    decode steps, and every loaded adapter in the same batch. Where the engine cannot run (a
    vision-language prompt, an adapter it cannot batch, a model it does not support) ``generate``
    falls back to transformers' ``generate`` and says why once (``engine_problem``). One lock:
    the engine's steps, scoring and the fallback never run the model at the same time.
    """

    name = "hf"

    def __init__(self, model_dir: str | Path, tokenizer, adapters: dict[str, Path], *,
                 device: str | None = None, dtype: str = "auto", liger: str = "none", engine=None):
        import torch

        from glmtune.infer.engine import MultiLoRA, UnsupportedAdapter, engine_support, fuse_projections
        from glmtune.models.loading import load_model

        self.tokenizer = tokenizer
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.engine_settings = _engine_settings(engine)
        if liger == "auto" and _engine_may_compile(self.engine_settings, self.device):
            liger = "none"  # inductor fuses the decode step's norms itself; liger's kernels break its graph
        self.liger = _apply_inference_liger(model_dir, liger, self.device)
        model = load_model(model_dir, dtype=dtype).to(self.device)
        self.adapters = list(adapters)
        self.lora = None
        self.engine_problem = None if self.engine_settings is not None else "engine=off was asked for"
        if adapters:
            _check_adapter_folders(adapters)
            try:
                self.lora = MultiLoRA(model, adapters)
            except UnsupportedAdapter as e:  # PEFT runs it, one adapter at a time, without the engine
                self.engine_problem = f"an adapter the engine cannot batch ({e})"
                model = _load_adapters(model, adapters)
        self.engine_problem = self.engine_problem or engine_support(model)
        if self.engine_problem is None and self.engine_settings.fuse_projections:
            fuse_projections(model)  # this backend loaded the model: it is for inference only
            if self.lora is not None:
                self.lora.attach(model)
        self.model = model.eval()
        self._engine = None
        self._engine_summary = None
        self._lock = threading.Lock()
        self._said_fallback = False

    @classmethod
    def from_model(cls, model, tokenizer, device: str | None = None) -> "HFBackend":
        """Wrap a model already in memory (a notebook, a benchmark); its peft adapters, if any, stay."""
        from glmtune.infer.engine import EngineSettings, engine_support

        self = cls.__new__(cls)
        self.tokenizer, self.model = tokenizer, model.eval()
        self.device = device or str(next(model.parameters()).device)
        peft_config = getattr(model, "peft_config", None) or {}
        self.adapters = [a for a in peft_config if a != "default"] or list(peft_config)
        self.lora, self.engine_settings = None, EngineSettings()
        self.engine_problem = engine_support(self.model)
        self._engine, self._engine_summary, self._said_fallback = None, None, False
        self._lock = threading.Lock()
        return self

    def generate(self, prompts: list[list[int]], adapter: str | None, stop_ids: list[int],
                 gen: GenConfig, on_tokens: OnTokens | None = None,
                 cancel: threading.Event | None = None) -> list[Output]:
        """Answer every prompt (the engine runs them together); ``on_tokens`` streams (one prompt only)."""
        if on_tokens is not None and len(prompts) != 1:
            raise GlmtuneError("streaming works on one prompt at a time")
        problem = self.engine_problem or _vision_problem(prompts)
        if problem is None:
            return self._engine_generate(prompts, adapter, stop_ids, gen, on_tokens, cancel)
        self._say_fallback(problem)
        return self._transformers_generate(prompts, adapter, stop_ids, gen, on_tokens, cancel)

    # -- the engine ---------------------------------------------------------------------------------
    def engine(self, stop_ids: list[int]):
        """The generation engine, started on first use (it sizes its KV cache from free memory)."""
        from glmtune.infer.engine import create_engine

        with self._lock:
            if self._engine is None:
                self._engine, _, self._engine_summary = create_engine(
                    self.model, stop_ids=stop_ids, lora=self.lora, settings=self.engine_settings, lock=self._lock)
                log.info(self._engine_summary)
            else:
                check_stop_ids(self._engine, stop_ids)
        return self._engine

    @property
    def engine_summary(self) -> str | None:
        """What the engine is (slots, cache, graphs), once started; or why generation falls back."""
        if self.engine_problem is not None:
            return f"transformers' generate (glmtune's engine is off: {self.engine_problem})"
        if self._engine is None:
            return None
        return f"{self._engine_summary}; {self._engine.graphs_note}"

    def _engine_generate(self, prompts, adapter, stop_ids, gen: GenConfig, on_tokens, cancel) -> list[Output]:
        return generate_on_engine(self.engine(stop_ids), self.adapter_index(adapter), prompts, gen, on_tokens, cancel)

    def adapter_index(self, adapter: str | None) -> int:
        """The engine's index of ``adapter`` (-1: the base model); unknown names are a clear error."""
        if adapter in (None, BASE):
            return -1
        if adapter not in self.adapters:
            raise no_such_adapter(adapter, self.adapters)
        return self.lora.index(adapter)

    def _say_fallback(self, problem: str) -> None:
        # logged, not printed: a vision model or `engine=off` is the user's choice, nothing to act on
        # (`engine_summary` and serve's start-up line say the same)
        if not self._said_fallback:
            self._said_fallback = True
            log.info("generating with transformers' generate, not glmtune's engine: %s", problem)

    # -- transformers' generate (the fallback) ------------------------------------------------------
    def _transformers_generate(self, prompts, adapter, stop_ids, gen: GenConfig, on_tokens, cancel) -> list[Output]:
        """Generate for a left-padded batch with ``model.generate``."""
        import torch

        input_ids, attention = self._left_pad(prompts)
        criteria = _stopping_criteria(cancel, on_tokens, input_ids.shape[1])
        kwargs = dict(max_new_tokens=gen.max_new_tokens, eos_token_id=stop_ids,
                      pad_token_id=self.pad_id(stop_ids), stopping_criteria=criteria,
                      repetition_penalty=gen.repetition_penalty)
        if gen.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k)
        kwargs.update(self._vision_inputs(prompts, input_ids.shape[1]))
        with self._lock, torch.inference_mode(), self.adapter_scope(adapter):
            if gen.seed is not None:
                torch.manual_seed(gen.seed)
            out = self.model.generate(input_ids=input_ids.to(self.device),
                                      attention_mask=attention.to(self.device), **kwargs)
        new = out[:, input_ids.shape[1]:].tolist()
        cancelled = cancel is not None and cancel.is_set()
        return [cut_at_stop(ids, stop_ids, cancelled) for ids in new]

    def _left_pad(self, prompts: list[list[int]]):
        """(B, T) ids and mask, padded on the left so every row's next token sits at position T."""
        import torch

        width = max(len(p) for p in prompts)
        pad = self.pad_id([])
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
        return ids, mask

    def _vision_inputs(self, prompts: list[list[int]], width: int) -> dict:
        """The batch's image tensors for ``generate``: per-image rows (pixel values, grids) joined in
        prompt order; per-token ones (modality ids) left-padded like the ids (padding = text, 0)."""
        import torch

        from glmtune.infer.vision import PER_TOKEN_KEYS

        parts = [getattr(p, "inputs", None) or {} for p in prompts]
        keys = dict.fromkeys(k for part in parts for k in part)
        dtype = self.model.dtype  # pixel values in the model's dtype (bf16 models want bf16 pixels)
        out = {}
        for key in keys:
            if key in PER_TOKEN_KEYS:
                rows = [torch.zeros(len(p), dtype=torch.long) if key not in part else part[key]
                        for p, part in zip(prompts, parts)]
                value = torch.stack([torch.cat([r.new_zeros(width - len(r)), r]) for r in rows])
            else:
                value = torch.cat([part[key] for part in parts if key in part])
            out[key] = value.to(self.device, dtype=dtype) if value.is_floating_point() else value.to(self.device)
        return out

    def pad_id(self, stop_ids: list[int]) -> int:
        # Padding is masked out, so any id works; the tokenizer's pad, else a stop id, else 0.
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = stop_ids[0] if stop_ids else (self.tokenizer.eos_token_id or 0)
        return pad

    @contextlib.contextmanager
    def scoring(self, adapter: str | None):
        """The torch model for forward passes of one's own (label scoring), with ``adapter`` active
        and other calls held off until the block ends. Back-ends without it cannot score."""
        import torch

        with self._lock, torch.inference_mode(), self.adapter_scope(adapter):
            yield self.model

    def adapter_scope(self, adapter: str | None):
        """``adapter`` active for every token of the forwards inside (scoring, the fallback)."""
        if self.lora is not None:
            index = self.adapter_index(adapter)
            return self.lora.select(index) if index >= 0 else contextlib.nullcontext()
        if not self.adapters:
            if adapter not in (None, BASE):
                raise InputError(f"no adapter named '{adapter}' is loaded (none are)", field="adapter")
            return contextlib.nullcontext()
        if adapter in (None, BASE):
            return self.model.disable_adapter()
        if adapter not in self.adapters:
            raise InputError(f"no adapter named '{adapter}' is loaded", field="adapter",
                             fix=f"use one of {', '.join([BASE] + self.adapters)}")
        self.model.set_adapter(adapter)
        return contextlib.nullcontext()

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()


def no_such_adapter(adapter: str, loaded: list[str]) -> InputError:
    """The error for a request naming an adapter that is not loaded."""
    return InputError(f"no adapter named '{adapter}' is loaded" + ("" if loaded else " (none are)"),
                      field="adapter", fix=f"use one of {', '.join([BASE] + list(loaded))}")


def check_stop_ids(engine, stop_ids: list[int]) -> None:
    """An engine is started for one set of stop ids; a caller asking for others is a bug to report."""
    if set(stop_ids) != engine.stop_ids:
        raise GlmtuneError(f"the engine stops on {sorted(engine.stop_ids)}, not {sorted(stop_ids)}")


def generate_on_engine(engine, index: int, prompts, gen: GenConfig, on_tokens: OnTokens | None,
                       cancel: threading.Event | None) -> list[Output]:
    """Answer ``prompts`` on a generation engine (in this process or another: the same interface)
    with adapter ``index``; ``on_tokens`` streams the one prompt's ids on the caller's thread."""
    import queue

    updates = queue.SimpleQueue() if on_tokens is not None else None
    seqs = [engine.submit(list(p), max_new_tokens=gen.max_new_tokens, temperature=gen.temperature,
                          top_p=gen.top_p, top_k=gen.top_k, repetition_penalty=gen.repetition_penalty,
                          seed=gen.seed, adapter=index, cancel=cancel,
                          on_update=updates.put if updates is not None else None) for p in prompts]
    if updates is not None:  # the caller's callback runs here, never on the engine's thread
        seq, shown = seqs[0], 0
        while not seq.done.is_set() or shown < len(seq.tokens):
            updates.get()
            ids = list(seq.tokens)
            if len(ids) > shown:
                shown = len(ids)
                on_tokens(ids)
    outs = []
    for seq in seqs:
        seq.done.wait()
        if seq.error is not None:
            raise seq.error
        outs.append(engine_output(seq))
    return outs


def engine_output(seq) -> Output:
    """A finished engine request as an Output (the stop token cut off)."""
    if seq.finish_reason == "stop":
        return Output(list(seq.tokens[:-1]), "stop")
    return Output(list(seq.tokens), seq.finish_reason if seq.finish_reason != "error" else "cancelled")


def _engine_settings(engine):
    """``engine``: None / "auto" (defaults), "off", a dict or EngineSettings -> EngineSettings or None."""
    from glmtune.infer.engine import EngineSettings

    if engine in (None, "auto"):
        return EngineSettings()
    if engine in ("off", False):
        return None
    if isinstance(engine, EngineSettings):
        return engine
    if isinstance(engine, dict):
        unknown = set(engine) - set(EngineSettings.__dataclass_fields__)
        if unknown:
            raise InputError(f"unknown engine setting(s) {sorted(unknown)}", field="engine",
                             fix=f"use {', '.join(EngineSettings.__dataclass_fields__)}")
        return EngineSettings(**engine)
    raise InputError(f"engine must be auto, off or a dict of settings, not {engine!r}", field="engine")


def _engine_may_compile(settings, device: str) -> bool:
    """The engine will compile its decode step (on CUDA with graphs, unless turned off)."""
    return (settings is not None and settings.compile is not False and settings.cuda_graphs is not False
            and str(device).startswith("cuda"))


def _vision_problem(prompts) -> str | None:
    if any(getattr(p, "inputs", None) for p in prompts):
        return "the prompt has pictures (their pixel inputs go through transformers)"
    return None


def _check_adapter_folders(adapters: dict[str, Path]) -> None:
    from glmtune.models.loading import check_safetensors_files

    for name, path in adapters.items():
        check_adapter_name(name)
        if not (Path(path) / "adapter_config.json").exists():
            raise InputError("not a LoRA adapter folder (adapter_config.json is missing)", file=path,
                             fix="pass the folder that training wrote the adapter to")
        check_safetensors_files(path)


LIGER = ("auto", "all", "none")  # speed.liger's values without flce: inference computes no loss


def _apply_inference_liger(model_dir: str | Path, liger: str, device: str) -> str:
    """liger-kernel's RMSNorm and SwiGLU (no fused loss: nothing is trained) patched into
    transformers before the model is built: +16% classification throughput on GLM-4-9B (bench/RESULTS.md).
    ``liger`` is named and valued as the training config's speed.liger: ``auto`` uses the kernels on
    CUDA when liger-kernel can patch this model type, ``all`` insists, ``none``; returns what was
    applied (all | none). The Python default is none: the patch is process-wide and stays (training
    undoes its own), so a library caller opts in; `glmtune eval classify --liger` defaults to auto."""
    from glmtune.models import speed
    from glmtune.models.folder import read_model_folder
    if liger == "flce":
        raise InputError("liger=flce fuses the training loss; inference computes none", field="liger",
                         fix="use all (RMSNorm + SwiGLU), auto or none")
    if liger not in LIGER:
        raise InputError(f"unknown liger '{liger}'", field="liger", fix="use auto, all or none")
    if liger == "none":
        return "none"
    model_type = read_model_folder(model_dir).model_type or ""
    why_not = "it needs a CUDA device" if not str(device).startswith("cuda") else speed.liger_support(model_type)
    if why_not is not None:
        if liger == "all":
            raise InputError(f"liger=all cannot run here: {why_not}", field="liger",
                             fix='on a CUDA GPU, pip install -e ".[gpu]"; or use liger=auto / none')
        return "none"
    speed.apply_liger(model_type, fused_linear_cross_entropy=False, rms_norm=True, swiglu=True)
    return "all"


def _load_adapters(model, adapters: dict[str, Path]):
    """Wrap the model in peft with every adapter loaded under its name (chosen per call later)."""
    from peft import PeftModel

    items = list(adapters.items())
    first_name, first_path = items[0]
    peft_model = PeftModel.from_pretrained(model, str(first_path), adapter_name=first_name)
    for name, path in items[1:]:
        peft_model.load_adapter(str(path), adapter_name=name)
    return peft_model


def _stopping_criteria(cancel, on_tokens, prompt_len: int):
    """A StoppingCriteria that streams new ids and stops early when the caller cancels."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Hook(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            if on_tokens is not None:
                on_tokens(input_ids[0, prompt_len:].tolist())
            stop = cancel is not None and cancel.is_set()
            return input_ids.new_full((input_ids.shape[0],), stop, dtype=bool)

    return StoppingCriteriaList([_Hook()])


def cut_at_stop(ids: list[int], stop_ids: list[int], cancelled: bool) -> Output:
    """Generated ids up to the first stop id, and why generation ended (stop / cancelled / length)."""
    stops = set(stop_ids)
    for i, tid in enumerate(ids):
        if tid in stops:
            return Output(ids[:i], "stop")
    return Output(ids, "cancelled" if cancelled else "length")


class VLLMBackend:
    """vLLM offline engine. Prompts go in as token ids so our template, not vLLM's, builds them.

    vLLM's offline ``LLM`` returns whole answers, so streaming yields one piece at the end.
    """

    name = "vllm"

    def __init__(self, model_dir: str | Path, tokenizer, adapters: dict[str, Path], *,
                 device: str | None = None, dtype: str = "auto", **engine_kwargs):
        try:
            from vllm import LLM
        except ImportError:
            raise GlmtuneError("backend 'vllm' needs vLLM, which is not installed. Fix: "
                               "`pip install 'glmtune[vllm]'` on a machine with a CUDA GPU, "
                               "or use backend='hf'.") from None
        from glmtune.models.loading import check_model_dir, is_vision_model

        self.tokenizer = tokenizer
        self.adapters = list(adapters)
        self._adapter_paths = {n: str(p) for n, p in adapters.items()}
        if is_vision_model(model_dir):  # vLLM allows one image per prompt unless told otherwise
            from glmtune.infer.vision import ImageLimits
            engine_kwargs.setdefault("limit_mm_per_prompt", {"image": ImageLimits.max_images})
        self.llm = LLM(model=str(check_model_dir(model_dir)), dtype=dtype,
                       enable_lora=bool(adapters), **engine_kwargs)
        self._lock = threading.Lock()

    def generate(self, prompts, adapter, stop_ids, gen: GenConfig, on_tokens=None, cancel=None):
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=gen.max_new_tokens, temperature=gen.temperature,
                                top_p=gen.top_p, top_k=gen.top_k or -1, seed=gen.seed,
                                repetition_penalty=gen.repetition_penalty, stop_token_ids=stop_ids,
                                skip_special_tokens=False)
        with self._lock:
            outs = self.llm.generate([_vllm_prompt(p) for p in prompts], params,
                                     lora_request=self._lora_request(adapter), use_tqdm=False)
        results = [cut_at_stop(list(o.outputs[0].token_ids), stop_ids, False) for o in outs]
        if on_tokens is not None:
            on_tokens(results[0].token_ids)
        return results

    def _lora_request(self, adapter: str | None):
        if adapter in (None, BASE):
            return None
        if adapter not in self._adapter_paths:
            raise InputError(f"no adapter named '{adapter}' is loaded", field="adapter",
                             fix=f"use one of {', '.join([BASE] + self.adapters)}")
        from vllm.lora.request import LoRARequest

        # vLLM wants a positive integer id per adapter; its position is stable for this engine.
        return LoRARequest(adapter, self.adapters.index(adapter) + 1, self._adapter_paths[adapter])


def _vllm_prompt(prompt: list[int]) -> dict:
    """vLLM's token prompt; with images, ``multi_modal_data`` holds the sized pictures and the ids
    keep one placeholder per image, which vLLM's processor expands (as for its text prompts)."""
    images = getattr(prompt, "images", None)
    if not images:
        return {"prompt_token_ids": list(prompt)}
    return {"prompt_token_ids": list(prompt.unexpanded_ids), "multi_modal_data": {"image": images}}


def _process_backend(*args, **kwargs):
    """HF back-end whose model and engine run in a child process (glmtune.infer.engine_process)."""
    from glmtune.infer.engine_process import ProcessBackend
    return ProcessBackend(*args, **kwargs)


BACKENDS = {"hf": HFBackend, "vllm": VLLMBackend, "hf-process": _process_backend}
