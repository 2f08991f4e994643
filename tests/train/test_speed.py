"""Speed levers on CPU: how `speed:` resolves on each kind of machine, and every lever's code path in
run_training gives the unfused/uncompiled/unpacked loss (fp32, 1e-5). The CUDA kernels themselves
(liger, FlashAttention varlen) are checked in test_speed_gpu.py (`pytest -m gpu`)."""
from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch

from glmtune.templates import IGNORE_INDEX
from glmtune.errors import ConfigError
from glmtune.train.data import Example, pack_batch, pad_batch
from glmtune.train.speed import resolve_speed

GPU = dict(cuda=True, native=True, varlen_problem=None, liger_problem=None)  # a CUDA box with every kernel


# --------------------------------------------------------------------------------------------------
# resolution

def test_auto_on_cpu_falls_back_with_notes(make_cfg):
    plan = resolve_speed(make_cfg(), cuda=False, native=True)
    assert (plan.packing, plan.varlen, plan.liger, plan.compile, plan.adapter_fp32) == (True, False, "none", False, True)
    notes = " | ".join(plan.notes)
    assert "speed.attention auto -> sdpa packed path (varlen off: no CUDA GPU" in notes
    assert "speed.liger auto -> none (no CUDA GPU" in notes and "speed.compile auto -> off (no CUDA GPU)" in notes
    assert not plan.fused_loss


def test_auto_on_gpu_turns_levers_on(make_cfg):
    plan = resolve_speed(make_cfg(**{"model.dtype": "bf16"}), **GPU)
    assert (plan.packing, plan.varlen, plan.liger, plan.compile) == (True, True, "flce", True) and len(plan.notes) == 1
    # fp32 adapters on bf16 activations never run fused LoRA
    assert (plan.graphs, plan.graph_tokens, plan.adapter_fp32, plan.fused_lora) == (True, 2048, True, False)
    assert "speed.fused_lora auto -> off (adapters fp32, activations bf16" in plan.notes[0]
    cpu = resolve_speed(make_cfg(), cuda=False, native=True)
    assert (cpu.packing, cpu.varlen, cpu.liger, cpu.compile, cpu.fused_lora, cpu.graphs) == (
        True, False, "none", False, True, False)
    # without compile, liger also fuses RMSNorm and SwiGLU
    assert resolve_speed(make_cfg(**{"model.dtype": "bf16", "speed.compile": False}), **GPU).liger == "all"
    # fp32 weights: FlashAttention can't run, packed SDPA instead
    fp32 = resolve_speed(make_cfg(), **GPU)
    assert fp32.varlen is False and "model.dtype fp32" in fp32.notes[0]
    # a chosen attention kernel is kept
    eager = resolve_speed(make_cfg(**{"model.dtype": "bf16", "model.attn_implementation": "eager"}), **GPU)
    assert eager.varlen is False and "model.attn_implementation is eager" in eager.notes[0]
    # liger missing: auto falls back
    nolig = resolve_speed(make_cfg(**{"model.dtype": "bf16"}), **{**GPU, "liger_problem": "liger-kernel is not installed"})
    assert nolig.liger == "none" and "speed.liger auto -> none (liger-kernel is not installed)" in nolig.notes
    adapters = resolve_speed(make_cfg(**{"model.dtype": "bf16", "speed.adapter_dtype": "model"}), **GPU)
    assert adapters.adapter_fp32 is False and adapters.fused_lora and adapters.notes == ()
    assert (adapters.fused_lora, adapters.graphs) == (True, True)
    prefix = resolve_speed(make_cfg(**{"model.dtype": "bf16", "method.name": "prefix"}), **GPU)
    assert (prefix.packing, prefix.varlen, prefix.liger, prefix.compile) == (False, False, "none", False)
    assert resolve_speed(make_cfg(**{"method.name": "prefix", "speed.liger": "all"}), **GPU).liger == "all"


