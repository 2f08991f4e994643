"""The real-model task shared by tests/real: topic classification of real chatbot utterances.

chatterbot-corpus (English) conversation files are grouped by topic; the opening user message of
each conversation is labelled with its file's topic (glmtune.data.sample.chatterbot_topic_rows).
48 distinct messages per topic, the first 12 of each (seeded shuffle) held out: 180 train, 60 test,
no message in both. Prompt: a system instruction listing the topics + the message; answer: the topic.
"""
from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

PER_TOPIC, TEST_PER_TOPIC = 48, 12


def topic_records() -> tuple[list[dict], list[dict]]:
    """Stratified, seeded train/test split of (system, message -> topic) records."""
    from glmtune.data.sample import TOPIC_SYSTEM, chatterbot_topic_rows
    from glmtune.errors import InputError

    try:
        rows = chatterbot_topic_rows(PER_TOPIC, seed=0)  # grouped by topic, each topic shuffled
    except InputError as e:
        pytest.skip(str(e))
    train, test = [], []
    for start in range(0, len(rows), PER_TOPIC):
        recs = [{"messages": [{"role": "system", "content": TOPIC_SYSTEM}, {"role": "user", "content": r["text"]},
                              {"role": "assistant", "content": r["label"]}], "label": r["label"]}
                for r in rows[start:start + PER_TOPIC]]
        test += recs[:TEST_PER_TOPIC]
        train += recs[TEST_PER_TOPIC:]
    random.Random(0).shuffle(train)
    return train, test


def normalise(text: str) -> str:
    """An answer as a topic name: case, surrounding space, quotes and a final full stop do not count."""
    from glmtune.data.sample import topic_of

    return topic_of(text)


def accuracy(answers: list[str], records: list[dict]) -> float:
    return sum(normalise(a) == r["label"] for a, r in zip(answers, records)) / len(records)


def cli_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "NO_COLOR": "1", "COLUMNS": "200"}


def glmtune(*args, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run `python -m glmtune ARGS` as a user does; fail with its output when it fails."""
    proc = subprocess.run([sys.executable, "-m", "glmtune", *map(str, args)], env=cli_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"glmtune {' '.join(map(str, args))} exited {proc.returncode}:\n" \
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def held_out_messages(test: list[dict], n: int) -> list[str]:
    """One held-out user message per topic, round robin, n in all."""
    by_topic: dict[str, list[str]] = {}
    for r in test:
        by_topic.setdefault(r["label"], []).append(r["messages"][1]["content"])
    queues = list(by_topic.values())
    return [queues[i % len(queues)][i // len(queues)] for i in range(n)]


def read_jsonl(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
