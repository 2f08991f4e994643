"""What one GLM-4.7-Flash MoE decoder layer keeps for backward, per token, by module (CPU, seconds).

    python3 bench/moe_saved_bytes.py [--tokens 512] [--experts 16]

Builds a two-layer Glm4MoeLite of GLM-4.7-Flash's widths (bench/train_moe.py FLASH; fewer routed
experts: the activations a token keeps do not depend on how many experts exist, only on top-k),
bf16, puts glmtune's LoRA and speed levers on it as `glmtune train` does on a GPU (LoRA r16 on
attention, MLPs and routed experts; fused LoRA; grouped expert LoRA; fused RMSNorm), runs one forward of a packed
row and counts the bytes autograd saves in the sparse layer (each storage once, attributed to the
innermost module running when it was first saved). FlashAttention, which a CPU does not have, is
stood in for by an attention that saves what FlashAttention's backward reads (q, k, v, out, lse).
Prints a table of KB per token by module, and the total.
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


class FlashLike:
    """An attention function (transformers' interface) whose saved tensors are FlashAttention's."""

    @staticmethod
    def forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        import torch
        import torch.nn.functional as F

        class Attn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, q, k, v):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)
                lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
                ctx.save_for_backward(q, k, v, out, lse)
                return out

            @staticmethod
            def backward(ctx, grad):  # pragma: no cover - the bench counts the forward only
                raise NotImplementedError

        return Attn.apply(query, key, value).transpose(1, 2), None


def build(tokens: int, experts: int, norms: bool = True):
    import torch
    from transformers import AttentionInterface, Glm4MoeLiteForCausalLM

    from glmtune.models.expert_lora import fuse_expert_lora
    from glmtune.models.fused_lora import fuse_lora
    from glmtune.models.peft_setup import setup_method
    from glmtune.models.rms_norm import fuse_rms_norms
    from glmtune.train.config import MethodSection
    from train_moe import flash_config

    config = flash_config(2, tiny=False)
    config.vocab_size, config.n_routed_experts, config.pad_token_id = 1024, experts, 0
    AttentionInterface.register("fa_saved", FlashLike.forward)
    config._attn_implementation = "fa_saved"
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = Glm4MoeLiteForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.2)
    model = setup_method(model, MethodSection(name="lora", r=16, alpha=32, dropout=0.0), adapter_fp32=False)
    fuse_lora(model)
    fuse_expert_lora(model)
    if norms:
        fuse_rms_norms(model)
    return model


def count(model, tokens: int) -> dict:
    import torch

    layer = [m for n, m in model.named_modules() if n.endswith("layers.1")][0]
    stack, by_module = [], collections.Counter()
    seen = {p.untyped_storage().data_ptr() for p in model.parameters()}  # weights are not activations
    def leave(module, args, out):
        stack.pop()

    for name, m in layer.named_modules():
        m.register_forward_pre_hook(lambda mod, args, name=name: stack.append(name))
        m.register_forward_hook(leave)

    def pack(t):
        if not stack or not isinstance(t, torch.Tensor):
            return t  # outside the sparse layer
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            by_module[stack[-1] or "(layer)"] += t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, 1000, (1, tokens))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return {name: n / tokens / 1024 for name, n in by_module.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--no-fused-norm", action="store_true", help="transformers' RMSNorm (speed.fused_norm off)")
    args = ap.parse_args(argv)
    model = build(args.tokens, args.experts, norms=not args.no_fused_norm)
    rows = count(model, args.tokens)
    print("| module | KB per token |\n|---|---:|")
    for name, kb in sorted(rows.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {kb:.1f} |")
    print(f"| **total** | **{sum(rows.values()):.1f}** |")


if __name__ == "__main__":
    main()
