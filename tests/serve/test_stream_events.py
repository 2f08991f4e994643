"""The per-token pieces of a streamed answer: the prebuilt SSE event equals the chunk it stands for,
and the Rust decode the stream decoder uses equals transformers' decode."""
from __future__ import annotations

import json

import pytest

from glmtune.serve import schemas


@pytest.mark.parametrize("piece", ["", "fox", ' "quoted" \\ back', "line\nnext\ttab", "中文，标点。", "\u0000", "😀 {}"])
def test_a_content_event_is_the_chunk_of_that_piece(piece):
    event = schemas.content_events("chatcmpl-1", 'glm "4"', 1700000000)(piece)
    assert event.startswith("data: ") and event.endswith("\n\n")
    assert json.loads(event[len("data: "):]) == schemas.chunk("chatcmpl-1", 'glm "4"', {"content": piece},
                                                             created=1700000000)


def test_rust_decode_equals_transformers_decode():
    import random

    from glmtune.infer.predictor import rust_decode
    from glmtune.models.tokenizer import load_tokenizer, packaged_tokenizer_dir

    tok = load_tokenizer(packaged_tokenizer_dir("glm4"))
    fast = rust_decode(tok)
    assert fast is not None
    rng = random.Random(0)
    text_ids = tok.encode("Streaming 中文 answers, byte-level: é ü 😀\n", add_special_tokens=False)
    specials = tok.convert_tokens_to_ids(["<|user|>", "<|assistant|>", "<|endoftext|>"])
    for _ in range(200):
        ids = [rng.choice(text_ids + specials + [rng.randrange(len(tok))]) for _ in range(rng.randrange(1, 9))]
        assert fast(ids, skip_special_tokens=False) == tok.decode(ids, skip_special_tokens=False,
                                                                clean_up_tokenization_spaces=False)
