"""What the current benches share: GLM-4-9B-0414's shape and a random bf16 model saved once as a
folder (bench/align_throughput.py turns it into a glmtune model folder). Model set-up and speed
levers are the product's (`glmtune train` / `glmtune align`); the bench-side set-up of sessions 1-3
is in git history (`git show d2eec41:bench/benchlib.py`).

Debug on a CPU: `--tiny` (hidden 256, 2 layers, real vocabulary).
"""
from __future__ import annotations

import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def add_model_args(p) -> None:
    p.add_argument("--layers", type=int, default=40)
    p.add_argument("--tiny", action="store_true", help="debug shape: hidden 256, 2 layers (CPU is fine)")
    p.add_argument("--cache-dir", default=os.environ.get("GLMTUNE_BENCH_CACHE", "/tmp/glmtune_bench_models"),
                   help="the random bf16 model is saved here once and reused")


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def glm4_config(layers: int = 40, tiny: bool = False, max_positions: int = 32768):
    """GLM-4-9B-0414's shape (as bench/seed_recipe_baseline.py), or the --tiny debug shape."""
    from transformers import Glm4Config

    shape = dict(hidden_size=4096, intermediate_size=13696, num_attention_heads=32, num_key_value_heads=2,
                 head_dim=128)
    if tiny:
        shape = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=64)
        layers = min(layers, 2)
    return Glm4Config(**shape, num_hidden_layers=layers, vocab_size=151552, max_position_embeddings=max_positions,
                      rms_norm_eps=1.5625e-07, partial_rotary_factor=0.5, attention_bias=True,
                      tie_word_embeddings=False, pad_token_id=151329, eos_token_id=151329)


def random_model(cfg):
    """Random bf16 weights, seeded like the seed recipe, built directly on the device."""
    from transformers import Glm4ForCausalLM

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device()):
            model = Glm4ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    return model


def saved_model_dir(cfg, cache_dir: str) -> str:
    """The random model saved once as safetensors."""
    c = cfg.to_dict()
    key = f"glm4_h{c['hidden_size']}_l{c['num_hidden_layers']}"  # loaded with config=cfg: positions may differ
    path = os.path.join(cache_dir, key)
    if os.path.exists(os.path.join(path, "DONE")):
        return path
    tmp = path + f".tmp{os.getpid()}"
    model = random_model(cfg)
    model.save_pretrained(tmp, max_shard_size="5GB")
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    open(os.path.join(tmp, "DONE"), "w").close()
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path
