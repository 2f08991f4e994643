"""Import remote-code ChatGLM2-6B / ChatGLM3-6B / glm-4-9b-chat checkpoints as native GLM folders.

These checkpoints ship their own `modeling_chatglm.py` (`model_type: chatglm`). We never import it:
`config.json` and the weight shards are read as data and rewritten for transformers' own
`GlmForCausalLM` (the class behind glm-4-9b-chat-hf), which then gets every speed lever glmtune has
for native models (varlen attention, fused LoRA, CUDA graphs).

The layout facts, from `modeling_chatglm.py` and transformers' `convert_glm_weights_to_hf.py`:

    transformer.embedding.word_embeddings        -> model.embed_tokens      [padded_vocab_size, hidden]
    transformer.encoder.layers.N.input_layernorm -> model.layers.N.input_layernorm          (RMSNorm)
    ....self_attention.query_key_value (w, b)    -> self_attn.q_proj | k_proj | v_proj
        rows [q: heads * kv_channels | k: groups * kv_channels | v: groups * kv_channels]
    ....self_attention.dense                     -> self_attn.o_proj        (no bias: add_bias_linear false)
    ....post_attention_layernorm                 -> post_attention_layernorm
    ....mlp.dense_h_to_4h                        -> mlp.gate_up_proj  (both halve the output with
        chunk(2, -1) and compute silu(first) * second, so the rows keep their order)
    ....mlp.dense_4h_to_h                        -> mlp.down_proj
    transformer.encoder.final_layernorm          -> model.norm
    transformer.output_layer                     -> lm_head                 (not tied)
    transformer.rotary_pos_emb.inv_freq          -> nothing: a buffer, checked against head_dim / 2

Config: multi_query_group_num -> num_key_value_heads; kv_channels -> head_dim; ffn_hidden_size ->
intermediate_size; layernorm_epsilon -> rms_norm_eps; seq_length -> max_position_embeddings;
add_qkv_bias -> attention_bias. ChatGLM rotates the first half of each head (RotaryEmbedding of
kv_channels // 2) in interleaved pairs (x0, x1), the same as GLM's `partial_rotary_factor: 0.5` and
its interleaved `rotate_half`; its base is `10000 * rope_ratio` (glm-4-9b-chat: 500 -> 5e6), so
`rope_theta = 10000 * rope_ratio`. (The published script reads rope_ratio with `getattr` on a dict
and so always gets 1; we read the key.)

Weights stream shard by shard: one source tensor at a time is converted and appended to an output
shard of at most MAX_SHARD_BYTES, so a 9B import holds about one shard in memory. Every source tensor
must be used exactly once and every native tensor written exactly once, with the shape the native
model expects; anything else is an error naming the tensor.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from glmtune.errors import InputError
from glmtune.io import atomic_dir, check_output_dir
from glmtune.models.gguf import DTYPES

FAMILIES = ("chatglm2", "chatglm3", "glm4")
# 2 GB output shards, as in the GGUF import: lazy loading stays cheap on small machines.
MAX_SHARD_BYTES = 2 * 10**9

_TOP_LEVEL = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}
_PER_LAYER = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
_INV_FREQ = "transformer.rotary_pos_emb.inv_freq"
SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")
_LAYER_KEY = re.compile(r"transformer\.encoder\.layers\.(\d+)\.(.+)")

# config.json settings whose other value would need a block GlmForCausalLM does not have.
_REQUIRED_SETTINGS = {
    "rmsnorm": True,                                     # LayerNorm variant: not in GLM
    "post_layer_norm": True,                             # final_layernorm present
    "add_bias_linear": False,                            # dense / MLP biases: GLM has none
    "apply_residual_connection_post_layernorm": False,   # residual taken before the norm
}


@dataclass
class ChatglmImportReport:
    """What `import_chatglm` did, for the CLI summary and for tests."""
    out_dir: Path
    source: Path
    family: str
    num_parameters: int
    dtype: str
    weight_files: list[str]
    stop_ids: list[int]
    rope_theta: float
    used: dict[str, list[str]] = field(default_factory=dict)  # source tensor -> native tensors made from it
    seconds: float = 0.0


# ---------------------------------------------------------------- config


def read_source_config(src: Path) -> dict:
    path = src / "config.json"
    if not path.is_file():
        raise InputError("config.json not found", file=src, fix="pass the folder of a ChatGLM checkpoint")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"invalid JSON ({e.msg})", file=path, line=e.lineno) from None
    if cfg.get("model_type") != "chatglm":
        raise InputError(f"model_type is {cfg.get('model_type')!r}, not 'chatglm'", file=path, field="model_type",
                         fix="this command imports remote-code ChatGLM2/ChatGLM3/glm-4-9b-chat checkpoints; "
                             "other folders load directly")
    return cfg


def native_config(cfg: dict, *, source: Path, stop_ids: list[int], dtype: str):
    """The `GlmConfig` equivalent to a ChatGLM config.json (see the module docstring)."""
    from transformers import GlmConfig

    where = source / "config.json"
    for key, want in _REQUIRED_SETTINGS.items():
        if key in cfg and bool(cfg[key]) != want:
            raise InputError(f"{key}={cfg[key]} has no equivalent in transformers' GlmForCausalLM", file=where,
                             field=key, fix="only ChatGLM2/ChatGLM3/glm-4-9b-chat layouts are supported")
    if cfg.get("pre_seq_len"):
        raise InputError("the checkpoint carries a P-Tuning prefix encoder (pre_seq_len set)", file=where,
                         field="pre_seq_len", fix="import the base checkpoint and train the prefix with "
                                                  "glmtune (method: prefix)")
    if cfg.get("tie_word_embeddings"):
        raise InputError("tied embeddings are not part of the ChatGLM layouts", file=where, field="tie_word_embeddings")
    missing = [k for k in ("hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size",
                           "padded_vocab_size", "layernorm_epsilon") if k not in cfg]
    if missing:
        raise InputError(f"missing {', '.join(missing)}", file=where,
                         fix="restore config.json from the model's original download")
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("multi_query_group_num", heads) if cfg.get("multi_query_attention") else heads
    if heads % kv_heads:
        raise InputError(f"{heads} heads do not split into {kv_heads} groups", file=where,
                         field="multi_query_group_num")
    rope_theta = 10000.0 * float(cfg.get("rope_ratio", 1))
    return GlmConfig(
        vocab_size=cfg["padded_vocab_size"], hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["ffn_hidden_size"], num_hidden_layers=cfg["num_layers"],
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=cfg.get("kv_channels") or cfg["hidden_size"] // heads,
        max_position_embeddings=cfg.get("seq_length", 8192), rms_norm_eps=cfg["layernorm_epsilon"],
        attention_bias=bool(cfg.get("add_qkv_bias", False)),
        attention_dropout=float(cfg.get("attention_dropout", 0.0)), tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "partial_rotary_factor": 0.5},
        pad_token_id=cfg.get("pad_token_id"), eos_token_id=stop_ids, dtype=DTYPES[dtype],
        architectures=["GlmForCausalLM"])


# ---------------------------------------------------------------- family and tokenizer


def detect_source_family(src: Path, cfg: dict, requested: str) -> str:
    """glm4 / chatglm3 / chatglm2: `requested` unless auto; else the tokenizer file and names decide."""
    from glmtune.models.folder import read_model_folder
    from glmtune.models.folder import is_tiktoken_file

    if requested != "auto":
        if requested not in FAMILIES:
            raise InputError(f"unknown template '{requested}'", field="--template",
                             fix=f"use auto or one of: {', '.join(FAMILIES)}")
        return requested
    model_file = src / "tokenizer.model"
    if not model_file.is_file():
        raise InputError("tokenizer.model not found", file=src,
                         fix="copy the checkpoint's tokenizer files (tokenizer.model, tokenizer_config.json) too")
    if is_tiktoken_file(model_file):
        return "glm4"
    family = read_model_folder(src).family
    if family not in ("chatglm2", "chatglm3"):
        # ChatGLM2 and ChatGLM3 share tokenizer.model; only names tell them apart.
        name = str(cfg.get("_name_or_path", "")).lower()
        family = "chatglm3" if "chatglm3" in name else "chatglm2" if "chatglm2" in name else None
    if family is None:
        raise InputError("cannot tell ChatGLM2 from ChatGLM3 (same tokenizer, no name in the configs)", file=src,
                         fix="pass --template chatglm2 or --template chatglm3")
    return family


# ---------------------------------------------------------------- tensors


def source_weight_files(src: Path) -> list[Path]:
    """The shards to read: safetensors when present (ChatGLM3 ships both kinds), else .bin."""
    for index_name, pattern in (("model.safetensors.index.json", "*.safetensors"),
                                ("pytorch_model.bin.index.json", "*.bin")):
        index = src / index_name
        if index.is_file():
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            missing = [n for n in names if not (src / n).is_file()]
            if missing:
                raise InputError(f"shard {missing[0]} listed in {index_name} is missing", file=src / missing[0],
                                 fix="copy every shard of the checkpoint")
            return [src / n for n in names]
        files = sorted(src.glob(pattern))
        if files:
            return files
    raise InputError("no weight files (*.safetensors or pytorch_model*.bin)", file=src,
                     fix="copy the checkpoint's weight shards into the folder")


def iter_source_tensors(files: list[Path]) -> Iterator[tuple[str, object, Path]]:
    """(name, tensor, file) for every tensor, one at a time (safetensors lazily, .bin memory-mapped)."""
    import torch
    from safetensors import safe_open

    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name), path
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            for name in list(state):
                yield name, state.pop(name), path
            del state


def native_tensors(name: str, tensor, config) -> list[tuple[str, object]] | None:
    """The native (name, tensor) pairs made from one source tensor; [] for the rotary buffer, None
    for a name that is not part of the layout."""
    if name in _TOP_LEVEL:
        return [(_TOP_LEVEL[name], tensor)]
    if name == _INV_FREQ:
        _check_inv_freq(tensor, config)
        return []
    m = _LAYER_KEY.fullmatch(name)
    if m is None:
        return None
    layer, rest = m.groups()
    prefix = f"model.layers.{layer}."
    if rest in _PER_LAYER:
        return [(prefix + _PER_LAYER[rest], tensor)]
    if rest in ("self_attention.query_key_value.weight", "self_attention.query_key_value.bias"):
        q = config.num_attention_heads * config.head_dim
        kv = config.num_key_value_heads * config.head_dim
        q_t, k_t, v_t = tensor.split([q, kv, kv], dim=0)
        kind = rest.rsplit(".", 1)[1]
        return [(f"{prefix}self_attn.{p}.{kind}", t) for p, t in (("q_proj", q_t), ("k_proj", k_t), ("v_proj", v_t))]
    return None


def _check_inv_freq(tensor, config) -> None:
    """The stored buffer says how many dimensions rotate: it must be head_dim / 2 (ChatGLM stores the
    base-10000 frequencies; rope_ratio is applied when the cache is built)."""
    import torch

    dim = config.head_dim // 2
    steps = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    theta = config.rope_parameters["rope_theta"]
    stored = tensor.double()
    ok = tensor.shape == steps.shape and any(
        torch.allclose(stored, 1.0 / base ** steps, rtol=1e-2) for base in (10000.0, theta))
    if not ok:
        raise InputError(f"{_INV_FREQ} does not match a rotary embedding over head_dim/2 = {dim} dimensions",
                         field=_INV_FREQ, fix="this checkpoint's rotary layout is not ChatGLM's; it cannot be imported")


def expected_native_shapes(config) -> dict[str, tuple]:
    """Name -> shape of every tensor `GlmForCausalLM(config)` loads (built on the meta device: no memory)."""
    import torch
    from transformers import GlmForCausalLM

    with torch.device("meta"):
        model = GlmForCausalLM(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


class ShardWriter:
    """Append tensors, flush a safetensors shard every `max_bytes`, write the index at the end."""

    def __init__(self, out_dir: Path, max_bytes: int = MAX_SHARD_BYTES):
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.pending: dict[str, object] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        path = self.out_dir / f"part-{len(self.shards) + 1:05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Name the shards as transformers does and write model.safetensors.index.json."""
        from glmtune.io import write_json_atomic

        self.flush()
        n = len(self.shards)
        if n == 1:
            os.replace(self.shards[0][0], self.out_dir / "model.safetensors")
            return ["model.safetensors"]
        weight_map, names = {}, []
        for i, (path, keys) in enumerate(self.shards, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.out_dir / final)
            names.append(final)
            weight_map.update({k: final for k in keys})
        write_json_atomic(self.out_dir / "model.safetensors.index.json",
                          {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))})
        return names


