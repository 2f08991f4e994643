"""Tiny random models with a real family's shape and tokenizer, for tests and `glmtune demo`.

They train in seconds on a CPU, yet go through exactly the code paths a 9B model does: the same
architecture class, the same tokenizer and template, the same folder layout.
"""
from __future__ import annotations

import json
from pathlib import Path

# Shapes are tiny but keep the family's quirks: GLM-4 has 2 KV heads (grouped-query attention),
# half-dimension (partial) rotary embeddings and biased q/k/v projections.
TINY_GLM4 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=151552, max_position_embeddings=4096,
                 rms_norm_eps=1.5625e-07, partial_rotary_factor=0.5, attention_bias=True,
                 tie_word_embeddings=False, pad_token_id=151329, eos_token_id=[151329, 151336, 151338])

# The GLM-4 tokenizer shipped in the package (glmtune/resources/tokenizers/glm4): the demo, the web UI
# and tests build tiny models with it offline.
BUILTIN_GLM4_TOKENIZER = Path(__file__).resolve().parents[1] / "resources" / "tokenizers" / "glm4"


def build_tiny_glm4(out_dir: str | Path, tokenizer_dir: str | Path, *, seed: int = 0,
                    overrides: dict | None = None, dtype: str = "float32") -> Path:
    """Write a random GLM-4-shaped model folder (config, safetensors, tokenizer, glmtune.json)."""
    import torch
    from transformers import Glm4Config, Glm4ForCausalLM

    from glmtune.models.tokenizer import load_tokenizer

    out_dir = Path(out_dir)
    cfg_kwargs = {**TINY_GLM4, **(overrides or {})}
    partial = cfg_kwargs.pop("partial_rotary_factor")
    config = Glm4Config(**cfg_kwargs)
    config.rope_parameters = {**(config.rope_parameters or {}), "partial_rotary_factor": partial,
                              "rope_theta": 10000.0, "rope_type": "default"}
    torch.manual_seed(seed)
    model = Glm4ForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(out_dir)
    load_tokenizer(tokenizer_dir).save_pretrained(out_dir)
    write_glmtune_meta(out_dir, template="glm4")
    return out_dir


def write_glmtune_meta(model_dir: str | Path, **meta) -> None:
    """`glmtune.json` tells every command which template a model folder uses."""
    from glmtune.io import write_json_atomic

    path = Path(model_dir) / "glmtune.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    write_json_atomic(path, {**old, **meta})
