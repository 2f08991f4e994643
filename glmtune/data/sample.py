"""Built-in sample data (glmtune/resources/sample/), used by `glmtune demo` and the docs."""
from __future__ import annotations

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


def sample_path(name: str) -> Path:
    """Path of a built-in sample file by name: ``cmcc34`` or ``roleplay``."""
    if name not in SAMPLES:
        raise InputError(f"no built-in sample named {name!r}", field="name", fix=f"use one of {', '.join(SAMPLES)}")
    return SAMPLE_DIR / SAMPLES[name]
