"""Exact and near-duplicate removal; the first occurrence is kept.

Near duplicates: character n-gram shingles, MinHash signatures and an LSH index from datasketch
(``MinHashLSH``, banding tuned to ``threshold``) find candidates among the records kept so far, then
the exact Jaccard of the shingle sets decides. Each record costs one index query, so the run is
near-linear in the number of records (bench/dedupe_scale.py: 100k near-duplicate-heavy records).
Shingles are crc32 values and the permutations seeded, so results do not depend on
PYTHONHASHSEED. The system prompt is left out of the comparison: classification data shares one
long system prompt that would make every pair similar.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field

import numpy as np

from glmtune.data.records import record_position, record_text
from glmtune.errors import InputError

NUM_PERM = 128  # datasketch's default; LSH bands/rows are chosen for the threshold from it


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


def _crc_value(value) -> int:
    """datasketch's hash function for shingles that are already 32-bit crc32 values."""
    return int(value)


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
    from datasketch import MinHash, MinHashLSH

    shingles = [_shingles(record_text(rec), ngram) for rec in records]
    signatures = MinHash.bulk(shingles, num_perm=NUM_PERM, seed=seed, hashfunc=_crc_value)
    # Only kept records enter the index, so a cluster of near copies is compared with its first one.
    index = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    kept_idx: list[int] = []
    for i, rec in enumerate(records):
        match = _first_similar(index.query(signatures[i]), shingles, shingles[i], threshold)
        if match is not None:
            j, score = match
            report.near += 1
            if len(report.examples) < 20:
                report.examples.append(f"removed {_where(rec)} ~ kept {_where(records[j])} (J={score:.2f})")
            continue
        kept_idx.append(i)
        index.insert(i, signatures[i], check_duplication=False)
    return [records[i] for i in kept_idx]


def _first_similar(candidates, shingles, sh, threshold) -> tuple[int, float] | None:
    for j in sorted(candidates):  # the earliest kept record wins, whatever order the index returns
        score = _jaccard(sh, shingles[j])
        if score >= threshold:
            return j, score
    return None
