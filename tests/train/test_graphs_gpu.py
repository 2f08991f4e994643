"""Fused LoRA and CUDA-graphed decoder blocks on the GPU (`pytest -m gpu`; bench/run_gpu_tests.sh):
bf16 fused LoRA against PEFT's layers (1e-2), graph replays against the same code run eagerly over rows
with different sequence boundaries (loss and every LoRA gradient), and the same with QLoRA."""
from __future__ import annotations

import pytest
import torch

from glmtune.train.graphs import GraphedDecoder, fixed_row

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, vocab_size=1024, partial_rotary_factor=0.5, attention_bias=True,
             pad_token_id=0, max_position_embeddings=4096)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
ROWS = [[300, 117, 90], [31, 260, 200, 7]]  # two rows of 512 tokens with different boundaries


def _rel_err(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30))


def _peft(model, fused: bool):
    from peft import LoraConfig, get_peft_model

    from glmtune.models.fused_lora import fuse_lora

    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                             init_lora_weights=False), autocast_adapter_dtype=False)
    for p in model.parameters():  # bf16 adapters (PEFT may keep fp32 ones next to a 4-bit base)
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    model.train()
    if fused:
        fuse_lora(model)
    return model


def _model(fused: bool = True):
    from transformers import Glm4Config, Glm4ForCausalLM

    from glmtune.models import speed

    torch.manual_seed(0)
    with torch.device("cuda"):
        base = Glm4ForCausalLM(Glm4Config(**SHAPE)).to(torch.bfloat16)
    base.config._attn_implementation = speed.register_varlen_attention()
    return _peft(base, fused)


def _rows(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for lens in ROWS:
        seqs = [torch.randint(1, SHAPE["vocab_size"], (n,), generator=g).tolist() for n in lens]
        ids, labels, pos = (torch.tensor([x], device="cuda") for x in fixed_row(seqs, None, 512, pad_id=0))
        out.append((ids, labels, pos, lens))
    return out


def _losses_and_grads(model, dec, rows):
    """Per-row losses and the LoRA gradients accumulated over the rows."""
    model.zero_grad(set_to_none=True)
    losses = []
    for ids, labels, pos, lens in rows:
        loss, n = dec.loss_sum(ids, labels, pos, lens)
        (loss / n).backward()
        losses.append(float(loss.detach() / n))
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    return losses, grads


def _max_err(got, truth) -> float:
    return max(_rel_err(g, truth[k]) for k, g in got.items())


def test_fused_lora_bf16_matches_peft():
    """bf16: PEFT's layers and the fused ones (eager, then compiled) against the fp32 truth of the same
    weights, every sequence masked apart (SDPA block mask, no varlen): the fused path is no further from
    it than PEFT's. Also checks the varlen layout of padded fixed rows against the block mask."""
    from glmtune.models import speed

    rows = _rows()
    ref_model = _model(fused=False)
    ref = _losses_and_grads(ref_model, GraphedDecoder(ref_model, tokens=512, graph=False), rows)
    truth_model = ref_model.float()
    truth_model.get_base_model().config._attn_implementation = "sdpa"
    truth = _losses_and_grads(truth_model, GraphedDecoder(truth_model, tokens=512, graph=False, varlen=False), rows)
    del ref_model, truth_model
    peft_err = _max_err(ref[1], truth[1])
    assert peft_err < 5e-2
    for a, b in zip(ref[0], truth[0]):
        assert abs(a - b) / b < 1e-2  # varlen over padded offsets == block mask (independent layouts)

    model = _model(fused=True)
    got = _losses_and_grads(model, GraphedDecoder(model, tokens=512, graph=False), rows)
    for a, b in zip(got[0], truth[0]):
        assert abs(a - b) / b < 1e-2
    assert _max_err(got[1], truth[1]) <= 1.5 * peft_err + 1e-3
    # regional compile traces the fused functions
    speed.compile_decoder_layers(model, dynamic=False)
    comp = _losses_and_grads(model, GraphedDecoder(model, tokens=512, graph=False), rows)
    for a, b in zip(comp[0], truth[0]):
        assert abs(a - b) / b < 1e-2
    assert _max_err(comp[1], truth[1]) <= 1.5 * peft_err + 1e-3


@pytest.mark.parametrize("compile", [False, True])
def test_graph_replays_equal_eager(compile):
    from glmtune.models import speed

    rows = _rows()
    model = _model()
    if compile:
        speed.compile_decoder_layers(model, dynamic=False)
    eager = _losses_and_grads(model, GraphedDecoder(model, tokens=512, graph=False), rows)
    dec = GraphedDecoder(model, tokens=512, max_segments=8, graph=True)
    for _ in range(2):  # replays after replays: static buffers refreshed each time
        got = _losses_and_grads(model, dec, rows)
        for a, b in zip(got[0], eager[0]):
            assert abs(a - b) / b < 1e-3
        for k, g in got[1].items():
            assert _rel_err(g, eager[1][k]) < 1e-2, k
    # a row's boundaries matter: the same tokens split differently give another loss
    ids, labels, pos, _ = rows[0]
    other, _ = dec.loss_sum(ids, labels, pos, [512])
    assert abs(float(other) - float(dec.loss_sum(ids, labels, pos, ROWS[0])[0])) > 1e-3


def test_graph_qlora_equals_eager(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig, Glm4Config, Glm4ForCausalLM

    from glmtune.models import speed

    torch.manual_seed(0)
    Glm4ForCausalLM(Glm4Config(**SHAPE)).to(torch.bfloat16).save_pretrained(tmp_path)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    base = Glm4ForCausalLM.from_pretrained(tmp_path, quantization_config=q, dtype=torch.bfloat16, device_map={"": 0})
    base.config._attn_implementation = speed.register_varlen_attention()
    ref_model = _peft(base, fused=False)
    rows = _rows()
    ref = _losses_and_grads(ref_model, GraphedDecoder(ref_model, tokens=512, graph=False), rows)
    from glmtune.models.fused_lora import fuse_lora

    from glmtune.models.fused_lora import _lora_parts

    assert fuse_lora(ref_model)["linear"] == 2 * len(TARGETS)
    model = ref_model
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer).__name__ == "Linear4bit" and _lora_parts(q_proj) is not None  # fused path on
    eager = _losses_and_grads(model, GraphedDecoder(model, tokens=512, graph=False), rows)
    for a, b in zip(eager[0], ref[0]):
        assert abs(a - b) / b < 1e-2
    for k, g in eager[1].items():
        assert _rel_err(g, ref[1][k]) < 2e-2, k
    got = _losses_and_grads(model, GraphedDecoder(model, tokens=512, max_segments=8, graph=True), rows)
    for a, b in zip(got[0], eager[0]):
        assert abs(a - b) / b < 1e-3
    for k, g in got[1].items():
        assert _rel_err(g, eager[1][k]) < 1e-2, k
