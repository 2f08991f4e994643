"""Tiny random models with a real family's shape and tokenizer, for tests and `glmtune demo`.

They train in seconds on a CPU, yet go through exactly the code paths a 9B model does: the same
architecture class, the same tokenizer and template, the same folder layout.
"""
from __future__ import annotations

from pathlib import Path

from glmtune.models.folder import write_glmtune_meta
from glmtune.models.tokenizer import PACKAGED_TOKENIZERS

# Shapes are tiny but keep the family's quirks: GLM-4 has 2 KV heads (grouped-query attention),
# half-dimension (partial) rotary embeddings and biased q/k/v projections.
TINY_GLM4 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=151552, max_position_embeddings=4096,
                 rms_norm_eps=1.5625e-07, partial_rotary_factor=0.5, attention_bias=True,
                 tie_word_embeddings=False, pad_token_id=151329, eos_token_id=[151329, 151336, 151338])

# The GLM-4 tokenizer shipped in the package (glmtune/resources/tokenizers/glm4): the demo, the web UI
# and tests build tiny models with it offline.
BUILTIN_GLM4_TOKENIZER = PACKAGED_TOKENIZERS / "glm4"


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


# Mixture-of-experts GLMs with the family's quirks at tiny widths: layer 0 dense, the rest MoE with
# 8 routed experts (top-2, sigmoid router with the aux-loss-free bias) + 1 shared expert.
# Glm4Moe (GLM-4.5 / 4.6 / 4.7): GQA with partial rotary and q/k/v bias, as TINY_GLM4.
# Glm4MoeLite (GLM-4.7-Flash): MLA attention (low-rank q and compressed kv, interleaved rotary).
_TINY_MOE = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
                 n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
                 norm_topk_prob=True, routed_scaling_factor=1.0, vocab_size=151552, max_position_embeddings=4096,
                 rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=151329,
                 eos_token_id=[151329, 151336, 151338])
TINY_GLM4_MOE = dict(_TINY_MOE, num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=True,
                     first_k_dense_replace=1, partial_rotary_factor=0.5)
TINY_GLM4_MOE_LITE = dict(_TINY_MOE, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32,
                          qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, routed_scaling_factor=1.8,
                          mlp_layer_types=["dense", "sparse", "sparse"])


def build_tiny_glm4_moe(out_dir: str | Path, tokenizer_dir: str | Path, *, lite: bool = False, seed: int = 0,
                        overrides: dict | None = None, dtype: str = "float32", template: str = "glm4") -> Path:
    """Write a random Glm4Moe (``lite=False``) or Glm4MoeLite (GLM-4.7-Flash layout) model folder.

    ``template`` glm45 / glm47 gives the folder GLM-4.5's tokenizer (``tokenizer_dir`` GLM-4's, its added
    tokens at the official ids), as the real models ship it. The router is initialised with a 10x wider
    spread than the configs' 0.02, so a random model's tokens spread over the experts instead of tying at
    sigmoid(0)."""
    import torch
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM, Glm4MoeLiteConfig, Glm4MoeLiteForCausalLM

    from glmtune.models.tokenizer import glm45_tokenizer, load_tokenizer

    out_dir = Path(out_dir)
    kwargs = {**(TINY_GLM4_MOE_LITE if lite else TINY_GLM4_MOE), **(overrides or {})}
    partial = kwargs.pop("partial_rotary_factor", None)
    config = (Glm4MoeLiteConfig if lite else Glm4MoeConfig)(**kwargs)
    rope = {"rope_theta": 10000.0, "rope_type": "default"}
    if partial is not None:
        rope["partial_rotary_factor"] = partial
    config.rope_parameters = {**(config.rope_parameters or {}), **rope}
    torch.manual_seed(seed)
    model = (Glm4MoeLiteForCausalLM if lite else Glm4MoeForCausalLM)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.2)
    model.to(getattr(torch, dtype)).save_pretrained(out_dir)
    tokenizer = glm45_tokenizer(tokenizer_dir) if template in ("glm45", "glm47") else load_tokenizer(tokenizer_dir)
    tokenizer.save_pretrained(out_dir)
    write_glmtune_meta(out_dir, template=template)
    return out_dir



