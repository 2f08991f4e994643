"""ChatGLM's forward written from modeling_chatglm.py, over a source checkpoint's own tensors.

Independent of glmtune's importer on purpose (no name mapping, no GLM code): the import tests
compare the native model's logits with it, and bench/chatglm_import_gpu.sh does the same at the
GLM-4-9B shape. Imports torch and safetensors only, so it runs where pytest is not installed.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch


def read_source_tensors(src: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of the source checkpoint, read the plain way (safetensors preferred, as published)."""
    from safetensors.torch import load_file

    files = sorted(src.glob("*.safetensors")) or sorted(src.glob("*.bin"))
    tensors = {}
    for f in files:
        tensors.update(load_file(f, device=device) if f.suffix == ".safetensors"
                       else torch.load(f, weights_only=True, map_location=device))
    return tensors


def chatglm_reference_logits(t: dict[str, torch.Tensor], cfg: dict, ids: list[int]) -> torch.Tensor:
    """ChatGLM's forward as modeling_chatglm.py computes it, from the source tensors, in fp32: [seq, vocab].

    RMSNorm; fused query_key_value split into q (heads) and k, v (multi_query_group_num groups each,
    head i reading group i // (heads / groups)); rotary on the first kv_channels/2 dims of each head
    in interleaved pairs (x0, x1) with base 10000 * rope_ratio; causal softmax(q k^T / sqrt(d));
    SwiGLU = silu(first half of dense_h_to_4h) * second half; pre-norm residuals; final norm; output layer.
    """
    def w(name):  # fp32 copy per use: a 9B checkpoint need not exist twice in memory
        return t[name].float()

    dev = t["transformer.output_layer.weight"].device
    n, heads, groups, d = len(ids), cfg["num_attention_heads"], cfg["multi_query_group_num"], cfg["kv_channels"]
    eps, rot = cfg["layernorm_epsilon"], d // 2
    theta = 1.0 / (10000.0 * cfg.get("rope_ratio", 1)) ** (torch.arange(0, rot, 2, dtype=torch.float32, device=dev) / rot)
    angle = torch.outer(torch.arange(n, dtype=torch.float32, device=dev), theta)  # [n, rot/2]
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]

    def rms(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def rotary(x):  # [n, h, d]: pairs (x[2i], x[2i+1]) of the first `rot` dims turn by angle i
        pairs, rest = x[..., :rot].reshape(n, x.shape[1], rot // 2, 2), x[..., rot:]
        x0, x1 = pairs[..., 0], pairs[..., 1]
        turned = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2)
        return torch.cat([turned, rest], dim=-1)

    causal = torch.ones(n, n, dtype=torch.bool, device=dev).tril()
    x = t["transformer.embedding.word_embeddings.weight"][torch.tensor(ids, device=dev)].float()
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        h = rms(x, w(p + "input_layernorm.weight"))
        qkv = h @ w(p + "self_attention.query_key_value.weight").T + w(p + "self_attention.query_key_value.bias")
        q, k, v = qkv.split([heads * d, groups * d, groups * d], dim=-1)
        q, k = rotary(q.view(n, heads, d)), rotary(k.view(n, groups, d))
        k = k.repeat_interleave(heads // groups, dim=1)
        v = v.view(n, groups, d).repeat_interleave(heads // groups, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        context = torch.einsum("hqk,khd->qhd", probs, v).reshape(n, heads * d)
        x = x + context @ w(p + "self_attention.dense.weight").T
        h = rms(x, w(p + "post_attention_layernorm.weight"))
        gate, up = (h @ w(p + "mlp.dense_h_to_4h.weight").T).chunk(2, dim=-1)
        x = x + (torch.nn.functional.silu(gate) * up) @ w(p + "mlp.dense_4h_to_h.weight").T
    x = rms(x, w("transformer.encoder.final_layernorm.weight"))
    return x @ w("transformer.output_layer.weight").T