def convert_weights(files: list[Path], config, out_dir: Path, dtype: str,
                    on_step: Callable[[str], None]) -> tuple[list[str], dict[str, list[str]], int]:
    """Stream every source tensor into native shards; return (files, source -> native names, parameters)."""
    import torch

    expected = expected_native_shapes(config)
    torch_dtype = getattr(torch, DTYPES[dtype])
    writer = ShardWriter(out_dir)
    used: dict[str, list[str]] = {}
    written: set[str] = set()
    for i, path in enumerate(files, 1):
        on_step(f"converting shard {i}/{len(files)}: {path.name}")
        for name, tensor, _ in iter_source_tensors([path]):
            if name in used:
                raise InputError(f"tensor {name} appears in two shards", file=path,
                                 fix="remove stray or duplicate shard files from the folder")
            pairs = native_tensors(name, tensor, config)
            if pairs is None:
                raise InputError(f"unknown tensor {name}", file=path,
                                 fix="only ChatGLM2/ChatGLM3/glm-4-9b-chat layouts are supported")
            used[name] = [n for n, _ in pairs]
            for native, t in pairs:
                if native not in expected or tuple(t.shape) != expected[native] or native in written:
                    raise InputError(f"tensor {name} has shape {tuple(t.shape)}, which does not fit {native} "
                                     f"{expected.get(native)}", file=path, fix="check config.json against the shards")
                # clone: a q/k/v slice must not keep the whole fused source tensor alive
                writer.add(native, t.to(torch_dtype).contiguous().clone())
                written.add(native)
    missing = sorted(set(expected) - written)
    if missing:
        raise InputError(f"{len(missing)} tensor(s) missing from the shards, e.g. {missing[0]}", file=files[0].parent,
                         fix="copy every shard of the checkpoint")
    params = sum(int(torch.Size(s).numel()) for s in expected.values())
    return writer.finish(), used, params


