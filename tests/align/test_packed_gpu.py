"""Packed DPO's varlen layout on CUDA (`pytest -m gpu`; bench/run_gpu_tests.sh runs it on the device):
FlashAttention varlen over the gathered segments = the dense-mask reference, and the varlen-packed DPO
loss and gradients = TRL's padded batch, bf16."""
from __future__ import annotations

import pytest
import torch

from glmtune.align.packed import Packing, pack_pairs, pair_attention_forward, segment_attention_reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# FlashAttention-friendly tiny GLM-4 (as tests/train/test_speed_gpu.py): head_dim 64, GQA 4:2
GPU_SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30))


def test_flash_segments_equal_reference_bf16():
    """pair_attention_forward on CUDA (FlashAttention varlen, fewer queries than keys in the rejected
    segments) = segment_attention_reference in fp32 on the same bf16 inputs: output and q/k/v gradients."""
    from glmtune.models.speed import varlen_support
    assert varlen_support() is None, varlen_support()
    rows = [{"prompt_ids": list(range(1, 1 + p)), "chosen_ids": [5] * c, "rejected_ids": [6] * r}
            for p, c, r in ((37, 12, 70), (1, 5, 3), (120, 64, 9), (8, 1, 1))]
    b = {k: v.cuda() if isinstance(v, torch.Tensor) else v
         for k, v in pack_pairs(rows, max_length=None, row_tokens=None, layout="varlen").items()}
    T = b["pack_input_ids"].shape[1]
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, h, T, 64, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for h in (4, 2, 2))
    kw = {name: b[f"pack_{name}"] for name in ("pair_kv_index", "pair_cu_q", "pair_cu_k", "pair_max_q", "pair_max_k")}
    out, _ = pair_attention_forward(None, q, k, v, None, scaling=0.125, **kw)
    idx = kw["pair_kv_index"]
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    want = segment_attention_reference(qf[0].transpose(0, 1), kf[0].transpose(0, 1)[idx], vf[0].transpose(0, 1)[idx],
                                       kw["pair_cu_q"], kw["pair_cu_k"], scale=0.125).unsqueeze(0)
    assert out.shape == (1, T, 4, 64) and out.dtype == torch.bfloat16
    assert _rel_err(out, want) < 2e-2
    w = torch.randn(out.shape, device="cuda", generator=g)
    got_g = torch.autograd.grad((out.float() * w).sum(), (q, k, v))
    want_g = torch.autograd.grad((want * w).sum(), (qf, kf, vf))
    for a, c in zip(got_g, want_g):
        assert _rel_err(a, c) < 3e-2


def test_varlen_packed_dpo_close_to_trl_bf16(tmp_path, glm4_tokenizer_dir):
    """The varlen-packed DPO step (FlashAttention) vs TRL's padded one (SDPA) on a bf16 tiny GLM-4 whose LoRA
    B matrices are perturbed: the same loss and gradients up to bf16 attention noise."""
    import trl
    from datasets import Dataset

    from glmtune.align.config import load_align_config
    from glmtune.align.trainers import ALGORITHMS, training_arguments
    from glmtune.models.tiny import build_tiny_glm4
    from glmtune.models.tokenizer import load_tokenizer
    from glmtune.templates import get_template
    from glmtune.train.model import apply_method, load_base

    path = build_tiny_glm4(tmp_path / "glm4", glm4_tokenizer_dir, overrides=GPU_SHAPE)
    cfg = load_align_config({"model": {"path": str(path), "dtype": "bf16"}, "data": {"datasets": ["x.jsonl"]},
                             "train": {"batch_size": 4, "seed": 0}, "output": {"dir": str(tmp_path / "o")}})
    tok, tpl = load_tokenizer(path), get_template("glm4")
    rows = []
    for i in range(4):
        msgs = [{"role": "user", "content": " ".join(["river stone"] * (3 + 11 * i))}]
        p = tpl.encode_prompt(tok, msgs)
        rows.append({"prompt_ids": p, "chosen_ids": tpl.answer_ids(tok, msgs, "apple " * (2 + i), None, p),
                     "rejected_ids": tpl.answer_ids(tok, msgs, "cloud " * (9 - 2 * i), None, p)})
    torch.manual_seed(0)
    model = apply_method(load_base(cfg), cfg).cuda()
    algo = ALGORITHMS["dpo"]
    _, cls = algo.classes()
    trainer = cls(model=model, args=training_arguments(cfg, algo, tmp_path / "o", has_dev=False, cuda=True),
                  train_dataset=Dataset.from_list(rows), processing_class=tok, packing=Packing("varlen"),
                  fresh_adapter=True)
    with torch.no_grad():
        for name, prm in trainer.model.named_parameters():
            if "lora_B.default" in name:
                prm.normal_(0, 0.5)
    model.train()
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in trainer.data_collator(rows).items()}
    padded = {k: v for k, v in batch.items() if not k.startswith("pack_")}
    params = [(n, prm) for n, prm in model.named_parameters() if prm.requires_grad]

    def run(loss_fn):
        model.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        return loss.detach().float(), {n: prm.grad.clone() for n, prm in params}

    want, want_g = run(lambda: trl.DPOTrainer.compute_loss(trainer, model, dict(padded)))
    got, got_g = run(lambda: trainer.compute_loss(model, dict(batch)))
    assert abs(want.item() - 0.6931) > 1e-3  # the policy is not its reference
    assert abs(got.item() - want.item()) < 2e-2 * max(1.0, abs(want.item()))
    worst = max(_rel_err(got_g[n], want_g[n]) for n in want_g)
    assert worst < 5e-2, worst
