"""The engine's attention: transformers calls it with each layer's new q/k/v; it writes k/v into the
slot cache and attends over what the slot holds.

Registered with transformers' ``AttentionInterface`` under :data:`ENGINE_ATTENTION` and switched on
only while the engine runs a forward (:func:`engine_forward`), so the same loaded model still serves
``generate``, label scoring and training code with its usual attention. transformers skips building
a mask for an implementation that has no mask function, so the model hands us q/k/v only.

Two shapes of step (the :class:`StepContext` of the forward in flight says which):
  * prefill: one packed row (1, T) of prompt chunks, chunk i = T_i tokens of slot s_i written at
    positions [p_i, p_i + T_i); each chunk attends causally to its slot's first p_i + T_i positions.
  * decode: (B, 1), row r = slot r (the scheduler keeps running requests in slots 0..n-1), writes
    at ``write_pos[r]`` and attends to the first ``kv_len[r]`` positions of its slot, over a
    (B, Hkv, L, D) view of the cache with L a bucket >= every row's length, so a captured CUDA
    graph covers every step whose rows fit it.
Grouped-query heads are handled by viewing the G = Hq / Hkv query heads of one KV head as G query
rows (decode) or by SDPA's ``enable_gqa`` / FlashAttention's native GQA (prefill), never by copying
K/V to every query head.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

ENGINE_ATTENTION = "glmtune_engine"
CACHE_K, CACHE_V = "glmtune_engine_k", "glmtune_engine_v"   # SlotCache.attach's buffer names


@dataclass
class PrefillChunk:
    slot: int
    start: int     # first position written (tokens before it are already in the slot)
    length: int    # tokens in this chunk
    offset: int    # where the chunk starts in the packed row


@dataclass
class StepContext:
    """What the attention function needs for the forward in flight (set by the runner)."""
    cache: object                                  # glmtune.infer.engine.cache.SlotCache
    mode: str                                      # "prefill" | "decode" | "probe"
    chunks: list[PrefillChunk] = field(default_factory=list)
    varlen: dict | None = None                     # packed-K/V FlashAttention inputs (prefill on CUDA)
    token_slots: object = None                     # (T,) int64: the slot of each packed token (prefill)
    token_pos: object = None                       # (T,) int64: the position it is written at (prefill)
    write_pos: object = None                       # (B,) int64: where row r's new k/v go (decode)
    kv_mask: object = None                         # (B, 1, 1, L) bool: positions row r attends (decode)
    probed: dict = field(default_factory=dict)     # layer -> (k shape, v shape, dtype) (probe)
    modules: dict = field(default_factory=dict)    # layer -> the attention module that called (probe)


_CURRENT: list[StepContext] = []


@contextlib.contextmanager
def engine_forward(model, ctx: StepContext):
    """Run a forward of ``model`` with the engine's attention and ``ctx`` as its step context."""
    config = model.config
    old = config._attn_implementation
    config._attn_implementation = ENGINE_ATTENTION
    _CURRENT.append(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.pop()
        config._attn_implementation = old


def engine_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """transformers attention function: q (B, Hq, T, D), k/v (B, Hkv, T, D) -> (B, T, Hq, Dv)."""
    ctx = _CURRENT[-1]
    if ctx.mode == "probe":
        import torch
        layer = module.layer_idx
        ctx.modules[layer] = module
        ctx.probed[layer] = (tuple(key.shape[1:2]) + (key.shape[-1],), tuple(value.shape[1:2]) + (value.shape[-1],),
                             key.dtype)
        return torch.zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1],
                           dtype=query.dtype, device=query.device), None
    if ctx.mode == "decode":
        return _decode(ctx, module, query, key, value, scaling), None
    return _prefill(ctx, module.layer_idx, query, key, value, scaling), None


def _decode(ctx: StepContext, module, query, key, value, scaling):
    import torch

    # the layer's cache as buffers of its own module (SlotCache.attach), not looked up by layer_idx:
    # a compiled decoder layer then reads no per-layer constant and one compile serves every layer
    k_cache, v_cache = getattr(module, CACHE_K), getattr(module, CACHE_V)
    batch, hq, _, d = query.shape
    hkv = key.shape[1]
    rows = torch.arange(batch, device=query.device)
    k_cache[rows, :, ctx.write_pos] = key[:, :, 0]
    v_cache[rows, :, ctx.write_pos] = value[:, :, 0]
    width = ctx.kv_mask.shape[-1]
    keys, values = k_cache[:batch, :, :width], v_cache[:batch, :, :width]
    # (B, Hq, 1, D) -> (B, Hkv, G, D): the G query heads sharing a KV head are G query rows.
    q = query.reshape(batch, hkv, hq // hkv, d)
    out = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=ctx.kv_mask, scale=scaling)
    return out.reshape(batch, hq, 1, -1).transpose(1, 2)


