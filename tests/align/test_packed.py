"""Packed DPO (glmtune.align.packed) = TRL's DPOTrainer on its padded batch: same loss, same gradients,
same logged metrics and reference log-probs, on a tiny GLM-4 with a perturbed LoRA (fp32, CPU)."""
from __future__ import annotations

import pytest
import torch

from glmtune.align.packed import CHOSEN, PAD, PROMPT, REJECTED, pack_pairs, pair_mask
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


@pytest.fixture
def dpo_pair(tiny_model, tmp_path, request):
    """A packed DPO trainer on a tiny GLM-4 whose trained LoRA has random B matrices, so the policy differs from
    the reference (TRL's frozen "ref" copy of the adapter as it was built)."""
    from datasets import Dataset

    from glmtune.align.config import load_align_config
    from glmtune.align.trainers import ALGORITHMS, training_arguments
    from glmtune.models.tokenizer import load_tokenizer
    from glmtune.templates import get_template
    from glmtune.train.model import apply_method, load_base

    attn, loss_type = request.param
    cfg = load_align_config({"model": {"path": str(tiny_model), "dtype": "fp32", "attn_implementation": attn},
                             "data": {"datasets": ["x.jsonl"], "cutoff_len": 40},
                             "train": {"batch_size": 5, "seed": 0}, "output": {"dir": str(tmp_path / "o")},
                             "align": {"beta": 0.3, **({"loss_type": loss_type} if loss_type else {})}})
    tok = load_tokenizer(tiny_model)
    rows = _pairs(tok, get_template("glm4"))
    torch.manual_seed(0)
    model = apply_method(load_base(cfg), cfg)
    algo = ALGORITHMS["dpo"]
    args = training_arguments(cfg, algo, tmp_path / "o", has_dev=False, cuda=False)
    _, cls = algo.classes()
    trainer = cls(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                  pack_tokens=48)
    with torch.no_grad():  # after TRL copied the fresh adapter into its frozen "ref" adapter
        for name, p in trainer.model.named_parameters():
            if "lora_B.default" in name:
                p.normal_(0, 0.5)
    return trainer, rows


@pytest.mark.parametrize("dpo_pair", [("sdpa", None), ("eager", None), ("sdpa", "ipo")], indirect=True,
                         ids=["sdpa-sigmoid", "eager-sigmoid", "sdpa-ipo"])
def test_packed_dpo_equals_trl_loss_and_gradients(dpo_pair):
    import trl

    trainer, rows = dpo_pair
    model = trainer.model
    model.train()
    batch = trainer.data_collator(rows)
    assert batch["pack_input_ids"].shape[0] >= 2  # several packed rows (row_tokens 48), some padding
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

    assert ref_loss.item() != pytest.approx(0.6931, abs=1e-3)  # the policy is not its reference
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in ref_grads.values())
    for n, want in ref_grads.items():  # float noise is relative to each tensor's scale
        torch.testing.assert_close(grads[n], want, rtol=1e-4, atol=1e-5 * want.abs().max().item(),
                                   msg=lambda m: f"{n}: {m}")
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
              "logits/chosen", "entropy", "mean_token_accuracy", "rewards/accuracies"):
        assert metrics[k] == pytest.approx(trl_metrics[k], rel=1e-4, abs=1e-6), k


@pytest.mark.parametrize("dpo_pair", [("sdpa", None)], indirect=True)
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
    assert decide_packing(cfg(), model)[0] == 400                      # 4 x cutoff_len
    assert decide_packing(cfg(pack_tokens=256), model)[0] == 256
    tokens, note = decide_packing(cfg(packing=False), model)
    assert tokens is None and "align.packing is false" in note
    model.config._attn_implementation = "flash_attention_2"
    tokens, note = decide_packing(cfg(), model)
    assert tokens is None and "flash_attention_2 takes no block mask" in note
    with pytest.raises(ConfigError, match="field 'align.packing': align.packing: model.attn_implementation "
                                          "flash_attention_2 takes no block mask"):
        decide_packing(cfg(packing=True), model)