# ---------------------------------------------------------------- the whole import


def save_generation_config(src: Path, out_dir: Path, stop_ids: list[int], pad_id: int | None) -> None:
    """The source's sampling defaults (when it ships them) with the family's stop ids."""
    from transformers import GenerationConfig

    keep = {}
    if (src / "generation_config.json").is_file():
        keep = json.loads((src / "generation_config.json").read_text(encoding="utf-8"))
    # Sampling defaults only: glm-4-9b-chat's max_length (128000) would clash with every
    # max_new_tokens glmtune passes and print a warning into chat sessions.
    gen = GenerationConfig(**{k: keep[k] for k in SAMPLING_KEYS if k in keep})
    gen.eos_token_id, gen.pad_token_id = stop_ids, pad_id
    gen.save_pretrained(out_dir)


def import_chatglm(src: str | Path, out_dir: str | Path, *, dtype: str = "bf16", template: str = "auto",
                   overwrite: bool = False, on_step: Callable[[str], None] | None = None,
                   stop_ids_for: Callable[[str, object], list[int]] | None = None) -> ChatglmImportReport:
    """ChatGLM2/ChatGLM3/glm-4-9b-chat folder -> native GlmForCausalLM folder with glmtune.json.

    Written under a temporary name beside `out_dir` and renamed at the end, so an interrupted
    import leaves no half-written model. ``stop_ids_for(family, tokenizer)`` gives the ids that end a
    reply (the chat template's stop tokens: `glmtune model import-chatglm` passes the template's;
    models do not import templates).
    """
    from glmtune.models.folder import write_glmtune_meta
    from glmtune.models.tokenizer import load_tokenizer

    if dtype not in ("bf16", "fp32"):
        raise InputError(f"unknown dtype '{dtype}'", field="--dtype", fix="use bf16 or fp32")
    step = on_step or (lambda _msg: None)
    start = time.monotonic()
    src, out_dir = Path(src), Path(out_dir)
    if not src.is_dir():
        raise InputError("folder not found", file=src, fix="pass the folder of a ChatGLM checkpoint")
    cfg = read_source_config(src)
    family = detect_source_family(src, cfg, template)
    files = source_weight_files(src)
    check_output_dir(out_dir, overwrite)
    step(f"{family} checkpoint, {len(files)} shard(s); converting the tokenizer")
    tokenizer = load_tokenizer(src, family=family)
    if stop_ids_for is None:
        raise InputError("import_chatglm needs stop_ids_for(family, tokenizer)", field="stop_ids_for",
                         fix="pass glmtune.cli.model.template_stop_ids (the chat template's stop tokens)")
    stop_ids = stop_ids_for(family, tokenizer)
    config = native_config(cfg, source=src, stop_ids=stop_ids, dtype=dtype)
    if len(tokenizer) > config.vocab_size:
        raise InputError(f"the tokenizer has {len(tokenizer)} tokens but the embedding only {config.vocab_size} rows",
                         file=src / "config.json", field="padded_vocab_size",
                         fix=f"pass the right --template (this one is read as {family})")
    with atomic_dir(out_dir) as tmp_out:
        weight_files, used, params = convert_weights(files, config, tmp_out, dtype, step)
        step("writing config, generation config, tokenizer and glmtune.json")
        config.save_pretrained(tmp_out)
        save_generation_config(src, tmp_out, stop_ids, config.pad_token_id)
        tokenizer.save_pretrained(tmp_out)
        write_glmtune_meta(tmp_out, template=family, source="chatglm", source_dir=str(src.resolve()),
                           dtype=DTYPES[dtype])
    return ChatglmImportReport(out_dir=out_dir, source=src, family=family, num_parameters=params, dtype=dtype,
                               weight_files=weight_files, stop_ids=stop_ids,
                               rope_theta=config.rope_parameters["rope_theta"], used=used,
                               seconds=time.monotonic() - start)
