"""glmtune's generation engine: static slot KV cache, CUDA-graphed decode steps, chunked prefill,
continuous batching, prefix reuse and several LoRA adapters in one batch, on a transformers model.

    engine = create_engine(model, stop_ids=[...], adapters={"a": "out/a"})
    seq = engine.submit(prompt_ids, max_new_tokens=64); seq.done.wait(); seq.tokens

Modules: :mod:`.attention` (the attention transformers calls), :mod:`.cache` (slots, prefixes),
:mod:`.sampling` (next-token choice on the device), :mod:`.lora` (batched adapters), :mod:`.runner`
(prefill / decode / graphs), :mod:`.scheduler` (the loop). Used by ``infer.backends.HFBackend``.
"""
from __future__ import annotations

from dataclasses import dataclass

from glmtune.infer.engine.attention import StepContext, engine_forward, register_engine_attention
from glmtune.infer.engine.cache import LayerShape, SlotCache, bytes_per_token
from glmtune.infer.engine.fused import fuse_projections, fused_groups
from glmtune.infer.engine.lora import MultiLoRA, UnsupportedAdapter
from glmtune.infer.engine.runner import ModelRunner
from glmtune.infer.engine.scheduler import GenerationEngine, Sequence

__all__ = ["EngineSettings", "GenerationEngine", "MultiLoRA", "Sequence", "UnsupportedAdapter", "create_engine",
           "engine_support", "fuse_projections"]


@dataclass
class EngineSettings:
    """How big the engine is. ``None`` picks the default for the device (CUDA / CPU)."""
    max_model_len: int | None = None    # positions per request (prompt + answer): min(model context, 8192 / 2048)
    max_slots: int | None = None        # requests decoding at once: 256 / 8 (fewer when memory is short)
    memory_fraction: float = 0.85       # share of the device memory free after loading that the KV cache may take
    prefill_tokens: int | None = None   # prompt tokens per prefill forward: 4096 / 512
    cuda_graphs: bool | None = None     # capture decode steps (CUDA only): on
    compile: bool | None = False        # torch.compile the decode layers (~1 min at start): True | False |
                                        # None = on CUDA with graphs (`glmtune serve`'s default)
    compile_prefill: bool = False       # the prefill's norms, MLP and rotary through torch.compile
                                        # (glmtune.infer.engine.regions); off: recompiles under serve
    prefill_graphs: bool | None = None  # prefill forwards padded to token buckets, replayed from CUDA graphs
                                        # (glmtune.infer.engine.prefill_graphs): None = with CUDA graphs and
                                        # FlashAttention varlen; True on a CPU runs the padded forward eagerly
    prefix_cache: bool = True           # reuse the keys of repeated prompt prefixes
    fuse_projections: bool = True       # q/k/v (and gate/up) as one GEMM each, in models the backend loads
                                        # itself (glmtune.infer.engine.fused)


def engine_support(model, *, live_adapters: bool = False) -> str | None:
    """None when the engine can run this model; else why not (the caller falls back to ``generate``).

    ``live_adapters``: the model's PEFT LoRA layers are part of the forward the engine runs, their
    weights read in place (alignment's rollouts of the adapter in training); otherwise a PEFT-wrapped
    model is refused."""
    config = model.config.get_text_config()
    if getattr(model, "peft_config", None) and not live_adapters:
        return "the model is wrapped by PEFT (adapters load into the engine from their folders instead)"
    if any(t in ("sliding_attention", "linear_attention", "mamba") for t in (getattr(config, "layer_types", None) or [])):
        return "it has layers that are not full attention (sliding window / linear)"
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        return "it uses sliding-window attention"
    if model.config.model_type in ("llava", "qwen2_vl", "qwen2_5_vl", "glm4v") or hasattr(model, "vision_tower"):
        return "vision-language models generate through transformers (pictures need their processor's inputs)"
    return None


