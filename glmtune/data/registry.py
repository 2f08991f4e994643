"""The dataset registry (``datasets.yaml``): name -> files + format + column mapping + reader options.

```yaml
cmcc_train:
  files: [data/train.csv, data/extra.csv]   # or `file: one.csv`; relative to this YAML's folder
  format: cmcc                              # any --format value; default auto
  columns: {text: review, label: sentiment} # canonical key -> column/key in the file
  options: {label_map: labels.json, system_file: system.txt}
```
Every data command (and `glmtune train`'s data.datasets / data.dev) accepts a registered name wherever
it accepts a path: an existing path wins, otherwise the name is looked up in ``--registry`` or
``./datasets.yaml``. ``SPEC:FORMAT`` (``raw.json:alpaca``) names the format of a path or a name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from glmtune.errors import InputError
from glmtune.io import read_text_utf8

DEFAULT_REGISTRY = "datasets.yaml"
ENTRY_KEYS = {"file", "files", "format", "columns", "options", "description"}
PATH_OPTIONS = ("label_map", "system_file")


@dataclass
class DatasetSource:
    files: list[Path]
    format: str = "auto"
    options: dict[str, Any] = field(default_factory=dict)
    name: str | None = None


def load_registry(path: str | Path) -> dict[str, DatasetSource]:
    """Parse and check a registry file; every error names the registry file, the entry's line and field."""
    path = Path(path)
    text = read_text_utf8(path)
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise InputError(f"invalid YAML ({getattr(e, 'problem', None) or e})", file=path,
                         line=mark.line + 1 if mark else 1) from None
    if root is None:
        raise InputError("registry is empty", file=path, line=1, fix="add `name: {file: ..., format: ...}` entries")
    if not isinstance(root, yaml.MappingNode):
        raise InputError("registry must map dataset names to entries", file=path, line=root.start_mark.line + 1)
    data = yaml.safe_load(text)
    lines = {key.value: key.start_mark.line + 1 for key, _ in root.value}
    return {name: _parse_entry(name, entry, path, lines[str(name)]) for name, entry in data.items()}


def _parse_entry(name: str, entry: Any, registry: Path, line: int) -> DatasetSource:
    where = {"file": registry, "line": line}
    if not isinstance(entry, dict):
        raise InputError(f"entry '{name}' must be a mapping", field=str(name), **where)
    unknown = set(entry) - ENTRY_KEYS
    if unknown:
        raise InputError(f"unknown key(s) {', '.join(sorted(unknown))} in entry '{name}'",
                         field=f"{name}.{sorted(unknown)[0]}", **where, fix=f"use {', '.join(sorted(ENTRY_KEYS))}")
    files = entry.get("files", entry.get("file"))
    if isinstance(files, str):
        files = [files]
    if not files or not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise InputError(f"entry '{name}' needs `file: PATH` or `files: [PATHS]`", field=f"{name}.files", **where)
    base = registry.resolve().parent
    paths = [_relative_to(base, f) for f in files]
    for p in paths:
        if not p.exists():
            raise InputError(f"entry '{name}' lists a missing file {p}", field=f"{name}.files", **where)
    fmt = str(entry.get("format", "auto"))
    from glmtune.data.formats import known_formats
    if fmt not in known_formats():
        raise InputError(f"entry '{name}' has unknown format {fmt!r}", field=f"{name}.format", **where,
                         fix=f"use one of {', '.join(known_formats())}")
    options = _entry_options(name, entry, base, where)
    return DatasetSource(paths, fmt, options, str(name))


def _entry_options(name: str, entry: dict, base: Path, where: dict) -> dict:
    options = entry.get("options") or {}
    columns = entry.get("columns")
    if not isinstance(options, dict):
        raise InputError("`options` must be a mapping", field=f"{name}.options", **where)
    if columns is not None and not isinstance(columns, dict):
        raise InputError("`columns` must map canonical keys to your column names", field=f"{name}.columns", **where)
    options = dict(options)
    for key in PATH_OPTIONS:
        if isinstance(options.get(key), str):
            options[key] = _relative_to(base, options[key])
    if columns:
        options["columns"] = {str(k): str(v) for k, v in columns.items()}
    return options


def _relative_to(base: Path, p: str) -> Path:
    path = Path(p).expanduser()
    return path if path.is_absolute() else base / path


def resolve_source(source: str | Path, registry: str | Path | None = None) -> DatasetSource:
    """An existing path as-is, else a dataset name from the registry (``--registry`` or ./datasets.yaml)."""
    path = Path(source)
    if path.exists():
        return DatasetSource([path])
    reg_path = Path(registry) if registry else Path(DEFAULT_REGISTRY)
    if registry and not reg_path.exists():
        raise InputError("registry file not found", file=reg_path, field="registry", fix="check --registry")
    if _looks_like_path(path):
        raise InputError("file not found", file=path, field="path", fix="check the path")
    if not reg_path.exists():
        raise InputError("file not found (and no datasets.yaml here to look it up as a name)", file=path,
                         field="path", fix="check the path, or register it in datasets.yaml")
    entries = load_registry(reg_path)
    if str(source) not in entries:
        known = ", ".join(sorted(entries)) or "none"
        raise InputError(f"'{source}' is neither a file nor a dataset in the registry (known: {known})",
                         file=reg_path, field=str(source), fix="check the name or add an entry")
    return entries[str(source)]


def split_format(source: str | Path) -> tuple[str | Path, str]:
    """``data.csv:alpaca`` / ``my_set:sharegpt`` -> (source, format); a spec without a known format suffix
    (or an existing path that contains a colon) -> (source, "auto")."""
    text = str(source)
    if Path(text).exists() or ":" not in text:
        return source, "auto"
    head, fmt = text.rsplit(":", 1)
    from glmtune.data.formats import known_formats
    return (head, fmt) if head and fmt in known_formats() else (source, "auto")


def _looks_like_path(path: Path) -> bool:
    """A folder part or a data-file extension: a missing file, not a registry name (`data/train.jsonl`)."""
    from glmtune.data.readers import EXTENSIONS
    return len(path.parts) > 1 or path.suffix.lower() in EXTENSIONS


def load_dataset(source: str | Path, *, registry: str | Path | None = None, format: str = "auto",
                 **options: Any) -> list[dict]:
    """Records of a path or registered name; explicit arguments override the registry entry's."""
    from glmtune.data.readers import read_records

    source, spec_format = split_format(source)
    ds = resolve_source(source, registry)
    fmt = next((f for f in (format, spec_format) if f != "auto"), ds.format)
    merged = {**ds.options, **{k: v for k, v in options.items() if v is not None}}
    records: list[dict] = []
    for f in ds.files:
        records += read_records(f, fmt, **merged)
    return records
