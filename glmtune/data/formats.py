"""The dataset-format registry: a plugin boundary, so a new raw format is one decorated function.

A format turns one raw row (a dict read from CSV/JSON/JSONL, with its line number) into a canonical
record. Detection looks at the row's keys; containers (csv/json/jsonl) are handled by readers.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from glmtune.errors import InputError


@dataclass
class RowContext:
    """Where a row came from plus the reader options, so converters raise errors at file:line."""
    file: Path
    line: int
    options: dict[str, Any] = field(default_factory=dict)

    def error(self, problem: str, *, field: str | None = None, fix: str | None = None) -> InputError:
        return InputError(problem, file=self.file, line=self.line, field=field, fix=fix)

    def require(self, row: dict, key: str, *, kind: type | tuple = str) -> Any:
        """row[key], or an error naming the missing/mistyped field."""
        if key not in row or row[key] is None:
            raise self.error(f"missing field '{key}'", field=key,
                             fix="add it, or map your column name with --text-col/--label-col or the "
                                 "registry's `columns`")
        value = row[key]
        if not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.error(f"expected {names}, got {type(value).__name__}", field=key)
        return value


Converter = Callable[[dict, RowContext], dict]


@dataclass(frozen=True)
class RecordFormat:
    name: str
    convert: Converter
    detect: tuple[frozenset[str], ...]   # the row matches if it has every key of any one set
    container: str | None = None          # "csv" when the format only comes as a table
    description: str = ""
    priority: int = 0                     # detection tries higher priorities first, then registration order

    def matches(self, keys: set[str]) -> bool:
        return any(ks <= keys for ks in self.detect)


FORMATS: dict[str, RecordFormat] = {}
CONTAINERS = ("csv", "json", "jsonl")


def register_format(name: str, *, detect: tuple[tuple[str, ...], ...] = (), container: str | None = None,
                    description: str = "", priority: int = 0) -> Callable[[Converter], Converter]:
    """Register a converter under ``name``; ``detect`` lists key sets that identify the format."""
    def wrap(fn: Converter) -> Converter:
        FORMATS[name] = RecordFormat(name, fn, tuple(frozenset(k) for k in detect), container,
                                     description or (fn.__doc__ or "").strip().splitlines()[0], priority)
        return fn
    return wrap


def get_format(name: str, *, file: str | Path | None = None) -> RecordFormat:
    _load_builtin_formats()
    if name not in FORMATS:
        raise InputError(f"unknown format {name!r}", file=file, field="format",
                         fix=f"use one of auto, {', '.join(CONTAINERS)}, {', '.join(sorted(FORMATS))}")
    return FORMATS[name]


def detect_format(row: dict, *, file: Path, line: int) -> RecordFormat:
    """The first registered format whose keys the row has (higher `priority` first, then registration order)."""
    _load_builtin_formats()
    keys = set(row)
    for fmt in sorted(FORMATS.values(), key=lambda f: -f.priority):
        if fmt.detect and fmt.matches(keys):
            return fmt
    shown = ", ".join(sorted(keys)[:12]) or "none"
    raise InputError(f"cannot tell the record format from its keys ({shown})", file=file, line=line,
                     field="format", fix="pass --format (messages, sharegpt, alpaca, prompt_completion, "
                                         "conversation, csv with --text-col, cmcc)")


def known_formats() -> list[str]:
    _load_builtin_formats()
    return ["auto", *CONTAINERS, *FORMATS]


def _load_builtin_formats() -> None:
    # Imported lazily: the built-in converters register themselves on import.
    from glmtune.data import formats_chat, formats_pref, formats_table  # noqa: F401