def test_fused_lora_and_cuda_graphs_resolution(make_cfg):
    bf16 = {"model.dtype": "bf16"}
    on = resolve_speed(make_cfg(**bf16, **{"speed.adapter_dtype": "model"}), **GPU)
    assert (on.fused_lora, on.graphs, on.graph_tokens) == (True, True, 2048)
    # decided once, with accelerate's processes: DDP keeps fused LoRA, graphs only when asked; FSDP neither
    ddp = resolve_speed(make_cfg(**bf16, **{"speed.adapter_dtype": "model"}), **GPU, processes=2, distributed="MULTI_GPU")
    assert ddp.fused_lora and not ddp.graphs and "capture under DDP is opt-in" in ddp.notes[-1]
    asked = {"speed.adapter_dtype": "model", "speed.cuda_graphs": True}
    assert resolve_speed(make_cfg(**bf16, **asked), **GPU, processes=2, distributed="MULTI_GPU").graphs
    with pytest.raises(ConfigError, match="speed.cuda_graphs=true cannot run here: accelerate runs FSDP"):
        resolve_speed(make_cfg(**bf16, **asked), **GPU, processes=2, distributed="FSDP")
    fsdp = resolve_speed(make_cfg(**bf16, **{"speed.adapter_dtype": "model"}), **GPU, processes=2, distributed="FSDP")
    assert not fsdp.fused_lora and "speed.fused_lora auto -> off (accelerate runs FSDP)" in fsdp.notes
    assert not fsdp.graphs and "speed.cuda_graphs auto -> off (accelerate runs FSDP" in fsdp.notes[-1]
    with pytest.raises(ConfigError, match="speed.fused_lora=true cannot run here: adapters fp32, activations bf16"):
        resolve_speed(make_cfg(**bf16, **{"speed.fused_lora": True}), **GPU)
    assert resolve_speed(make_cfg(**bf16, **{"data.cutoff_len": 3000}), **GPU).graph_tokens == 3072
    assert resolve_speed(make_cfg(**bf16, **{"speed.graph_tokens": 4096}), **GPU).graph_tokens == 4096
    with pytest.raises(ConfigError, match=r"speed.graph_tokens \(512\) must hold the longest conversation"):
        make_cfg(**bf16, **{"speed.graph_tokens": 512, "data.cutoff_len": 1024})
    cpu = resolve_speed(make_cfg(), cuda=False, native=True)
    assert cpu.fused_lora and not cpu.graphs
    assert "speed.cuda_graphs auto -> off (no CUDA GPU; varlen attention is off)" in cpu.notes
    drop = resolve_speed(make_cfg(**bf16, **{"method.dropout": 0.05}), **GPU)
    assert not drop.graphs and "method.dropout > 0" in drop.notes[-1]
    full = resolve_speed(make_cfg(**bf16, **{"method.name": "full"}), **GPU)
    assert not full.fused_lora and not full.graphs
    with pytest.raises(ConfigError, match="speed.cuda_graphs=true cannot run here: no CUDA GPU"):
        resolve_speed(make_cfg(**{"speed.cuda_graphs": True}), cuda=False, native=True)
    with pytest.raises(ConfigError, match="speed.fused_lora=true fuses LoRA layers; method full has none"):
        resolve_speed(make_cfg(**bf16, **{"method.name": "full", "speed.fused_lora": True}), **GPU)
    assert not resolve_speed(make_cfg(**bf16, **{"speed.cuda_graphs": False}), **GPU).graphs


def test_packing_auto_off_for_prefix_and_remote_code(make_cfg):
    assert resolve_speed(make_cfg(**{"method.name": "prefix"}), cuda=False).packing is False
    remote = resolve_speed(make_cfg(), cuda=True, native=False, varlen_problem=None, liger_problem=None)
    assert (remote.packing, remote.varlen, remote.liger, remote.compile) == (False, False, "none", False)
    assert resolve_speed(make_cfg(**{"data.packing": False}), **GPU).packing is False


