"""Speed levers on CUDA (`pytest -m gpu`, skipped without a GPU; bench/run_gpu_tests.sh runs them on
the device): liger's fused kernels vs transformers' modules, FlashAttention varlen vs SDPA, and
run_training with every lever on."""
from __future__ import annotations

import io
import json

import pytest
import torch

from glmtune.templates import IGNORE_INDEX
from glmtune.train.data import Example, pack_batch, pad_batch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# FlashAttention-friendly tiny GLM-4: head_dim 64, 2 KV heads (GQA 4:2), partial RoPE, real tokenizer
GPU_SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64)


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory, glm4_tokenizer_dir):
    from glmtune.models.tiny import build_tiny_glm4
    return build_tiny_glm4(tmp_path_factory.mktemp("gpu") / "glm4", glm4_tokenizer_dir, overrides=GPU_SHAPE)


@pytest.fixture(autouse=True)
def _exact_fp32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 comparisons at 1e-5 need real fp32 matmuls
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _examples(lengths=(37, 120, 64, 9)):
    g = torch.Generator().manual_seed(0)
    out = []
    for n in lengths:
        ids = torch.randint(0, 150000, (n,), generator=g).tolist()
        out.append(Example(ids, [IGNORE_INDEX] * 3 + ids[3:]))
    return out


def _cuda(batch):
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b| (one number per tensor)."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30))


def test_liger_fused_equals_unfused_fp32(gpu_model):
    """liger flce + RMSNorm + SwiGLU vs transformers' modules + logits + cross-entropy: same loss and
    the same gradient for every parameter, fp32, 1e-5; the patch is undone afterwards."""
    pytest.importorskip("liger_kernel")
    from transformers import AutoModelForCausalLM
    from transformers.models.glm4 import modeling_glm4

    from glmtune.models.speed import liger_patch
    from glmtune.train.loop import forward_loss_sum

    batch = _cuda(pack_batch(_examples()))
    original = (modeling_glm4.Glm4RMSNorm, modeling_glm4.Glm4MLP, modeling_glm4.Glm4ForCausalLM.forward)

    def run(fused):
        model = AutoModelForCausalLM.from_pretrained(gpu_model, dtype=torch.float32).cuda().train()
        s, n = forward_loss_sum(model, dict(batch), fused=fused)
        s.backward()
        grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
        return float(s.detach()), int(n), grads, model

    ref_s, ref_n, ref_g, ref_model = run(False)
    undo = liger_patch("glm4", fused_linear_cross_entropy=True, rms_norm=True, swiglu=True)
    assert undo is not None, "liger-kernel did not patch glm4"
    try:
        s, n, g, model = run(True)
    finally:
        undo()
    assert (modeling_glm4.Glm4RMSNorm, modeling_glm4.Glm4MLP, modeling_glm4.Glm4ForCausalLM.forward) == original
    assert type(model.model.norm).__name__.startswith("Liger") and type(model.model.layers[0].mlp).__name__.startswith("Liger")
    assert not type(ref_model.model.norm).__name__.startswith("Liger")
    assert n == ref_n == sum(n - 3 for n in (37, 120, 64, 9))
    assert abs(s - ref_s) / ref_s < 1e-5, (s, ref_s)
    assert set(g) == set(ref_g) and len(g) > 10
    errs = {k: _rel_err(g[k], ref_g[k]) for k in ref_g}
    assert max(errs.values()) < 1e-5, sorted(errs.items(), key=lambda kv: -kv[1])[:5]


