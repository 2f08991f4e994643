"""Chunked linear + cross-entropy (glmtune.train.chunked_ce) against logits + F.cross_entropy: summed
loss and gradient w.r.t. the hidden states (fp32, 1e-5), with ignored targets and a last partial chunk."""
import pytest
import torch

from glmtune.templates import IGNORE_INDEX
from glmtune.train.chunked_ce import linear_cross_entropy_sum


@pytest.mark.parametrize("chunk", [1, 4, 7, 100])
def test_matches_logits_cross_entropy(chunk):
    torch.manual_seed(0)
    h = torch.randn(23, 16, requires_grad=True)
    w, b = torch.randn(50, 16), torch.randn(50)
    t = torch.randint(0, 50, (23,))
    t[[0, 5, 6, 22]] = IGNORE_INDEX
    ref = torch.nn.functional.cross_entropy(h @ w.t() + b, t, ignore_index=IGNORE_INDEX, reduction="sum")
    (ref_g,) = torch.autograd.grad(ref * 0.5, h)
    got = linear_cross_entropy_sum(h, w, t, b, chunk_tokens=chunk)
    (got_g,) = torch.autograd.grad(got * 0.5, h)
    assert abs(float(got) - float(ref)) < 1e-5 * float(ref)
    assert torch.allclose(got_g, ref_g, atol=1e-6, rtol=1e-5)
    assert got_g[[0, 5, 6, 22]].abs().max() == 0  # ignored targets give nothing


def test_trainable_head_is_refused():
    w = torch.randn(5, 4, requires_grad=True)
    with pytest.raises(ValueError, match="no gradient for a trainable LM head"):
        linear_cross_entropy_sum(torch.randn(3, 4), w, torch.zeros(3, dtype=torch.long))
