"""Random checkpoints in the remote-code ChatGLM layouts, for tests and the GPU import benchmark.

Each family's folder looks like its published download: the config.json fields it ships (with
`auto_map` pointing at modeling_chatglm.py), its weight shards and index (ChatGLM2: pytorch .bin;
ChatGLM3: both .bin and .safetensors; glm-4-9b-chat: .safetensors), tokenizer.model and
tokenizer_config.json, and Python files that raise if anything imports them: nothing here may run
a checkpoint's own code. Shards are generated and written one at a time, so a 9B-shaped checkpoint
needs about one shard of host memory.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

_COMMON = {
    "model_type": "chatglm", "architectures": ["ChatGLMModel"],
    "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                 "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                 "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
                 "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
                 "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification"},
    "add_bias_linear": False, "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
    "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0,
    "attention_softmax_in_fp32": True, "bias_dropout_fusion": True, "ffn_hidden_size": 13696,
    "fp32_residual_connection": False, "hidden_dropout": 0.0, "hidden_size": 4096, "kv_channels": 128,
    "multi_query_attention": True, "multi_query_group_num": 2, "num_attention_heads": 32,
    "original_rope": True, "post_layer_norm": True, "rmsnorm": True, "tie_word_embeddings": False,
    "use_cache": True,
}
# The published config.json of each family (THUDM/chatglm2-6b, chatglm3-6b, glm-4-9b-chat).
PUBLISHED_CONFIGS = {
    "chatglm2": {**_COMMON, "_name_or_path": "THUDM/chatglm2-6b", "layernorm_epsilon": 1e-05, "num_layers": 28,
                 "padded_vocab_size": 65024, "seq_length": 32768, "torch_dtype": "float16",
                 "transformers_version": "4.27.1", "eos_token_id": 2, "pad_token_id": 0},
    "chatglm3": {**_COMMON, "_name_or_path": "THUDM/chatglm3-6b", "layernorm_epsilon": 1e-05, "num_layers": 28,
                 "padded_vocab_size": 65024, "seq_length": 8192, "torch_dtype": "float16",
                 "transformers_version": "4.30.2", "eos_token_id": 2, "pad_token_id": 0, "pre_seq_len": None,
                 "prefix_projection": False},
    "glm4": {**_COMMON, "_name_or_path": "THUDM/glm-4-9b-chat", "classifier_dropout": None,
             "layernorm_epsilon": 1.5625e-07, "num_layers": 40, "num_hidden_layers": 40,
             "padded_vocab_size": 151552, "vocab_size": 151552, "rope_ratio": 500, "seq_length": 131072,
             "torch_dtype": "bfloat16", "transformers_version": "4.43.4",
             "eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329},
}
# Weight format, shard count and generation_config.json of each published download.
LAYOUTS = {
    "chatglm2": {"formats": ("bin",), "shards": 7, "generation_config": None},
    "chatglm3": {"formats": ("bin", "safetensors"), "shards": 7, "generation_config": None},
    "glm4": {"formats": ("safetensors",), "shards": 10,
             "generation_config": {"eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329,
                                   "do_sample": True, "temperature": 0.8, "max_length": 128000, "top_p": 0.8}},
}
# Small enough to train in seconds on a CPU, yet every shape differs (kv_channels * heads != hidden).
TINY_CHATGLM = {"hidden_size": 64, "num_attention_heads": 4, "multi_query_group_num": 2, "kv_channels": 32,
                "ffn_hidden_size": 96, "num_layers": 2, "seq_length": 4096}
REMOTE_CODE_FILES = ("modeling_chatglm.py", "configuration_chatglm.py", "tokenization_chatglm.py")


def source_tensor_shapes(cfg: dict) -> dict[str, tuple]:
    """Every tensor of a ChatGLM checkpoint and its shape, in the published order."""
    h, heads, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["kv_channels"]
    groups = cfg["multi_query_group_num"] if cfg["multi_query_attention"] else heads
    qkv = (heads + 2 * groups) * hd
    shapes = {"transformer.embedding.word_embeddings.weight": (cfg["padded_vocab_size"], h),
              "transformer.rotary_pos_emb.inv_freq": (hd // 4,)}
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,),
                       p + "self_attention.query_key_value.weight": (qkv, h),
                       p + "self_attention.query_key_value.bias": (qkv,),
                       p + "self_attention.dense.weight": (h, heads * hd),
                       p + "post_attention_layernorm.weight": (h,),
                       p + "mlp.dense_h_to_4h.weight": (2 * cfg["ffn_hidden_size"], h),
                       p + "mlp.dense_4h_to_h.weight": (h, cfg["ffn_hidden_size"])})
    shapes["transformer.encoder.final_layernorm.weight"] = (h,)
    shapes["transformer.output_layer.weight"] = (cfg["padded_vocab_size"], h)
    return shapes


def _random_tensor(name: str, shape: tuple, cfg: dict, gen, device):
    """Norm weights near 1, everything else N(0, std) with std shrinking with the fan-in, so a
    random model's activations stay O(1) through the blocks; inv_freq as ChatGLM computes it."""
    import torch

    if name.endswith("inv_freq"):
        dim = cfg["kv_channels"] // 2
        return 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if "layernorm" in name:
        return 1.0 + 0.1 * torch.randn(shape, generator=gen, device=device)
    std = 0.1 if name.endswith("bias") or "word_embeddings" in name else shape[-1] ** -0.5
    return std * torch.randn(shape, generator=gen, device=device)