def test_varlen_kernel_matches_sdpa_bf16():
    """glmtune_varlen on random q/k/v (GLM-4's 32:2 GQA, head_dim 128) vs causal SDPA per sequence;
    fp32 inputs under autocast are cast to bf16 and returned in fp32."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from glmtune.models.speed import cu_seqlens_kwargs, varlen_attention_forward

    lens = [300, 517, 1099, 1]
    T = sum(lens)
    torch.manual_seed(0)
    q = torch.randn(1, 32, T, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, T, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    got, _ = varlen_attention_forward(None, q, k, v, None, scaling=128 ** -0.5, **cu_seqlens_kwargs(lens, "cuda"))
    refs, s = [], 0
    for n in lens:
        refs.append(sdpa(q[:, :, s:s + n].float(), k[:, :, s:s + n].float().repeat_interleave(16, 1),
                         v[:, :, s:s + n].float().repeat_interleave(16, 1), is_causal=True).transpose(1, 2))
        s += n
    ref = torch.cat(refs, 1)
    assert got.shape == (1, T, 32, 128) and got.dtype == torch.bfloat16
    assert float((got.float() - ref).abs().max()) < 2e-2
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got32, _ = varlen_attention_forward(None, q.float(), k.float(), v.float(), None, scaling=128 ** -0.5,
                                            **cu_seqlens_kwargs(lens, "cuda"))
    assert got32.dtype == torch.float32 and float((got32 - got.float()).abs().max()) == 0.0


def test_varlen_packed_equals_padded_bf16(gpu_model):
    """A packed row through glmtune_varlen vs the same conversations padded through SDPA, bf16."""
    from transformers import AutoModelForCausalLM

    from glmtune.models.speed import register_varlen_attention
    from glmtune.train.loop import forward_loss_sum
    from glmtune.train.speed import set_attention

    model = AutoModelForCausalLM.from_pretrained(gpu_model, dtype=torch.bfloat16).cuda().eval()
    exs = _examples((300, 517, 1099, 64))
    with torch.no_grad():
        s, n = forward_loss_sum(model, _cuda(pad_batch(exs, pad_id=0)))
        padded = float(s / n)
        old = set_attention(model, register_varlen_attention())
        s2, n2 = forward_loss_sum(model, _cuda(pack_batch(exs, varlen=True)))
        packed = float(s2 / n2)
        set_attention(model, old)
        s3, _ = forward_loss_sum(model, _cuda(pack_batch(exs)))  # packed SDPA (block mask from positions)
    assert old == "sdpa" and int(n) == int(n2)
    assert abs(packed - padded) / padded < 1e-2, (packed, padded)
    assert abs(float(s3 / n) - padded) / padded < 1e-2


def _run(make_cfg, gpu_model, name, **over):
    from rich.console import Console

    from glmtune.train import run_training

    text = io.StringIO()
    base = {"model.path": str(gpu_model), "model.dtype": "bf16", "train.max_steps": 12, "train.lr": 5e-3,
            "train.gradient_checkpointing": True, "data.val_size": 4, "method.r": 16, "method.alpha": 32}
    res = run_training(make_cfg(name, **{**base, **over}), console=Console(file=text, width=200), return_model=True)
    return res, text.getvalue()


@pytest.mark.parametrize("liger,compile,adapter", [("flce", True, "model"), ("all", False, "fp32")])
def test_run_training_with_every_lever_on(make_cfg, gpu_model, liger, compile, adapter):
    """LoRA through run_training with varlen + liger + compile + checkpointing: same first loss as with
    every lever off (bf16, 2%), the loss falls, eval works, liger is undone, and the returned model is
    back to eager blocks and its own attention and generates."""
    pytest.importorskip("liger_kernel")
    from transformers.models.glm4 import modeling_glm4

    on = {"speed.attention": "varlen", "speed.liger": liger, "speed.compile": compile, "speed.adapter_dtype": adapter}
    off = {"speed.attention": "model", "speed.liger": "none", "speed.compile": False, "data.packing": False}
    fast, log = _run(make_cfg, gpu_model, "on", **on)
    slow, _ = _run(make_cfg, gpu_model, "off", **off)
    # the speed line names what engaged; fp32 adapters on bf16 never run fused LoRA, and say so
    assert (f"speed: packed rows (varlen FlashAttention), liger {liger}{', compiled blocks' if compile else ''}"
            f"{', adapters in the model dtype, fused LoRA (' if adapter == 'model' else ', CUDA graphs'}") in log
    assert ("speed.fused_lora auto -> off (adapters fp32, activations bf16" in log) == (adapter == "fp32")
    rows = [m for m in fast.metrics if "loss" in m]
    assert all(m["input_tokens_per_s"] > m["trained_tokens_per_s"] > 0 and m["peak_mem_allocated_gib"] > 0
               and m["peak_mem_reserved_gib"] >= m["peak_mem_allocated_gib"] for m in rows)
    a = [m["loss"] for m in fast.metrics if "loss" in m]
    b = [m["loss"] for m in slow.metrics if "loss" in m]
    assert len(a) == len(b) == 12
    assert abs(a[0] - b[0]) / b[0] < 2e-2, (a[0], b[0])
    # the loss falls (CPU fp32 reference of this run: 11.78 -> 9.17 in 12 steps), eval agrees loosely
    # (bf16 adapters and kernels make the two trajectories drift apart a little)
    assert min(a[-3:]) < a[0] - 1.0, a
    assert fast.eval_loss is not None and abs(fast.eval_loss - slow.eval_loss) / slow.eval_loss < 0.15
    assert modeling_glm4.Glm4ForCausalLM.forward.__module__.startswith("transformers")  # liger undone
    assert modeling_glm4.Glm4RMSNorm.__module__.startswith("transformers")
    lora_dtypes = {p.dtype for n, p in fast.model.named_parameters() if "lora_" in n}
    assert lora_dtypes == {torch.bfloat16 if adapter == "model" else torch.float32}
    base = fast.model.get_base_model()
    assert base.config._attn_implementation == "sdpa"
    assert all(layer._compiled_call_impl is None for layer in base.model.layers)
    ids = torch.tensor([[151331, 151333, 151336]], device="cuda")
    with torch.no_grad():
        out = fast.model.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)
    assert json.loads((fast.output_dir / "final" / "adapter_config.json").read_text())["r"] == 16


def test_run_training_cuda_graphs_match_eager(make_cfg, gpu_model):
    """speed.cuda_graphs (fixed 2048-token rows, blocks replayed as CUDA graphs) + fused LoRA vs the same
    levers without graphs: the same examples per step give the same losses (bf16), eval agrees, and the
    returned model has PEFT's own forwards back."""
    common = {"speed.attention": "varlen", "speed.liger": "none", "speed.compile": True, "speed.adapter_dtype": "model",
              "train.gradient_checkpointing": False}
    graphed, log = _run(make_cfg, gpu_model, "graphs", **common, **{"speed.cuda_graphs": True})
    eager, elog = _run(make_cfg, gpu_model, "eager", **common, **{"speed.cuda_graphs": False})
    assert "fused LoRA (" in log and "CUDA graphs (2048-token rows)" in log and "CUDA graphs (" not in elog
    a = [m["loss"] for m in graphed.metrics if "loss" in m]
    b = [m["loss"] for m in eager.metrics if "loss" in m]
    assert len(a) == len(b) == 12
    for x, y in list(zip(a, b))[:3]:
        assert abs(x - y) / y < 2e-2, (a, b)
    assert abs(a[-1] - b[-1]) / b[-1] < 0.1 and min(a[-3:]) < a[0] - 1.0, (a, b)
    assert abs(graphed.eval_loss - eager.eval_loss) / eager.eval_loss < 0.1
    assert not any(hasattr(m, "_glmtune_peft_forward") for m in graphed.model.modules())