def test_forced_levers_that_cannot_run_are_errors(make_cfg):
    bf16 = {"model.dtype": "bf16"}
    with pytest.raises(ConfigError, match=r"field 'speed.attention': speed.attention=varlen cannot run here: "
                                          r"no CUDA GPU.*Fix: .*speed.attention: auto"):
        resolve_speed(make_cfg(**bf16, **{"speed.attention": "varlen"}), cuda=False)
    with pytest.raises(ConfigError, match=r"field 'speed.attention'.*torch 9.9 has no torch.nn.attention.varlen"):
        resolve_speed(make_cfg(**bf16, **{"speed.attention": "varlen"}),
                      **{**GPU, "varlen_problem": "torch 9.9 has no torch.nn.attention.varlen"})
    with pytest.raises(ConfigError, match=r"field 'speed.liger': speed.liger=flce cannot run here: no CUDA GPU"):
        resolve_speed(make_cfg(**{"speed.liger": "flce"}), cuda=False)
    with pytest.raises(ConfigError, match=r"field 'speed.liger'.*liger-kernel is not installed.*"
                                          r"Fix: on a CUDA GPU, pip install -e \"\.\[gpu\]\""):
        resolve_speed(make_cfg(**{"speed.liger": "all"}), **{**GPU, "liger_problem": "liger-kernel is not installed"})
    with pytest.raises(ConfigError, match=r"field 'speed.compile'.*remote code"):
        resolve_speed(make_cfg(**{"speed.compile": True}), cuda=True, native=False, varlen_problem=None,
                      liger_problem=None)


def test_config_cross_checks_name_the_option(make_cfg):
    with pytest.raises(ConfigError, match=r"speed.attention=varlen runs on packed rows"):
        make_cfg(**{"model.dtype": "bf16", "speed.attention": "varlen", "data.packing": False})
    with pytest.raises(ConfigError, match=r"speed.attention=varlen \(FlashAttention\) computes in bf16/fp16"):
        make_cfg(**{"speed.attention": "varlen"})
    with pytest.raises(ConfigError, match=r"speed.adapter_dtype=model applies to method lora/qlora only"):
        make_cfg(**{"speed.adapter_dtype": "model", "method.name": "full"})
    with pytest.raises(ConfigError, match=r"field 'speed.liger'"):
        make_cfg(**{"speed.liger": "rope"})
    cfg = make_cfg(**{"speed.compile": "auto", "data.packing": "auto"})
    assert cfg.speed.compile == "auto" and cfg.data.packing == "auto"
    assert make_cfg(**{"speed.compile": False}).speed.compile is False


