"""One GLM-4.7-Flash MoE layer on the GPU: glmtune's grouped expert LoRA against PEFT's forward.

    python3 bench/moe_gpu_check.py [--tokens 4096] [--layers 2]

A Glm4MoeLite model of GLM-4.7-Flash's widths with `--layers` layers (layer 0 dense), bf16, LoRA r16
on attention, MLPs and routed experts (glmtune's targets): loss and every LoRA gradient with
`glmtune.models.expert_lora` vs PEFT's ParamWrapper forward (bf16: relative error of the gradient
norms), and the forward+backward time and peak memory of each. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    import torch
    from peft import get_peft_model
    from transformers import Glm4MoeLiteForCausalLM

    from glmtune.models.expert_lora import fuse_expert_lora, unfuse_expert_lora
    from glmtune.models.peft_setup import moe_lora_config
    from glmtune.train.config import MethodSection
    from train_moe import flash_config

    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    config = flash_config(args.layers, tiny=not torch.cuda.is_available())
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_default_dtype(torch.bfloat16 if dev == "cuda" else torch.float32)
    with torch.device(dev):
        model = Glm4MoeLiteForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                prm.normal_(0, 0.2)
    cfg = moe_lora_config(model, MethodSection(r=16, alpha=32))
    cfg.init_lora_weights = False
    model = get_peft_model(model, cfg, autocast_adapter_dtype=False)
    model.train()
    ids = torch.randint(0, 150000, (1, args.tokens if dev == "cuda" else 64), device=dev)

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach().float(), {n: q.grad.float() for n, q in model.named_parameters() if q.grad is not None}

    def timed():
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.repeat):
            t0 = time.time()
            out = step()
            if dev == "cuda":
                torch.cuda.synchronize()
            times.append(time.time() - t0)
        peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else 0.0
        return out, sorted(times)[len(times) // 2], peak

    (ref_loss, ref_grads), t_peft, m_peft = timed()
    fuse_expert_lora(model)
    (loss, grads), t_ours, m_ours = timed()
    unfuse_expert_lora(model)
    rel = {n: float((grads[n] - g).norm() / g.norm().clamp(min=1e-12)) for n, g in ref_grads.items()}
    experts = [v for n, v in rel.items() if ".experts." in n]
    print(json.dumps({"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "layers": args.layers,
                      "tokens": ids.shape[1], "loss_peft": round(float(ref_loss), 5), "loss_grouped": round(float(loss), 5),
                      "grad_rel_err_max": float(f"{max(rel.values()):.3g}"),
                      "expert_grad_rel_err_max": float(f"{max(experts):.3g}"), "step_s_peft": round(t_peft, 4),
                      "step_s_grouped": round(t_ours, 4), "speedup": round(t_peft / t_ours, 2),
                      "peak_gib_peft": round(m_peft, 2), "peak_gib_grouped": round(m_ours, 2)}), flush=True)


if __name__ == "__main__":
    main()