@pytest.fixture(scope="module")
def gpu_moe(tmp_path_factory, glm4_tokenizer_dir):
    """A tiny Glm4MoeLite (GLM-4.7-Flash layout) with FlashAttention-friendly MLA widths (q/k heads of
    48 + 16 rotary, v heads of 64) and grouped-GEMM-aligned experts."""
    from glmtune.models.tiny import build_tiny_glm4_moe
    shape = dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=64, q_lora_rank=64,
                 kv_lora_rank=64, qk_nope_head_dim=48, qk_rope_head_dim=16, v_head_dim=64)
    return build_tiny_glm4_moe(tmp_path_factory.mktemp("gpu_moe") / "flash", glm4_tokenizer_dir, lite=True,
                               overrides=shape)


@pytest.mark.parametrize("ckpt", [False, True])
def test_run_training_moe_cuda_graphs_match_eager(make_cfg, gpu_moe, ckpt):
    """speed.cuda_graphs on a mixture-of-experts model (routing, grouped expert LoRA and, with
    checkpointing, their recomputation inside the captured graphs) vs the same run eager: same
    losses for the same examples (bf16), and the router's balance loss still logged every step (its
    hooks' in-place sums are replayed with the graph; Python hooks themselves never run on replay)."""
    common = {"speed.adapter_dtype": "model", "train.gradient_checkpointing": ckpt}
    graphed, log = _run(make_cfg, gpu_moe, f"moe-graphs-{ckpt}", **common, **{"speed.cuda_graphs": True})
    eager, elog = _run(make_cfg, gpu_moe, f"moe-eager-{ckpt}", **common, **{"speed.cuda_graphs": False})
    assert "CUDA graphs (2048-token rows)" in log and "grouped expert LoRA (2 MoE layers)" in log, log
    assert "fused RMSNorm (" in log, log
    assert "CUDA graphs (" not in elog
    a = [m["loss"] for m in graphed.metrics if "loss" in m]
    b = [m["loss"] for m in eager.metrics if "loss" in m]
    assert len(a) == len(b) == 12
    for x, y in list(zip(a, b))[:3]:
        assert abs(x - y) / y < 2e-2, (a, b)
    assert min(a[-3:]) < a[0] - 0.5, a
    ra = [m.get("router_aux_loss") for m in graphed.metrics if "loss" in m]
    rb = [m.get("router_aux_loss") for m in eager.metrics if "loss" in m]
    assert all(r is not None and 1.0 <= r <= 4.0 for r in ra + rb), (ra, rb)
    # the graphed rows route their padding too; the statistic leaves it out (the rows' real-token
    # mask), so it is the eager run's up to bf16 routing differences (with the padding in: ~1.0 vs 1.5)
    for x, y in list(zip(ra, rb))[:3]:
        assert abs(x - y) / y < 0.05, (ra, rb)
    assert len(set(ra)) > 1


@pytest.mark.parametrize("adapter", ["model", "fp32"])
def test_qlora_with_levers(make_cfg, gpu_model, adapter):
    """QLoRA with the auto levers (varlen, liger flce, compile): bf16 adapters and non-quantized weights
    (speed.adapter_dtype model), and PEFT's fp32 adapters + fp32-upcast LM head/norms (fp32)."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("liger_kernel")
    res, log = _run(make_cfg, gpu_model, f"qlora-{adapter}", **{"method.name": "qlora", "speed.adapter_dtype": adapter})
    assert "speed: packed rows (varlen FlashAttention), liger flce, compiled blocks" in log
    head = res.model.get_base_model().lm_head.weight
    assert head.dtype == (torch.bfloat16 if adapter == "model" else torch.float32)
    losses = [m["loss"] for m in res.metrics if "loss" in m]
    assert len(losses) == 12 and min(losses[-3:]) < losses[0] - 1.0, losses
