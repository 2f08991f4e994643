"""Built-in sample data (glmtune/resources/sample/), used by `glmtune demo` and the docs.

English data for the real-model demo comes from chatterbot-corpus (BSD-3, installed by the `real`
extra): its conversation files are grouped by topic, so the opening user message of each
conversation labelled with its file's topic is a small, real topic-classification set.
"""
from __future__ import annotations

import csv
import importlib.util
import random
from pathlib import Path

from glmtune.errors import InputError

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "resources" / "sample"
SAMPLES = {
    # CMCC-34-shaped intent data: sentence_sep ([SEP] turns), c_numerical, label_raw, word_mf2, num_cnum;
    # 6 dialogues for each of the 34 intents, so an 8:1:1 stratified split keeps every intent in train.
    "cmcc34": "cmcc34_sample.csv",
    # Alpaca-format multi-turn role-play / emotional-support chats (system persona + history).
    "roleplay": "roleplay_alpaca.json",
}

# chatterbot-corpus English files with >= 48 distinct opening messages -> topic label.
# (tech_support.yml has 1050 conversations but only 10 distinct openings.)
CHATTERBOT_TOPICS = {"trivia.yml": "trivia", "coding.yml": "coding", "ai.yml": "ai", "emotion.yml": "emotion",
                     "psychology.yml": "psychology"}
TOPIC_SYSTEM = ("Classify the topic of the user's message. Answer with exactly one of: "
                + ", ".join(CHATTERBOT_TOPICS.values()) + ".")
REAL_EXTRA = 'pip install -e ".[real]"'


def sample_path(name: str) -> Path:
    """Path of a built-in sample file by name: ``cmcc34`` or ``roleplay``."""
    if name not in SAMPLES:
        raise InputError(f"no built-in sample named {name!r}", field="name", fix=f"use one of {', '.join(SAMPLES)}")
    return SAMPLE_DIR / SAMPLES[name]


def chatterbot_english_dir() -> Path:
    """The English data folder of the installed chatterbot-corpus package."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("chatterbot-corpus (English sample data of the real-model demo) is not installed",
                         field="chatterbot_corpus", fix=f"{REAL_EXTRA} (or pip install chatterbot-corpus)")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "english"


def chatterbot_topic_rows(per_topic: int = 48, seed: int = 0) -> list[dict]:
    """``{"text", "label"}`` rows: ``per_topic`` distinct opening messages of each topic, seeded choice.

    48 per topic keeps the classes balanced (emotion.yml has 48 distinct openings).
    """
    import yaml

    folder, rng, rows = chatterbot_english_dir(), random.Random(seed), []
    for fname, topic in CHATTERBOT_TOPICS.items():
        path = folder / fname
        convs = yaml.safe_load(path.read_text(encoding="utf-8"))["conversations"]
        texts = sorted({" ".join(str(c[0]).split()) for c in convs if c and str(c[0]).strip()})
        if len(texts) < per_topic:
            raise InputError(f"only {len(texts)} distinct opening messages, {per_topic} wanted", file=path,
                             field="per_topic", fix=f"use per_topic <= {len(texts)}")
        rng.shuffle(texts)
        rows += [{"text": t, "label": topic} for t in texts[:per_topic]]
    return rows


def topic_of(answer: str) -> str:
    """A generated answer as a topic label: case, surrounding space, quotes and a final full stop do not count."""
    return answer.strip().strip(".!\"'").strip().lower()


def write_chatterbot_topics(out: str | Path, per_topic: int = 48, seed: int = 0) -> Path:
    """Write the topic rows as a text,label CSV (the `classification` format `glmtune data convert` reads)."""
    from glmtune.io import atomic_path

    out = Path(out)
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(chatterbot_topic_rows(per_topic, seed))
    return out
