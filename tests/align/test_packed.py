"""Packed DPO (glmtune.align.packed) = TRL's DPOTrainer on its padded batch: same loss, same gradients,
same logged metrics and reference log-probs, on a tiny GLM-4 with a perturbed LoRA (fp32, CPU), for
both attention layouts (the block mask; varlen segments, on CPU through their SDPA reference)."""
from __future__ import annotations

import pytest
import torch

from glmtune.align.packed import (CHOSEN, PAD, PROMPT, REJECTED, Packing, pack_pairs, pair_mask, pair_segments,
                                  segment_attention_reference, varlen_pair_index)
from glmtune.templates import IGNORE_INDEX

X = IGNORE_INDEX


def test_pack_pairs_layout_by_hand():
    """Two pairs in one row: the prompt once, its last token again before the rejected answer, positions
    restarting per branch; pack_src/pack_dst map each answer token to TRL's padded (2B, L-1) layout."""
    rows = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
            {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11]}]
    b = pack_pairs(rows, max_length=None, row_tokens=64)
    assert b["pack_input_ids"].tolist() == [[1, 2, 3, 4, 5, 3, 6, 7, 8, 9, 8, 10, 11]]
    assert b["pack_position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3, 0, 1, 2, 1, 2, 3]]
    assert b["pack_labels"].tolist() == [[X, X, X, 4, 5, X, 6, X, X, 9, X, 10, 11]]
    P, C, R = PROMPT, CHOSEN, REJECTED
    assert b["pack_seg"].tolist() == [[P, P, C, C, C, R, R, P, C, C, R, R, R]]
    # TRL's padded batch: L = 5 (prompt 3 + chosen 2); rows chosen0, chosen1, rejected0, rejected1
    # (flattened (4, 4)); packed per-token layout is (1, 12)
    assert b["pack_src"].tolist() == [2, 3, 5, 8, 10, 11]
    assert b["pack_dst"].tolist() == [0 * 4 + 2, 0 * 4 + 3, 2 * 4 + 2, 1 * 4 + 1, 3 * 4 + 1, 3 * 4 + 2]
    m = pair_mask(b["pack_pair"], b["pack_seg"], boolean=True)[0, 0]
    assert m[6].tolist() == [1, 1, 0, 0, 0, 1, 1] + [0] * 6        # rejected: prompt core + its own branch
    assert m[4].tolist() == [1, 1, 1, 1, 1] + [0] * 8              # chosen: the prompt and itself
    assert m[9].tolist() == [0] * 7 + [1, 1, 1, 0, 0, 0]           # pair 2 never sees pair 1


def test_pack_rows_cut_like_trl_and_pad():
    """Rows split by row_tokens; answers cut to max_length as TRL's keep_start collator cuts them; a pad
    token sees only itself (no empty softmax row)."""
    rows = [{"prompt_ids": [1, 2], "chosen_ids": [3, 4, 5, 6], "rejected_ids": [7]},
            {"prompt_ids": [8], "chosen_ids": [9], "rejected_ids": [10]}]
    b = pack_pairs(rows, max_length=4, row_tokens=6)
    assert b["pack_input_ids"].tolist() == [[1, 2, 3, 4, 2, 7], [8, 9, 8, 10, 0, 0]]
    assert b["pack_seg"][1].tolist() == [CHOSEN, CHOSEN, REJECTED, REJECTED, PAD, PAD]
    m = pair_mask(b["pack_pair"], b["pack_seg"], boolean=True)
    assert m[1, 0, 4].tolist() == [0, 0, 0, 0, 1, 0]
    add = pair_mask(b["pack_pair"], b["pack_seg"], boolean=False)
    assert (add == 0).equal(m) and add.min() == torch.finfo(torch.float32).min


def test_varlen_pair_index_by_hand():
    """The two pairs of test_pack_pairs_layout_by_hand (P, C, R) = (3, 2, 1), (2, 1, 2): per pair a causal
    segment [prompt core + chosen branch] and a segment of the rejected branch over the prompt core's keys
    and its own."""
    ix = varlen_pair_index([(3, 2, 1), (2, 1, 2)])
    # row: [1, 2 | 3, 4, 5 | 3', 6 | 7 | 8, 9 | 8', 10, 11] at indices 0..12
    assert ix["pair_cu_q"].tolist() == [0, 5, 7, 10, 13]
    assert ix["pair_cu_k"].tolist() == [0, 5, 9, 12, 16]
    assert ix["pair_kv_index"].tolist() == [0, 1, 2, 3, 4, 0, 1, 5, 6, 7, 8, 9, 7, 10, 11, 12]
    assert (ix["pair_max_q"], ix["pair_max_k"]) == (5, 5)
    assert ix["pair_cu_q"].dtype == ix["pair_cu_k"].dtype == torch.int32  # FlashAttention's offsets


def test_segment_attention_equals_block_mask_attention():
    """Attention over the gathered varlen segments = SDPA over the packed row with the block mask: the
    same output for every token and the same gradients for q, k and v (GQA 4:2)."""
    import torch.nn.functional as F

    rows = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
            {"prompt_ids": [7], "chosen_ids": [9, 9, 9], "rejected_ids": [10, 11]},
            {"prompt_ids": [7, 8, 8, 8], "chosen_ids": [9], "rejected_ids": [10, 11, 12]}]
    var_b = pack_pairs(rows, max_length=None, row_tokens=None, layout="varlen")
    segments = [pair_segments(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in rows]
    assert var_b["pack_input_ids"][0].tolist() == [t for s in segments for t in s[0]]  # the pairs in order
    seg = torch.tensor([[x for s in segments for x in s[2]]])
    pair = torch.tensor([[b for b, s in enumerate(segments) for _ in s[2]]])
    g = torch.Generator().manual_seed(0)
    T = var_b["pack_input_ids"].shape[1]
    q, k, v = (torch.randn(T, h, 8, generator=g, dtype=torch.float64).requires_grad_() for h in (4, 2, 2))
    idx = var_b["pack_pair_kv_index"]
    got = segment_attention_reference(q, k[idx], v[idx], var_b["pack_pair_cu_q"], var_b["pack_pair_cu_k"])
    m = pair_mask(pair, seg, boolean=True)
    want = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                          attn_mask=m, enable_gqa=True)[0].transpose(0, 1)
    torch.testing.assert_close(got, want)
    w = torch.randn(want.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((got * w).sum(), (q, k, v))
    for a, b in zip(grads, torch.autograd.grad((want * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, b)


def _pairs(tok, template, n=5):
    """Pairs with prompts and answers of different lengths (one longer than max_length=40)."""
    words = "red blue apple river cat dog green stone cloud".split()
    rows = []
    for i in range(n):
        msgs = [{"role": "user", "content": " ".join(words[j % 9] for j in range(i, i + 2 + 3 * i))}]
        p = template.encode_prompt(tok, msgs)
        c = template.answer_ids(tok, msgs, " ".join(words[: 1 + i]), None, p)
        r = template.answer_ids(tok, msgs, " ".join(words[i:i + 3 + (i % 2) * 20]), None, p)
        rows.append({"prompt_ids": p, "chosen_ids": c, "rejected_ids": r})
    return rows


def _trainer(tiny_model, tmp_path, *, attn="sdpa", loss_type=None, packing=None, fresh_adapter=False,
             precompute=False):
    """glmtune's DPO trainer (align.trainers) on the tiny GLM-4 with a fresh LoRA, and its 5 pairs."""
    from datasets import Dataset

    from glmtune.align.config import load_align_config
    from glmtune.align.trainers import ALGORITHMS, training_arguments
    from glmtune.models.tokenizer import load_tokenizer
    from glmtune.templates import get_template
    from glmtune.train.model import apply_method, load_base

    cfg = load_align_config({"model": {"path": str(tiny_model), "dtype": "fp32", "attn_implementation": attn},
                             "data": {"datasets": ["x.jsonl"], "cutoff_len": 40},
                             "train": {"batch_size": 5, "seed": 0}, "output": {"dir": str(tmp_path / "o")},
                             "align": {"beta": 0.3, "precompute_reference": precompute,
                                       **({"loss_type": loss_type} if loss_type else {})}})
    tok = load_tokenizer(tiny_model)
    rows = _pairs(tok, get_template("glm4"))
    torch.manual_seed(0)
    model = apply_method(load_base(cfg), cfg)
    algo = ALGORITHMS["dpo"]
    args = training_arguments(cfg, algo, tmp_path / "o", has_dev=False, cuda=False)
    _, cls = algo.classes()
    trainer = cls(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                  packing=packing, fresh_adapter=fresh_adapter)
    return trainer, rows


@pytest.fixture
def dpo_pair(tiny_model, tmp_path, request):
    """A packed DPO trainer on a tiny GLM-4 whose trained LoRA has random B matrices, so the policy differs from
    the reference (TRL's frozen "ref" copy of the adapter as it was built)."""
    attn, loss_type, layout = request.param
    trainer, rows = _trainer(tiny_model, tmp_path, attn=attn, loss_type=loss_type,
                             packing=Packing(layout, 48 if layout == "mask" else None))
    with torch.no_grad():  # after TRL copied the fresh adapter into its frozen "ref" adapter
        for name, p in trainer.model.named_parameters():
            if "lora_B.default" in name:
                p.normal_(0, 0.5)
    return trainer, rows


@pytest.mark.parametrize("dpo_pair", [("sdpa", None, "mask"), ("eager", None, "mask"), ("sdpa", "ipo", "mask"),
                                      ("sdpa", None, "varlen"), ("sdpa", "ipo", "varlen")], indirect=True,
                         ids=["mask-sdpa-sigmoid", "mask-eager-sigmoid", "mask-sdpa-ipo", "varlen-sigmoid",
                              "varlen-ipo"])
def test_packed_dpo_equals_trl_loss_and_gradients(dpo_pair):
    import trl

    trainer, rows = dpo_pair
    model = trainer.model
    model.train()
    batch = trainer.data_collator(rows)
    if trainer.packing.layout == "mask":
        assert batch["pack_input_ids"].shape[0] >= 2  # several packed rows (row_tokens 48), some padding
    else:  # one row, no padding: TRL's tokens less each pair's prompt but its last token, once
        n_tokens = int(batch["attention_mask"].sum()) - sum(len(r["prompt_ids"]) - 1 for r in rows)
        assert batch["pack_input_ids"].shape == (1, n_tokens)
    padded = {k: v for k, v in batch.items() if not k.startswith("pack_")}
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def run(loss_fn):
        model.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in params}

    ref_loss, ref_grads = run(lambda: trl.DPOTrainer.compute_loss(trainer, model, dict(padded)))
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    loss, grads = run(lambda: trainer.compute_loss(model, dict(batch)))
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    # the varlen layout switched the model at its first packed forward (and TRL's padded forward above
    # ran before it: the padded path works either way)
    assert (model.get_base_model().config._attn_implementation == "glmtune_pairs") == (
        trainer.packing.layout == "varlen")

    assert ref_loss.item() != pytest.approx(0.6931, abs=1e-3)  # the policy is not its reference
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in ref_grads.values())
    for n, want in ref_grads.items():  # float noise is relative to each tensor's scale
        torch.testing.assert_close(grads[n], want, rtol=1e-4, atol=1e-5 * want.abs().max().item(),
                                   msg=lambda m: f"{n}: {m}")
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
              "logits/chosen", "entropy", "mean_token_accuracy", "rewards/accuracies"):
        assert metrics[k] == pytest.approx(trl_metrics[k], rel=1e-4, abs=1e-6), k


