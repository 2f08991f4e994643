"""Exact and near-duplicate removal; the first occurrence is kept.

Near duplicates: character n-gram shingles, MinHash signatures with LSH banding to find candidate
pairs, then the exact Jaccard of the shingle sets decides. Hashes come from crc32 and a seeded
NumPy generator, so results do not depend on PYTHONHASHSEED. The system prompt is left out of the
comparison: classification data shares one long system prompt that would make every pair similar.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field

import numpy as np

from glmtune.data.records import record_position, record_text
from glmtune.errors import InputError

_PRIME = (1 << 61) - 1
NUM_PERM, BANDS = 64, 16   # 16 bands x 4 rows: pairs with Jaccard >= ~0.5 collide in some band


@dataclass
class DedupeReport:
    records_in: int = 0
    records_out: int = 0
    exact: int = 0
    near: int = 0
    examples: list[str] = field(default_factory=list)  # "removed file:line ~ kept file:line (J=0.93)"

    def as_dict(self) -> dict:
        return {"records_in": self.records_in, "records_out": self.records_out, "exact": self.exact,
                "near": self.near}


def _exact_key(rec: dict) -> str:
    return json.dumps([rec["messages"], rec.get("tools")], ensure_ascii=False, sort_keys=True)


def _shingles(text: str, n: int) -> np.ndarray:
    text = "".join(text.split())  # whitespace differences should not hide a duplicate
    grams = {text[i:i + n] for i in range(max(1, len(text) - n + 1))}
    return np.array(sorted(zlib.crc32(g.encode("utf-8")) for g in grams), dtype=np.uint64)


def _signature(shingles: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # (NUM_PERM, n_shingles) -> min over shingles; uint64 wrap-around is fine for hashing.
    return ((np.outer(a, shingles) + b[:, None]) % _PRIME).min(axis=1)


def _jaccard(x: np.ndarray, y: np.ndarray) -> float:
    inter = np.intersect1d(x, y, assume_unique=True).size
    return inter / (x.size + y.size - inter)


def _where(rec: dict) -> str:
    file, line = record_position(rec)
    return f"{file}:{line}"


def dedupe_records(records: list[dict], *, near: bool = True, threshold: float = 0.9, ngram: int = 3,
                   seed: int = 0) -> tuple[list[dict], DedupeReport]:
    """Drop exact duplicates (same messages and tools) and, if ``near``, pairs with Jaccard >= threshold."""
    if not 0 < threshold <= 1:
        raise InputError(f"threshold must be in (0, 1], got {threshold}", field="threshold")
    report = DedupeReport(records_in=len(records))
    seen: set[str] = set()
    unique = []
    for rec in records:
        key = _exact_key(rec)
        if key in seen:
            report.exact += 1
            continue
        seen.add(key)
        unique.append(rec)
    kept = _drop_near_duplicates(unique, threshold, ngram, seed, report) if near else unique
    report.records_out = len(kept)
    return kept, report


def _drop_near_duplicates(records: list[dict], threshold: float, ngram: int, seed: int,
                          report: DedupeReport) -> list[dict]:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 1 << 31, NUM_PERM, dtype=np.uint64)
    b = rng.integers(0, 1 << 31, NUM_PERM, dtype=np.uint64)
    rows = NUM_PERM // BANDS
    buckets: dict[tuple, list[int]] = {}
    shingles: list[np.ndarray] = []
    kept_idx: list[int] = []
    for i, rec in enumerate(records):
        sh = _shingles(record_text(rec), ngram)
        shingles.append(sh)
        sig = _signature(sh, a, b)
        keys = [(band, sig[band * rows:(band + 1) * rows].tobytes()) for band in range(BANDS)]
        match = _first_similar(keys, buckets, shingles, sh, threshold)
        if match is not None:
            j, score = match
            report.near += 1
            if len(report.examples) < 20:
                report.examples.append(f"removed {_where(rec)} ~ kept {_where(records[j])} (J={score:.2f})")
            continue
        kept_idx.append(i)
        for key in keys:
            buckets.setdefault(key, []).append(i)
    return [records[i] for i in kept_idx]


def _first_similar(keys, buckets, shingles, sh, threshold) -> tuple[int, float] | None:
    candidates = sorted({j for key in keys for j in buckets.get(key, ())})
    for j in candidates:
        score = _jaccard(sh, shingles[j])
        if score >= threshold:
            return j, score
    return None