def _shard_groups(names: list[str], shards: int) -> list[list[str]]:
    """Split the names into `shards` runs of whole layers (embedding first, output layer last)."""
    def layer_of(n: str) -> int:
        parts = n.split(".")
        return int(parts[3]) if n.startswith("transformer.encoder.layers.") else (-1 if "embedding" in n or
                                                                                  "rotary" in n else 10**9)
    layers = sorted({layer_of(n) for n in names})
    per = max(1, -(-len(layers) // shards))
    chunks = [set(layers[i:i + per]) for i in range(0, len(layers), per)]
    return [[n for n in names if layer_of(n) in chunk] for chunk in chunks]


def write_chatglm_checkpoint(out_dir: str | Path, family: str, tokenizer_dir: str | Path, *,
                             overrides: dict | None = None, seed: int = 0, shards: int | None = None,
                             device: str = "cpu") -> Path:
    """Write a random checkpoint in `family`'s published source layout (see the module docstring).

    `overrides` change config.json fields (e.g. TINY_CHATGLM); tensors are generated on `device`
    (a GPU makes a 9B checkpoint in seconds) and written in the config's torch_dtype.
    """
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {**PUBLISHED_CONFIGS[family], **(overrides or {})}
    if "num_hidden_layers" in cfg:
        cfg["num_hidden_layers"] = cfg["num_layers"]
    layout = LAYOUTS[family]
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    if layout["generation_config"]:
        (out / "generation_config.json").write_text(json.dumps(layout["generation_config"], indent=2) + "\n")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(Path(tokenizer_dir) / name, out / name)
    for name in REMOTE_CODE_FILES:
        (out / name).write_text(f'raise RuntimeError("remote code ran: {name} was imported")\n', encoding="utf-8")

    dtype = getattr(torch, cfg["torch_dtype"])
    shapes = source_tensor_shapes(cfg)
    groups = _shard_groups(list(shapes), shards or layout["shards"])
    gen = torch.Generator(device=device).manual_seed(seed)
    maps = {fmt: {} for fmt in layout["formats"]}
    total = 0
    for k, names in enumerate(groups, 1):
        shard = {n: _random_tensor(n, shapes[n], cfg, gen, device).to(dtype).cpu().contiguous() for n in names}
        total += sum(t.numel() * t.element_size() for t in shard.values())
        for fmt in layout["formats"]:
            stem = "pytorch_model" if fmt == "bin" else "model"
            file = f"{stem}-{k:05d}-of-{len(groups):05d}.{fmt}"
            if fmt == "bin":
                torch.save(shard, out / file)
            else:
                save_file(shard, str(out / file), metadata={"format": "pt"})
            maps[fmt].update({n: file for n in names})
        del shard
    for fmt, weight_map in maps.items():
        index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
        (out / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                            indent=2) + "\n", encoding="utf-8")
    return out