@pytest.mark.parametrize("dpo_pair", [("sdpa", None, "varlen")], indirect=True, ids=["varlen"])
def test_fused_lora_gives_the_packed_loss_and_gradients_of_peft(dpo_pair):
    """align runs the policy through train's fused LoRA layers where they engage (fp32 here): the packed
    DPO loss and every LoRA gradient are PEFT's; the reference forward (adapters off) is PEFT's own."""
    from glmtune.models.fused_lora import fuse_lora, unfuse_lora

    trainer, rows = dpo_pair
    model = trainer.model
    model.train()
    batch = trainer.data_collator(rows)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def run():
        model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in params}

    want_loss, want = run()
    counts = fuse_lora(model)
    try:
        assert counts["fused"] == counts["linear"] > 0 and counts["mlp"] > 0
        got_loss, got = run()
    finally:
        unfuse_lora(model)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in want.values())
    for n, w in want.items():
        torch.testing.assert_close(got[n], w, rtol=1e-4, atol=1e-5 * w.abs().max().item(), msg=lambda m: f"{n}: {m}")


def test_fused_lora_blockers_name_the_setting():
    from glmtune.train.speed import fused_lora_blockers

    assert fused_lora_blockers("bf16", "model", 0.0, "MULTI_GPU", key="align.adapter_dtype") == []
    assert fused_lora_blockers("fp32", "fp32", 0.0, "NO", key="align.adapter_dtype") == []
    why = fused_lora_blockers("bf16", "fp32", 0.1, "DEEPSPEED", key="align.adapter_dtype")
    assert why == ["adapters fp32, activations bf16: every layer would run PEFT's forward; align.adapter_dtype: "
                   "model fuses on bf16", "method.dropout > 0 (a dropped-out input runs PEFT's forward)",
                   "accelerate runs DEEPSPEED"]


