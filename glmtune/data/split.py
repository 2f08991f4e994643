"""Train/dev/test split, stratified by a label when asked (scikit-learn's train_test_split).

Stratification needs every class in every part. Classes with fewer records than there are parts
cannot be spread, so they go to train whole (a model should at least see them) and are listed in
the warnings; if a later cut is still too small to stratify (fewer rows than classes), that cut
falls back to a seeded random split, also with a warning. Nothing is silently unbalanced.

Records marked ``meta.augmented`` (paraphrases from `glmtune data augment`) go to train only and
the ratios apply to the rest: a paraphrase of a dev/test record would otherwise leak it into training.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from glmtune.errors import InputError

SPLIT_NAMES = ("train", "dev", "test")


def parse_ratios(text: str) -> list[float]:
    """"8:1:1" -> [0.8, 0.1, 0.1]; two or three positive parts (train:dev or train:dev:test)."""
    parts = text.replace("/", ":").replace(",", ":").split(":")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise InputError(f"ratios {text!r} are not numbers", field="ratios", fix="e.g. --ratios 8:1:1") from None
    if len(values) not in (2, 3) or any(v < 0 for v in values) or values[0] <= 0 or sum(values) <= 0:
        raise InputError(f"ratios {text!r} must be 2 or 3 non-negative numbers with train > 0", field="ratios",
                         fix="e.g. --ratios 8:1:1 or 9:1")
    total = sum(values)
    return [v / total for v in values]


@dataclass
class SplitResult:
    parts: dict[str, list[dict]]
    warnings: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {name: len(rows) for name, rows in self.parts.items()}


def label_of(rec: dict, key: str):
    """The stratification key: a top-level field (label) or one in meta."""
    if key in rec:
        return rec[key]
    return (rec.get("meta") or {}).get(key)


def split_records(records: list[dict], ratios: list[float] | str, *, stratify: str | None = None,
                  seed: int = 42) -> SplitResult:
    """Split into train/dev[/test] by ``ratios``; stratified on ``stratify`` when given."""
    if isinstance(ratios, str):
        ratios = parse_ratios(ratios)
    names = SPLIT_NAMES[:len(ratios)]
    augmented = [r for r in records if (r.get("meta") or {}).get("augmented")]
    records = [r for r in records if not (r.get("meta") or {}).get("augmented")]
    if len(records) < len([r for r in ratios if r > 0]):
        raise InputError(f"{len(records)} records cannot fill {len(ratios)} parts", field="records")
    warnings: list[str] = []
    labels = _labels(records, stratify) if stratify else None
    parts = _cut(list(range(len(records))), labels, list(ratios), seed, warnings)
    result = SplitResult({n: [records[i] for i in idx] for n, idx in zip(names, parts)}, warnings)
    if augmented:
        result.parts["train"] += augmented
        warnings.append(f"{len(augmented)} augmented records (meta.augmented) kept in train only")
    return result


def _labels(records: list[dict], key: str) -> list:
    labels = [label_of(r, key) for r in records]
    missing = [i for i, v in enumerate(labels) if v is None]
    if missing:
        meta = records[missing[0]].get("meta") or {}
        raise InputError(f"record has no '{key}' to stratify on", file=meta.get("source"), line=meta.get("line"),
                         field=key, fix="drop --stratify or add the field to every record")
    return [str(v) for v in labels]


def _cut(idx: list[int], labels: list | None, ratios: list[float], seed: int, warnings: list[str]) -> list[list[int]]:
    """Recursively peel off the first part: idx -> [first, *cut(rest)]."""
    if len(ratios) == 1:
        return [idx]
    first_share = ratios[0] / sum(ratios)
    rest_ratios = ratios[1:]
    if sum(rest_ratios) == 0:
        return [idx] + [[] for _ in rest_ratios]
    if first_share == 0:
        return [[]] + _cut(idx, labels, rest_ratios, seed, warnings)
    first, rest = _two_way(idx, labels, first_share, seed, warnings, parts_left=len(ratios))
    return [first] + _cut(rest, labels, rest_ratios, seed, warnings)


def _two_way(idx: list[int], labels: list | None, first_share: float, seed: int, warnings: list[str],
             parts_left: int) -> tuple[list[int], list[int]]:
    from sklearn.model_selection import train_test_split

    n_rest = len(idx) - round(len(idx) * first_share)
    if n_rest <= 0:
        return idx, []
    if labels is None:
        first, rest = train_test_split(idx, test_size=n_rest, random_state=seed, shuffle=True)
        return sorted(first), sorted(rest)
    counts = Counter(labels[i] for i in idx)
    rare = {c for c, n in counts.items() if n < parts_left}
    common = [i for i in idx if labels[i] not in rare]
    n_classes = len(counts) - len(rare)
    if not n_classes <= n_rest <= len(common) - n_classes:
        warnings.append(f"{len(idx)} records in {n_classes + len(rare)} classes are too few to stratify a cut of "
                        f"{len(idx) - n_rest}/{n_rest}; that cut is random")
        first, rest = train_test_split(idx, test_size=n_rest, random_state=seed, shuffle=True)
        return sorted(first), sorted(rest)
    if rare:
        warnings.append(f"{len(rare)} class(es) with fewer than {parts_left} records cannot be in every part; "
                        f"kept whole in the earlier part: {', '.join(sorted(rare)[:10])}")
    forced = [i for i in idx if labels[i] in rare]
    first, rest = train_test_split(common, test_size=n_rest, random_state=seed, shuffle=True,
                                   stratify=[labels[i] for i in common])
    return sorted(first + forced), sorted(rest)
