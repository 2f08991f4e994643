"""A tiny mixture-of-experts adapter for the inference and serving tests (shared, like tiny_trained)."""
from __future__ import annotations

PROMPTS = ["What is the capital of France?", "你好", "Name a primary colour.", "Tell me a story."]


def moe_adapter(base, out):
    """A random non-zero LoRA on attention, MLPs and routed experts, as glmtune train sets it up."""
    import torch

    from glmtune.models.loading import load_model
    from glmtune.models.peft_setup import setup_method
    from glmtune.train.config import MethodSection

    torch.manual_seed(3)
    model = setup_method(load_model(base, dtype="float32"), MethodSection(r=8, alpha=64))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(out)
    return out