@pytest.mark.parametrize("dpo_pair", [("sdpa", None, "mask"), ("sdpa", None, "varlen")], indirect=True,
                         ids=["mask", "varlen"])
def test_packed_reference_logps_equal_trl_precompute(dpo_pair):
    """The reference log-probs TRL would precompute per dataset (its padded compute_ref_log_probs) are the
    packed ones: the adapters off, no gradient."""
    import trl

    trainer, rows = dpo_pair
    batch = trainer.data_collator(rows)
    padded = {k: v for k, v in batch.items() if not k.startswith("pack_")}
    want = trl.DPOTrainer.compute_ref_log_probs(trainer, trainer.model, padded)
    got = trainer.compute_ref_log_probs(trainer.model, batch)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        assert not g.requires_grad


def test_precomputed_reference_in_trl_init_is_packed_right(tiny_model, tmp_path):
    """align.precompute_reference: TRL computes the reference log-probs inside its __init__, through the
    packed collator and compute_ref_log_probs; with the varlen layout they still equal TRL's padded ones
    (the attention switch happens at the packed forward, not after the trainer is built)."""
    import trl

    trainer, rows = _trainer(tiny_model, tmp_path, packing=Packing("varlen"), fresh_adapter=True, precompute=True)
    padded = {k: v for k, v in trainer.data_collator(rows).items() if not k.startswith("pack_")}
    want = trl.DPOTrainer.compute_ref_log_probs(trainer, trainer.model, padded)
    ds = trainer.train_dataset
    for col, w in zip(("ref_chosen_logps", "ref_rejected_logps"), want):
        torch.testing.assert_close(torch.tensor(ds[col]), w, rtol=1e-5, atol=1e-5)