def create_engine(model, *, stop_ids: list[int], adapters: dict | None = None, lora: MultiLoRA | None = None,
                  settings: EngineSettings | None = None, lock=None) -> tuple[GenerationEngine, MultiLoRA | None, str]:
    """Size the cache, load the adapters (or take ``lora``, already loaded) and start the engine
    thread; returns (engine, lora, summary). ``lock``: held around each of the engine's forwards, so
    other users of the model (scoring) never run at the same time."""
    import torch

    settings = settings or EngineSettings()
    register_engine_attention()
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    if cuda:
        from glmtune.models.speed import register_varlen_attention
        register_varlen_attention()  # probes whether FlashAttention varlen shares KV heads
    config = model.config.get_text_config()
    shapes, dtype, modules = probe_layers(model, device)
    context = int(getattr(config, "max_position_embeddings", 0) or 0) or 8192
    positions = settings.max_model_len or min(context, 8192 if cuda else 2048)
    length = positions + 1  # + the scratch position (glmtune.infer.engine.cache)
    per_token = bytes_per_token(shapes, torch.empty((), dtype=dtype).element_size())
    slots = settings.max_slots or (256 if cuda else 8)
    prefill = settings.prefill_tokens or (4096 if cuda else 512)
    if cuda:
        free, _ = torch.cuda.mem_get_info(device)
        # activations of one prefill forward: ~ tokens x (hidden x 8 + intermediate x 3) values, and headroom
        inter = int(getattr(config, "intermediate_size", 4 * config.hidden_size) or 4 * config.hidden_size)
        reserve = prefill * (config.hidden_size * 8 + inter * 3) * 4 + (1 << 30)
        budget = int(free * settings.memory_fraction) - reserve
        slots = max(0, min(slots, budget // (length * per_token)))
        if slots < 2:
            from glmtune.errors import GlmtuneError
            raise GlmtuneError(f"the KV cache does not fit: {free / 2**30:.1f} GiB free, "
                               f"{length * per_token / 2**30:.2f} GiB per request of {positions} positions. "
                               f"Fix: a smaller max_model_len, or free GPU memory")
    prefix_slots = min(8, slots // 16) if settings.prefix_cache else 0
    if settings.prefix_cache and slots >= 4 and prefix_slots == 0:
        prefix_slots = 1
    cache = SlotCache(shapes, slots, length, dtype, device)
    cache.attach(modules)
    if lora is None and adapters:
        lora = MultiLoRA(model, adapters)
    graphs = cuda if settings.cuda_graphs is None else (settings.cuda_graphs and cuda)
    compiled = compile_choice(model, settings.compile, graphs)
    # off unless asked: under `glmtune serve` on the H200 the regions kept compiling (bench/RESULTS.md, session 13)
    compile_prefill = compile_choice(model, settings.compile_prefill, graphs)
    fused = fused_groups(model)
    padded = prefill_graphs_choice(settings.prefill_graphs, graphs, cuda)
    runner = ModelRunner(model, cache, stop_ids=stop_ids, lora=lora, use_graphs=graphs, compile=compiled,
                         compile_prefill=compile_prefill, prefill_graphs=padded, prefill_tokens=prefill, lock=lock)
    engine = GenerationEngine(runner, prefill_tokens=prefill, prefix_slots=prefix_slots, stop_ids=stop_ids)
    summary = (f"generation engine: {slots - prefix_slots} slots x {positions} positions "
               f"({slots * length * per_token / 2**30:.2f} GiB KV cache), prefill {prefill} tokens per forward, "
               f"{'CUDA graphs' if graphs else 'eager steps' + ('' if cuda else ' (CPU: no CUDA graphs)')}"
               f"{', compiled decode' if compiled else ''}{', compiled prefill regions' if compile_prefill else ''}"
               f"{(', prefill graphs' if graphs else ', padded prefill') if padded else ''}"
               f"{f', {fused} fused projection groups' if fused else ''}"
               f"{', prefix reuse' if prefix_slots else ''}"
               f"{f', {len(lora.names)} adapter(s) batched' if lora else ''}")
    return engine, lora, summary


def prefill_graphs_choice(asked: bool | None, graphs: bool, cuda: bool) -> bool:
    """Whether prefill forwards are padded to token buckets: on CUDA with decode graphs and the
    FlashAttention varlen kernel (the padding's layout is that kernel's), unless turned off; on a CPU
    only when asked (the padded forward runs eagerly there: what the tests compare)."""
    if not cuda:
        return bool(asked)
    from glmtune.models.speed import varlen_available

    return (asked is not False) and graphs and varlen_available()


def compile_choice(model, asked: bool | None, graphs: bool) -> bool:
    """Whether the decode layers go through torch.compile. True: also on a CPU (tests compare it with
    the eager step there); None: on CUDA only. On CUDA only with graphs (compiling is a one-off ~1 min
    that graphs then replay for free; without them the eager step's host time dominates anyway);
    never on a bitsandbytes 4/8-bit base (its layers break inductor's graph)."""
    quantized = getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False)
    cuda = next(model.parameters()).device.type == "cuda"
    wanted = asked if asked is not None else cuda
    return bool(wanted) and (graphs or not cuda) and not quantized


def probe_layers(model, device) -> tuple[dict[int, LayerShape], object, dict]:
    """Each attention layer's K/V head count and widths, the cache dtype and the attention modules
    (layer index -> module), read off one 1-token forward."""
    import torch

    ctx = StepContext(None, "probe")
    with torch.inference_mode(), engine_forward(model, ctx):
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device),
              position_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False)
    if not ctx.probed:
        raise RuntimeError("the model's attention layers never called the attention interface")
    shapes = {i: LayerShape(k[0], k[1], v[1]) for i, (k, v, _) in ctx.probed.items()}
    dtype = next(iter(ctx.probed.values()))[2]
    return shapes, dtype, ctx.modules