def test_the_plan_is_frozen(make_cfg):
    import dataclasses

    plan = resolve_speed(make_cfg(), cuda=False, native=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.graphs = True
    assert isinstance(plan.notes, tuple)
    assert plan.block_mask is False and replace(plan, native=False).block_mask is True
    assert replace(plan, native=False, packing=False).block_mask is False


# one decider per lever, on hand-set inputs (what resolve_speed would probe or ask accelerate)

def test_decide_packing(make_cfg):
    from glmtune.models.peft_setup import method_traits
    from glmtune.train.speed import decide_packing

    lora, prefix = method_traits("lora"), method_traits("prefix")
    assert decide_packing(make_cfg(), lora, native=True) == (True, None)
    assert decide_packing(make_cfg(), lora, native=False) == (False, "data.packing auto -> off (remote-code model)")
    assert decide_packing(make_cfg(), prefix, native=True) == (False, "data.packing auto -> off (method prefix)")
    assert decide_packing(make_cfg(**{"data.packing": False}), lora, native=True) == (False, None)
    assert decide_packing(make_cfg(**{"data.packing": True}), lora, native=False) == (True, None)


def test_decide_attention(make_cfg):
    from glmtune.train.speed import decide_attention

    bf16 = make_cfg(**{"model.dtype": "bf16"})
    gpu = dict(packing=True, native=True, cuda=True, varlen_problem=None)
    assert decide_attention(bf16, **gpu) == (True, None)
    assert decide_attention(bf16, **{**gpu, "varlen_problem": "torch 2.9 has no varlen"}) == (
        False, "speed.attention auto -> sdpa packed path (varlen off: torch 2.9 has no varlen)")
    assert decide_attention(make_cfg(), **{**gpu, "cuda": False}) == (
        False, "speed.attention auto -> sdpa packed path (varlen off: no CUDA GPU; model.dtype fp32 "
               "(FlashAttention needs bf16/fp16))")
    assert decide_attention(bf16, **{**gpu, "packing": False}) == (False, None)  # padded: nothing to say
    assert decide_attention(make_cfg(**{"model.dtype": "bf16", "speed.attention": "model"}), **gpu) == (False, None)
    assert decide_attention(make_cfg(**{"model.dtype": "bf16", "speed.attention": "varlen"}), **gpu) == (True, None)
    with pytest.raises(ConfigError, match="speed.attention=varlen cannot run here: remote-code model"):
        decide_attention(make_cfg(**{"model.dtype": "bf16", "speed.attention": "varlen"}), **{**gpu, "native": False})


def test_decide_compile(make_cfg):
    from glmtune.models.peft_setup import method_traits
    from glmtune.train.speed import decide_compile

    lora, prefix, cfg = method_traits("lora"), method_traits("prefix"), make_cfg()
    on = dict(cuda=True, native=True, distributed="NO")
    assert decide_compile(cfg, lora, **on) == (True, None)
    assert decide_compile(cfg, lora, **{**on, "distributed": "MULTI_GPU"}) == (True, None)
    assert decide_compile(cfg, lora, **{**on, "cuda": False}) == (False, "speed.compile auto -> off (no CUDA GPU)")
    assert decide_compile(cfg, lora, **{**on, "distributed": "DEEPSPEED"}) == (
        False, "speed.compile auto -> off (accelerate runs DEEPSPEED)")
    assert decide_compile(cfg, prefix, **on) == (False, "speed.compile auto -> off (method prefix)")
    assert decide_compile(cfg, lora, **on, moe=True) == (
        False, "speed.compile auto -> off (mixture-of-experts model: inductor fails on the grouped expert GEMMs)")
    assert decide_compile(make_cfg(**{"speed.compile": True}), lora, **{**on, "cuda": False}) == (True, None)
    with pytest.raises(ConfigError, match="speed.compile=true compiles transformers-native decoder blocks"):
        decide_compile(make_cfg(**{"speed.compile": True}), lora, **{**on, "native": False})


def test_decide_liger(make_cfg):
    from glmtune.models.peft_setup import method_traits
    from glmtune.train.speed import decide_liger

    lora, prefix, cfg = method_traits("lora"), method_traits("prefix"), make_cfg()
    gpu = dict(cuda=True, native=True, compile_on=True, distributed="NO", liger_problem=None)
    assert decide_liger(cfg, lora, **gpu) == ("flce", None)
    assert decide_liger(cfg, lora, **{**gpu, "compile_on": False}) == ("all", None)
    assert decide_liger(cfg, lora, **{**gpu, "liger_problem": "liger-kernel is not installed"}) == (
        "none", "speed.liger auto -> none (liger-kernel is not installed)")
    assert decide_liger(cfg, lora, **{**gpu, "distributed": "FSDP"})[0] == "none"
    assert decide_liger(cfg, prefix, **gpu)[1].startswith("speed.liger auto -> none (method prefix")
    assert decide_liger(make_cfg(**{"speed.liger": "all"}), prefix, **gpu) == ("all", None)
    assert decide_liger(make_cfg(**{"speed.liger": "none"}), lora, **{**gpu, "cuda": False}) == ("none", None)
    with pytest.raises(ConfigError, match="speed.liger=flce cannot run here: remote-code model"):
        decide_liger(make_cfg(**{"speed.liger": "flce"}), lora, **{**gpu, "native": False})


def test_decide_fused_lora(make_cfg):
    from glmtune.models.peft_setup import method_traits
    from glmtune.train.speed import decide_fused_lora

    lora, full = method_traits("lora"), method_traits("full")
    fast = make_cfg(**{"model.dtype": "bf16", "speed.adapter_dtype": "model"})
    assert decide_fused_lora(fast, lora, distributed="NO") == (True, None)
    assert decide_fused_lora(fast, lora, distributed="MULTI_GPU") == (True, None)
    assert decide_fused_lora(fast, lora, distributed="FSDP") == (False, "speed.fused_lora auto -> off (accelerate runs FSDP)")
    assert decide_fused_lora(make_cfg(), lora, distributed="NO") == (True, None)  # fp32 adapters on fp32
    value, note = decide_fused_lora(make_cfg(**{"model.dtype": "bf16", "method.dropout": 0.1}), lora, distributed="NO")
    assert not value and "adapters fp32, activations bf16" in note and "method.dropout > 0" in note
    assert decide_fused_lora(make_cfg(**{"method.name": "full"}), full, distributed="NO") == (False, None)
    with pytest.raises(ConfigError, match="speed.fused_lora=true cannot run here: method.dropout > 0"):
        decide_fused_lora(make_cfg(**{"speed.fused_lora": True, "method.dropout": 0.1}), lora, distributed="NO")


def test_decide_graphs(make_cfg):
    from glmtune.models.peft_setup import method_traits
    from glmtune.train.speed import decide_graphs, graph_row_tokens

    lora, cfg = method_traits("lora"), make_cfg()
    one_gpu = dict(cuda=True, varlen=True, processes=1, distributed="NO")
    assert decide_graphs(cfg, lora, **one_gpu) == (True, None)
    assert decide_graphs(cfg, lora, **{**one_gpu, "varlen": False}) == (
        False, "speed.cuda_graphs auto -> off (varlen attention is off)")
    assert decide_graphs(cfg, lora, **{**one_gpu, "processes": 2, "distributed": "MULTI_GPU"}) == (
        False, "speed.cuda_graphs auto -> off (2 processes: capture under DDP is opt-in (speed.cuda_graphs: true))")
    assert decide_graphs(make_cfg(**{"speed.cuda_graphs": True}), lora,
                         **{**one_gpu, "processes": 2, "distributed": "MULTI_GPU"}) == (True, None)
    assert decide_graphs(make_cfg(**{"speed.offload_activations": True}), lora, **one_gpu)[0] is False
    assert decide_graphs(make_cfg(**{"speed.cuda_graphs": False}), lora, **one_gpu) == (False, None)
    assert decide_graphs(cfg, method_traits("full"), **one_gpu) == (False, "speed.cuda_graphs auto -> off (method full)")
    assert graph_row_tokens(cfg) == 2048 and graph_row_tokens(make_cfg(**{"data.cutoff_len": 2100})) == 2176


def test_speed_line_is_printed_after_a_failed_capture(make_cfg, monkeypatch):
    """A capture that fails under `auto` turns graphs and compile off; the speed line, printed after
    capture, names neither and the fallback note says why (the old line, printed before capture,
    claimed both). Graphs and compile are forced into the plan (a CPU has neither), compilation is
    replaced by a recorder and the graph builder raises."""
    import io

    from rich.console import Console

    from glmtune.models import speed as kernels
    from glmtune.train import graphs, loop, run_training

    real = loop.resolve_speed
    def forced(cfg, **kw):
        plan = real(cfg, **kw)
        return replace(plan, graphs=True, compile=True, notes=plan.notes[:0])  # without the CPU's notes
    monkeypatch.setattr(loop, "resolve_speed", forced)
    calls = []
    monkeypatch.setattr(kernels, "compile_decoder_layers", lambda model, dynamic: calls.append(("compile", dynamic)))
    monkeypatch.setattr(kernels, "uncompile_decoder_layers", lambda model: calls.append(("uncompile",)))

    def capture_fails(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(graphs, "GraphedDecoder", capture_fails)
    out = io.StringIO()
    result = run_training(make_cfg(**{"train.max_steps": 2}), console=Console(file=out, width=400))
    log = out.getvalue()
    speed_lines = [line for line in log.splitlines() if line.startswith("speed: ")]
    assert speed_lines == ["speed: packed rows (model attention), fused LoRA (12 of 12 LoRA layers)"], log
    assert ("· speed.cuda_graphs auto -> off (capture failed: RuntimeError: operation not permitted when stream "
            "is capturing); speed.compile -> off with it") in log
    # the line comes after the capture attempt, which comes after the model summary
    assert log.index("trainable") < log.index("speed: ")
    assert calls == [("compile", False), ("uncompile",)] and result.steps == 2


# --------------------------------------------------------------------------------------------------
# each lever's code path gives the reference loss (fp32, tiny GLM-4)

def _examples():
    g = torch.Generator().manual_seed(0)
    out = []
    for n in (9, 14, 6):
        ids = torch.randint(0, 150000, (n,), generator=g).tolist()
        out.append(Example(ids, [IGNORE_INDEX] * 3 + ids[3:]))
    return out


def test_fused_loss_path_equals_logits_path(tiny_model):
    """forward_loss_sum(fused=True) is what liger's fused linear-cross-entropy plugs into: the model
    computes the summed loss from the labels. Without liger (CPU) it must equal logits + token_loss_sum,
    value and gradients, padded and packed."""
    from transformers import AutoModelForCausalLM

    from glmtune.train.loop import forward_loss_sum

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).train()
    exs = _examples()
    for batch in (pad_batch(exs, pad_id=0), pack_batch(exs)):
        res = []
        for fused in (False, True):
            model.zero_grad(set_to_none=True)
            s, n = forward_loss_sum(model, dict(batch), fused=fused)
            s.backward()
            res.append((float(s.detach()), int(n), model.model.layers[0].self_attn.q_proj.weight.grad.clone(),
                        model.lm_head.weight.grad.clone()))
        (s0, n0, gq0, gh0), (s1, n1, gq1, gh1) = res
        assert n0 == n1 == (9 - 3) + (14 - 3) + (6 - 3)
        assert s0 > 100 and abs(s1 - s0) / s0 < 1e-5, (s0, s1)
        torch.testing.assert_close(gq1, gq0, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(gh1, gh0, rtol=1e-5, atol=1e-7)


def _fake_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1),
                      enable_gqa=False, **_):
    """CPU stand-in for torch's FlashAttention varlen kernel: causal SDPA per packed sequence.
    q (T, Hq, D), k/v (T, Hkv, D) -> (T, Hq, D)."""
    assert window_size == (-1, 0) and max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
    outs = []
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        o = torch.nn.functional.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), is_causal=True, scale=scale,
            enable_gqa=enable_gqa)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)


