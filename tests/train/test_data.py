"""Pure batch functions on hand-computed values, and packed == unpacked loss on a real forward."""
from __future__ import annotations

import torch

from glmtune.templates import IGNORE_INDEX
from glmtune.train.data import (BatchStream, Example, block_causal_mask, pack_batch, pad_batch,
                                packed_position_ids, token_loss_sum)


def test_packed_positions_and_labels():
    a, b = Example([1, 2, 3], [IGNORE_INDEX, 2, 3]), Example([4, 5], [4, 5])
    batch = pack_batch([a, b])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    # b's first label would be predicted from a's last token: never trained
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5]]
    assert "attention_mask" not in batch
    assert packed_position_ids([1, 1]).tolist() == [0, 0]


def test_block_causal_mask():
    m = block_causal_mask([2, 1])[0, 0]
    allowed = (m == 0).int().tolist()
    assert allowed == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]


def test_pad_batch():
    batch = pad_batch([Example([1, 2, 3], [IGNORE_INDEX, 2, 3]), Example([4], [4])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3], [4, IGNORE_INDEX, IGNORE_INDEX]]


def test_token_loss_sum_hand_value():
    # uniform logits over V=4: every trained token costs log 4; labels[1:] has 2 trained tokens
    logits = torch.zeros(1, 3, 4)
    s, n = token_loss_sum(logits, torch.tensor([[IGNORE_INDEX, 1, 2]]))
    assert int(n) == 2 and abs(float(s) - 2 * torch.log(torch.tensor(4.0)).item()) < 1e-6


def test_stream_shards_are_the_single_process_batch():
    one = BatchStream(10, 4, seed=3)
    two = [BatchStream(10, 2, seed=3, rank=r, world=2) for r in range(2)]
    assert one.per_epoch == two[0].per_epoch == 3          # 4 + 4 + 2: the tail of 2 is kept
    for k in range(6):                                      # two epochs, different orders
        assert sorted(one.indices(k)) == sorted(two[0].indices(k) + two[1].indices(k))
    assert one.indices(0) != one.indices(3)
    assert BatchStream(5, 2, seed=0, world=2).per_epoch == 1  # tail of 1 < world: skipped


def test_stream_deals_tokens_evenly_over_processes():
    """With lengths, each step's conversations are the same set, dealt so the processes' token counts
    differ by far less than a round-robin deal (the all-reduce waits for the slowest process)."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(300, 1100, (400,), generator=g).tolist()
    one = BatchStream(400, 8, seed=3)
    two = [BatchStream(400, 4, seed=3, rank=r, world=2, lengths=lengths) for r in range(2)]
    robin = [BatchStream(400, 4, seed=3, rank=r, world=2) for r in range(2)]

    def gap(streams, k):
        a, b = (sum(lengths[i] for i in s.indices(k)) for s in streams)
        return abs(a - b)

    for k in range(two[0].per_epoch):
        assert sorted(one.indices(k)) == sorted(two[0].indices(k) + two[1].indices(k))
        assert len(two[0].indices(k)) == len(two[1].indices(k)) == 4
    balanced = sum(gap(two, k) for k in range(50)) / 50
    dealt = sum(gap(robin, k) for k in range(50)) / 50
    assert balanced < dealt / 4 and balanced < 200


def test_deal_by_tokens_fills_every_process():
    from glmtune.train.data import deal_by_tokens

    assert deal_by_tokens([0, 1, 2], [10, 50, 20], 2) == [[1], [2, 0]]
    assert all(deal_by_tokens(list(range(5)), [5, 4, 3, 2, 1], 4))


def test_packed_forward_equals_padded(tiny_model):
    """Same examples, padded vs packed (position ids, and explicit 4D block mask): same loss, fp32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    exs = []
    for n in (7, 12, 5):
        ids = torch.randint(0, 150000, (n,), generator=g).tolist()
        exs.append(Example(ids, [IGNORE_INDEX] * 3 + ids[3:]))

    def loss(batch):
        labels = batch.pop("labels")
        with torch.no_grad():
            s, cnt = token_loss_sum(model(**batch, use_cache=False).logits, labels)
        return float(s / cnt)

    padded = loss(pad_batch(exs, pad_id=0))
    packed = loss(pack_batch(exs))
    masked = loss(pack_batch(exs, block_mask=True))
    assert abs(packed - padded) / padded < 1e-5 and abs(masked - padded) / padded < 1e-5
    # without isolation (one long sequence) the loss differs: the test can fail
    no_iso = pack_batch(exs)
    no_iso.pop("position_ids")
    assert abs(loss(no_iso) - padded) / padded > 1e-4


def test_packed_training_equals_unpacked(make_cfg):
    from glmtune.train import run_training
    runs = [run_training(make_cfg(f"p{p}", **{"data.packing": p, "train.max_steps": 3, "train.grad_accum": 2}))
            for p in (False, True)]
    a, b = ([m["loss"] for m in r.metrics] for r in runs)
    assert len(a) == 3 and all(abs(x - y) / x < 1e-5 for x, y in zip(a, b)), (a, b)


def test_nothing_left_after_encoding_says_why_and_the_cutoff_that_fits(tiny_model, qa_file):
    """A cutoff shorter than every conversation's uncuttable part (`cutoff_len: 8` on the issue's data,
    4 on these 8-token minimum ones) only said "no training examples left after encoding"."""
    import pytest

    from glmtune.data.registry import load_dataset
    from glmtune.errors import InputError
    from glmtune.models.tokenizer import load_tokenizer
    from glmtune.templates import get_template
    from glmtune.train.data import encode_records

    tok, tpl, records = load_tokenizer(tiny_model), get_template("glm4"), load_dataset(str(qa_file))
    with pytest.raises(InputError) as e:
        encode_records(records, tok, tpl, cutoff_len=4)
    msg = str(e.value)
    assert msg.startswith("field 'data.cutoff_len': no training examples left after encoding: of 20 conversations "
                          "at data.cutoff_len 4, 20 dropped because the tokens the cut never removes")
    needs = int(msg.split("set data.cutoff_len to at least ")[1].split(";")[0])
    # the suggestion is exact: one token less drops at least one conversation, the value itself keeps all
    assert encode_records(records, tok, tpl, cutoff_len=needs)[1]["encoded"] == 20
    assert encode_records(records, tok, tpl, cutoff_len=needs - 1)[1]["dropped"] >= 1
    longest = max(len(tpl.encode(tok, r["messages"]).input_ids) for r in records)
    with pytest.raises(InputError, match=rf"20 longer than it dropped \(on_overflow: drop\).*Fix: set "
                                         rf"data.cutoff_len to at least {longest} or on_overflow: truncate"):
        encode_records(records, tok, tpl, cutoff_len=4, on_overflow="drop")