def slot_positions(ranges) -> tuple:
    """(slot, position) of every cache position in ``ranges`` = [(slot, start, end), ...], in order,
    as two (T,) CPU tensors: the index of one scatter or gather per layer for all prompt chunks (a
    loop over chunks would launch 2 copies per chunk per layer: ~4,000 for a 4,096-token prefill of
    25 prompts on a 40-layer model). The runner moves them to the device with its other inputs."""
    import torch

    slots = torch.cat([torch.full((end - start,), slot, dtype=torch.long) for slot, start, end in ranges])
    pos = torch.cat([torch.arange(start, end, dtype=torch.long) for _, start, end in ranges])
    return slots, pos


def prefill_indices(chunks: list[PrefillChunk]) -> tuple:
    """Where each packed prompt token's k/v is written: its chunk's slot, start + its offset in the chunk."""
    return slot_positions([(c.slot, c.start, c.start + c.length) for c in chunks])


def _prefill(ctx: StepContext, layer: int, query, key, value, scaling):
    k_cache, v_cache = ctx.cache.layer(layer)
    # (T, Hkv, D) rows scattered to (slot, :, position)
    k_cache[ctx.token_slots, :, ctx.token_pos] = key[0].transpose(0, 1)
    v_cache[ctx.token_slots, :, ctx.token_pos] = value[0].transpose(0, 1)
    if ctx.varlen is not None:
        return _prefill_varlen(ctx, k_cache, v_cache, query, scaling)
    out = query.new_empty(1, query.shape[2], query.shape[1], value.shape[-1])
    for c in ctx.chunks:
        end = c.start + c.length
        out[0, c.offset:c.offset + c.length] = _bottom_right_causal(
            query[:, :, c.offset:c.offset + c.length], k_cache[c.slot:c.slot + 1, :, :end],
            v_cache[c.slot:c.slot + 1, :, :end], scaling)
    return out


def _bottom_right_causal(q, keys, values, scaling):
    """SDPA of one sequence's n queries over its m >= n keys, query i at key position m - n + i
    (FlashAttention's causal alignment): q (1, Hq, n, D), k/v (1, Hkv, m, D) -> (n, Hq, Dv)."""
    import torch

    n, m = q.shape[2], keys.shape[2]
    gqa = q.shape[1] != keys.shape[1]
    if n == m:
        att = torch.nn.functional.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=scaling,
                                                               enable_gqa=gqa)
    else:
        mask = torch.arange(m, device=q.device)[None, :] <= torch.arange(m - n, m, device=q.device)[:, None]
        att = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling,
                                                               enable_gqa=gqa)
    return att[0].transpose(0, 1)


def varlen_key_indices(chunks: list[PrefillChunk]) -> tuple:
    """The keys the packed chunks attend to: chunk i's slot's first start_i + length_i positions,
    concatenated in chunk order (FlashAttention's packed K/V layout)."""
    return slot_positions([(c.slot, 0, c.start + c.length) for c in chunks])


def _prefill_varlen(ctx: StepContext, k_cache, v_cache, query, scaling):
    """One FlashAttention varlen call over the packed chunks; each chunk's keys are its slot's first
    start + length positions, gathered into one packed (T_k, Hkv, D) tensor by one index per layer
    (bottom-right causal)."""
    from glmtune.models.speed import varlen_gqa_attention

    v = ctx.varlen
    keys, values = k_cache[v["k_slots"], :, v["k_pos"]], v_cache[v["k_slots"], :, v["k_pos"]]
    if query.device.type != "cuda":
        return _varlen_by_sequence(query, keys, values, v["cu_q"].tolist(), v["cu_k"].tolist(), scaling)
    out = varlen_gqa_attention(query[0].transpose(0, 1), keys, values, v["cu_q"], v["cu_k"], v["max_q"],
                               v["max_k"], scale=scaling)
    return out.unsqueeze(0)


def _varlen_by_sequence(query, keys, values, cu_q: list[int], cu_k: list[int], scaling):
    """What the varlen kernel computes, one packed sequence at a time (a CPU: the padded prefill
    forward of :mod:`.prefill_graphs` in tests). q (1, Hq, T, D), k/v (T_k, Hkv, D)."""
    out = query.new_zeros(1, query.shape[2], query.shape[1], values.shape[-1])
    for q0, q1, k0, k1 in zip(cu_q, cu_q[1:], cu_k, cu_k[1:]):
        if q1 > q0:
            out[0, q0:q1] = _bottom_right_causal(query[:, :, q0:q1], keys[k0:k1].transpose(0, 1)[None],
                                                 values[k0:k1].transpose(0, 1)[None], scaling)
    return out


def register_engine_attention() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(ENGINE_ATTENTION, engine_attention_forward)
    return ENGINE_ATTENTION