def test_varlen_path_through_run_training_equals_unpacked(make_cfg, monkeypatch):
    """The varlen plumbing of run_training (cu_seq_lens kwargs in every packed batch, the attention
    switch, no mask, GQA) with the CUDA kernel replaced by per-sequence SDPA: same losses as unpacked,
    and the returned model is back on its own attention."""
    import torch.nn.attention.varlen as tv

    from glmtune.train import loop, run_training

    calls = []
    monkeypatch.setattr(tv, "varlen_attn", lambda *a, **k: calls.append(len(a[3]) - 1) or _fake_varlen_attn(*a, **k))
    real = loop.resolve_speed

    def with_varlen(cfg, **kw):
        plan = real(cfg, **kw)
        return replace(plan, varlen=plan.packing)

    monkeypatch.setattr(loop, "resolve_speed", with_varlen)
    over = {"train.max_steps": 2, "train.grad_accum": 2, "data.val_size": 4}
    packed = run_training(make_cfg("varlen", **over, **{"data.packing": True}), return_model=True)
    monkeypatch.setattr(loop, "resolve_speed", real)
    unpacked = run_training(make_cfg("padded", **over, **{"data.packing": False}))
    a = [m["loss"] for m in unpacked.metrics if "loss" in m]
    b = [m["loss"] for m in packed.metrics if "loss" in m]
    assert len(a) == 2 and all(abs(x - y) / x < 1e-5 for x, y in zip(a, b)), (a, b)
    assert abs(packed.eval_loss - unpacked.eval_loss) / unpacked.eval_loss < 1e-5
    # packed and padded batches count the same input (non-pad) and trained tokens
    rows = [[(m["input_tokens"], m["trained_tokens"]) for m in r.metrics if "loss" in m] for r in (packed, unpacked)]
    assert rows[0] == rows[1] and all(i > t > 0 for i, t in rows[0]), rows
    assert all(m["input_tokens_per_s"] > m["trained_tokens_per_s"] > 0 for m in packed.metrics if "loss" in m)
    assert packed.model.get_base_model().config._attn_implementation == "sdpa"
    # 2 layers x (2 steps x 2 micro-batches of 4 conversations + 1 dev batch of 4): the kernel really ran
    assert calls == [4] * (2 * (2 * 2 + 1)), calls