# A LLaVA-architecture vision-language model with a Qwen2 (ChatML) language model and a SigLIP
# tower, shaped like llava-hf/llava-interleave-qwen-0.5b-hf (384 px pictures, 14 px patches -> 729
# `<image>` tokens, "full" features) with tiny widths. LLaVA, not Qwen2-VL: Qwen2-VL's processor
# also builds a video processor, which needs torchvision (a CUDA-sized install on a CPU box).
# Its tokenizer is byte-level BPE without merges (each UTF-8 byte a token) + the special tokens.
TINY_VL_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>")
TINY_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def byte_level_tokenizer(special_tokens=TINY_VL_SPECIALS, eos: str = "<|im_end|>", pad: str = "<|endoftext|>"):
    """A fast tokenizer built offline: 256 byte tokens (GPT-2's byte-to-unicode alphabet) + specials."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad)


def build_tiny_vl(out_dir: str | Path, *, seed: int = 0, init_range: float = 0.2) -> Path:
    """Write a random LLaVA(Qwen2 + SigLIP) folder: config, safetensors, processor, tokenizer, glmtune.json.

    ``init_range`` is 10x the usual 0.02 so a random model's greedy answer depends on the picture."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    out_dir = Path(out_dir)
    tokenizer = byte_level_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in TINY_VL_SPECIALS}
    text = dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, initializer_range=init_range,
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=True)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_attention_heads=2,
                  num_hidden_layers=2, image_size=384, patch_size=14, vision_use_head=False)
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_index=ids["<image>"],
                         vision_feature_select_strategy="full", vision_feature_layer=-1,
                         projector_hidden_act="gelu", tie_word_embeddings=True, initializer_range=init_range)
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).save_pretrained(out_dir)
    # SigLIP's real preprocessing: 384x384 bicubic, mean = std = 0.5.
    images = SiglipImageProcessorPil(size={"height": 384, "width": 384}, resample=3,
                                     image_mean=[0.5] * 3, image_std=[0.5] * 3)
    LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14,
                   vision_feature_select_strategy="full",
                   chat_template=TINY_VL_CHAT_TEMPLATE).save_pretrained(out_dir)
    write_glmtune_meta(out_dir, template="qwen")
    return out_dir


# Qwen2-VL-7B-Instruct's own chat template and special tokens; its processor settings are the
# library defaults (14 px patches, 2x2 merge, 56*56 .. 28*28*1280 pixels, CLIP mean/std).
QWEN2_VL_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                     "<|image_pad|>", "<|video_pad|>")
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tiny_qwen2_vl(out_dir: str | Path, *, seed: int = 0, init_range: float = 0.2) -> Path:
    """A random Qwen2-VL folder with tiny widths (M-RoPE sections scaled to the head size).

    Needs torchvision: Qwen2-VL's processor always builds its video processor (bench/vl_qwen2vl_check.py)."""
    import torch
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor)

    out_dir = Path(out_dir)
    tokenizer = byte_level_tokenizer(QWEN2_VL_SPECIALS)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2_VL_SPECIALS}
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, initializer_range=init_range,
                # head_dim 16 -> 8 rotary pairs split over (time, height, width) like 7B's [16, 24, 24] of 64
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6},
                bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, initializer_range=init_range)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    Qwen2VLForConditionalGeneration(config).save_pretrained(out_dir)
    Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                     video_processor=Qwen2VLVideoProcessor(),
                     chat_template=QWEN2_VL_CHAT_TEMPLATE).save_pretrained(out_dir)
    write_glmtune_meta(out_dir, template="qwen")
    return out_dir
