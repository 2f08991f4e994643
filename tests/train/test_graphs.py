"""Fixed-size packed rows for CUDA-graphed training (glmtune.train.graphs): the row layout, the
best-fit packer, and the decoder stack's loss and gradients against each sequence run on its own
(fp32, eager on CPU; the graphs themselves are checked on the GPU in tests/train/test_speed_gpu.py)."""
from __future__ import annotations

import pytest
import torch

from glmtune.templates import IGNORE_INDEX
from glmtune.train.graphs import GraphedDecoder, fixed_row, padded_offsets
from glmtune.train.data import pack_rows_best_fit


def test_padded_offsets():
    assert padded_offsets([3, 2], 8, 4) == [0, 3, 5, 8, 8]       # tail padding is a segment
    assert padded_offsets([3, 5], 8, 3) == [0, 3, 8, 8]          # exact fit: no padding segment
    with pytest.raises(ValueError, match="do not fit a row of 8"):
        padded_offsets([5, 4], 8, 4)
    with pytest.raises(ValueError, match="exceed max_segments=2"):
        padded_offsets([1, 1], 8, 2)


def test_fixed_row():
    ids, labels, pos = fixed_row([[5, 6, 7], [8, 9]], None, 7, pad_id=0)
    assert ids == [5, 6, 7, 8, 9, 0, 0]
    assert labels == [IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9, IGNORE_INDEX, IGNORE_INDEX]
    assert pos == [0, 1, 2, 0, 1, 0, 1]
    _, labels, _ = fixed_row([[5, 6, 7]], [[IGNORE_INDEX, IGNORE_INDEX, 7]], 3, pad_id=0)
    assert labels == [IGNORE_INDEX, IGNORE_INDEX, 7]


def test_best_fit_rows_are_full_and_cover_the_stream():
    import numpy as np

    lengths = [int(x) for x in np.random.default_rng(1).integers(300, 1100, size=64)]
    rows = list(pack_rows_best_fit(lengths, 2048, lookahead=16))
    assert sorted(i for r in rows for i in r) == list(range(64))
    fill = [sum(lengths[i] for i in r) for r in rows]
    assert max(fill) <= 2048
    assert sum(fill) / (2048 * len(rows)) > 0.9  # best fit keeps padding under 10% here
    assert list(pack_rows_best_fit([3, 4, 1], 5, lookahead=2)) == [[1, 2], [0]]
    with pytest.raises(ValueError, match="sequence 1 has 9 tokens, more than a row of 8"):
        list(pack_rows_best_fit([2, 9], 8))


def test_stack_loss_equals_each_sequence_alone():
    from transformers import Glm4Config, Glm4ForCausalLM

    torch.manual_seed(0)
    model = Glm4ForCausalLM(Glm4Config(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=16, num_hidden_layers=2, vocab_size=128,
                                       partial_rotary_factor=0.5, attention_bias=True, pad_token_id=0))
    model.config._attn_implementation = "sdpa"
    seqs = [torch.randint(1, 128, (n,)).tolist() for n in (7, 11, 5)]
    ref_sum, ref_n = 0.0, 0
    for s in seqs:  # each conversation alone: the ground truth for packing
        t = torch.tensor([s])
        ref_sum = ref_sum + model(input_ids=t, labels=t).loss * (len(s) - 1)
        ref_n += len(s) - 1
    ref_sum.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    dec = GraphedDecoder(model, tokens=32, max_segments=8, graph=False, varlen=False)
    ids, labels, pos = fixed_row(seqs, None, 32, pad_id=0)
    loss, n = dec.loss_sum(torch.tensor([ids]), torch.tensor([labels]), torch.tensor([pos]), [len(s) for s in seqs])
    assert int(n) == ref_n
    assert abs(float(loss) - float(ref_sum)) < 1e-4 * float(ref_sum)
    loss.backward()
    for name, g in ref_grads.items():
        p = dict(model.named_parameters())[name]
        assert torch.allclose(p.grad, g, atol=1e-5, rtol=1e-4), name
    with pytest.raises(ValueError, match=r"rows must be \(1, 32\)"):
        dec.loss_sum(torch.tensor([ids[:8]]), torch.tensor([labels[:8]]), torch.tensor([pos[:8]]), [7])
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        GraphedDecoder(model, tokens=32, graph=True, varlen=False)
