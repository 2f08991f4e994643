"""The toy task of the alignment tests (see conftest.py): key word -> answer."""
from __future__ import annotations

import json
import random
from pathlib import Path

KEYS = {"red": "apple", "blue": "river"}
FILLERS = ["cat", "dog", "horse", "bird", "fish", "sheep", "mouse", "wolf", "bear", "duck",
           "green", "black", "white", "pink", "gold", "gray"]


def toy_prompts(n: int, seed: int) -> list[tuple[str, str]]:
    """n (prompt, key) pairs, keys alternating so every split is balanced."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        key = list(KEYS)[i % 2]
        a, b = rng.sample(FILLERS, 2)
        out.append((f"{a} {b} {key}", key))
    return out


def other(key: str) -> str:
    return next(v for k, v in KEYS.items() if k != key)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def count_words(prompts, completions, **_):
    """A user reward for `module:function` tests: the completion's word count."""
    return [float(len(c.split())) for c in completions]