def test_packing_decision(tiny_model, tmp_path):
    """auto packs on sdpa/eager, explains itself otherwise; `true` where it cannot run is a config error."""
    from glmtune.align.config import load_align_config
    from glmtune.align.packed import decide_packing
    from glmtune.errors import ConfigError
    from glmtune.train.model import load_base

    def cfg(**align):
        return load_align_config({"model": {"path": str(tiny_model), "dtype": "fp32"},
                                  "data": {"datasets": ["x.jsonl"], "cutoff_len": 100},
                                  "output": {"dir": str(tmp_path / "o")}, "align": align})
    model = load_base(cfg())
    plan, note = decide_packing(cfg(), model)                         # this CPU: no varlen kernel
    assert plan == Packing("mask", 400) and note.endswith(            # 4 x cutoff_len
        "rows of <= 400 tokens; pack_attention auto -> mask: no CUDA FlashAttention varlen kernel here)")
    assert decide_packing(cfg(pack_tokens=256), model)[0] == Packing("mask", 256)
    assert "pack_attention" not in decide_packing(cfg(pack_attention="mask"), model)[1]
    with pytest.raises(ConfigError, match="field 'align.pack_attention': align.pack_attention varlen: no CUDA "
                                          "FlashAttention varlen kernel here"):
        decide_packing(cfg(pack_attention="varlen"), model)
    tokens, note = decide_packing(cfg(packing=False), model)
    assert tokens is None and "align.packing is false" in note
    model.config._attn_implementation = "flash_attention_2"
    tokens, note = decide_packing(cfg(), model)
    assert tokens is None and "flash_attention_2 takes no block mask" in note
    with pytest.raises(ConfigError, match="field 'align.packing': align.packing: model.attn_implementation "
                                          "flash_attention_2 takes no block mask"):
        decide_packing(cfg(packing=True), model)