# Opt-in (-m slow, ~50 s of inductor compiling on 2 cores): on a CPU `speed.compile: auto` is off, so no
# user runs this path here; where compile does run, tests/train/test_graphs_gpu.py checks compiled ==
# eager (-m gpu, bench/run_gpu_tests.sh).
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile on CPU (inductor) needs a C++ compiler")
def test_compiled_training_equals_eager(make_cfg):
    """speed.compile: true on CPU (inductor): regional compile of the decoder blocks gives the eager
    losses; the second step's loss checks the compiled backward (the update) too."""
    from glmtune.train import run_training

    from torch._dynamo.utils import counters

    over = {"train.max_steps": 2, "data.packing": True}
    eager = run_training(make_cfg("eager", **over, **{"speed.compile": False}))
    counters.clear()
    compiled = run_training(make_cfg("compiled", **over, **{"speed.compile": True}), return_model=True)
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo really compiled the blocks
    a = [m["loss"] for m in eager.metrics]
    b = [m["loss"] for m in compiled.metrics]
    assert len(a) == 2 and all(abs(x - y) / x < 1e-5 for x, y in zip(a, b)), (a, b)
    # the returned model's blocks are eager again
    from glmtune.models.loading import find_decoder
    assert all(layer._compiled_call_impl is None for layer in find_decoder(compiled.model).layers)


def test_offloaded_activations_give_the_same_losses(make_cfg):
    """speed.offload_activations keeps autograd's saved tensors in CPU memory: same losses (the
    second step's loss checks the backward that read them back)."""
    import torch

    from glmtune.train import run_training

    over = {"train.max_steps": 2, "train.gradient_checkpointing": True}
    plain = run_training(make_cfg("plain", **over))
    seen = []
    real = torch.autograd.graph.save_on_cpu

    class Spy(real):
        def __init__(self, *a, **k):
            seen.append(k)
            super().__init__(*a, **k)
    torch.autograd.graph.save_on_cpu = Spy
    try:
        off = run_training(make_cfg("offload", **over, **{"speed.offload_activations": True}))
    finally:
        torch.autograd.graph.save_on_cpu = real
    assert len(seen) >= 2  # used for every micro-batch
    a, b = [m["loss"] for m in plain.metrics], [m["loss"] for m in off.metrics]
    assert len(a) == 2 and all(abs(x - y) / x < 1e-5 for x, y in zip(a, b)), (a, b)


def test_faster_settings_names_what_the_config_blocks(make_cfg):
    from glmtune.train.speed import faster_settings

    bf16 = {"model.dtype": "bf16"}
    preset_like = make_cfg(**bf16, **{"method.dropout": 0.05})
    hint = faster_settings(preset_like, resolve_speed(preset_like, **GPU), cuda=True)
    assert hint.startswith("faster: --set method.dropout=0 --set speed.adapter_dtype=model turns on fused LoRA")
    fast = make_cfg(**bf16, **{"method.dropout": 0.0, "speed.adapter_dtype": "model"})
    assert faster_settings(fast, resolve_speed(fast, **GPU), cuda=True) is None
    assert faster_settings(preset_like, resolve_speed(preset_like, cuda=False, native=True), cuda=False) is None
    full = make_cfg(**bf16, **{"method.name": "full"})
    assert faster_settings(full, resolve_speed(full, **GPU), cuda=True) is None


def test_decide_fused_norm(make_cfg):
    from glmtune.train.speed import decide_fused_norm

    cfg = make_cfg()
    assert decide_fused_norm(cfg, cuda=True, compile_on=False, liger="none")          # e.g. a MoE model
    assert not decide_fused_norm(cfg, cuda=True, compile_on=True, liger="flce")       # compile handles norms
    assert not decide_fused_norm(cfg, cuda=True, compile_on=False, liger="all")       # liger's RMSNorm does
    assert not decide_fused_norm(cfg, cuda=False, compile_on=False, liger="none")     # CPU: only when asked
    assert decide_fused_norm(make_cfg(**{"speed.fused_norm": True}), cuda=False, compile_on=False, liger="none")
    assert not decide_fused_norm(make_cfg(**{"speed.fused_norm": False}), cuda=True, compile_on=False, liger="none")