def test_packing_decision_where_varlen_runs(tiny_model, tmp_path, monkeypatch):
    """With a varlen kernel (as on a CUDA GPU), auto picks varlen for a bf16 sdpa model, and says why not
    for fp32 weights or eager attention."""
    import glmtune.models.speed
    from glmtune.align.config import load_align_config
    from glmtune.align.packed import decide_packing
    from glmtune.train.model import load_base

    monkeypatch.setattr(glmtune.models.speed, "varlen_available", lambda: True)

    def cfg(dtype="bf16", attn="sdpa"):
        return load_align_config({"model": {"path": str(tiny_model), "dtype": dtype, "attn_implementation": attn},
                                  "data": {"datasets": ["x.jsonl"], "cutoff_len": 100},
                                  "output": {"dir": str(tmp_path / "o")}})
    plan, note = decide_packing(cfg(), load_base(cfg()))
    assert plan == Packing("varlen") and "FlashAttention varlen" in note
    plan, note = decide_packing(cfg("fp32"), load_base(cfg("fp32")))
    assert plan == Packing("mask", 400) and "mask: model.dtype fp32" in note
    plan, note = decide_packing(cfg(attn="eager"), load_base(cfg(attn="eager")))
    assert plan == Packing("mask", 400) and "mask: model.attn_implementation eager" in note


def test_fresh_adapter_reference_is_the_base_model(tiny_model, tmp_path):
    """From a fresh LoRA, TRL's frozen "ref" copy of it is dropped: the reference forward runs with the
    adapters off (no LoRA GEMMs), and its log-probs are the starting policy's."""
    import trl

    trainer, rows = _trainer(tiny_model, tmp_path, fresh_adapter=True)
    kept, _ = _trainer(tiny_model, tmp_path / "kept")
    assert "ref" not in trainer.model.peft_config and "ref" in kept.model.peft_config
    assert not any(".ref." in n for n, _ in trainer.model.named_parameters())
    batch = trainer.data_collator(rows)
    got = trainer.compute_ref_log_probs(trainer.model, batch)
    with torch.no_grad():  # the policy itself, adapters on (B = 0 at the start)
        want = trl.DPOTrainer.compute_ref_log_probs(kept, kept.model, batch)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_adapter_dtype_model_keeps_lora_in_the_model_dtype(tiny_model, tmp_path):
    """align.adapter_dtype: model gives a bf16 model bf16 LoRA weights (no fp32 copy of each adapted
    activation), fp32 (the default) PEFT's fp32 ones; full fine-tuning has no adapter to cast."""
    from glmtune.align.config import load_align_config
    from glmtune.align.run import load_policy
    from glmtune.align.trainers import ALGORITHMS
    from glmtune.errors import ConfigError
    from glmtune.models.tokenizer import load_tokenizer
    from glmtune.templates import get_template

    def cfg(method="lora", **align):
        return load_align_config({"model": {"path": str(tiny_model), "dtype": "bf16"}, "data": {"datasets": ["x"]},
                                  "method": {"name": method}, "output": {"dir": str(tmp_path / "o")},
                                  "align": align})
    tok, tpl = load_tokenizer(tiny_model), get_template("glm4")
    for align, want in (({}, torch.float32), ({"adapter_dtype": "model"}, torch.bfloat16)):
        model = load_policy(cfg(**align), ALGORITHMS["dpo"], tpl, tok)
        lora = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
        assert lora == {want}, align
        assert model.get_base_model().model.embed_tokens.weight.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="align.adapter_dtype=model applies to method lora/qlora only"):
        cfg("full", adapter_dtype="model")
