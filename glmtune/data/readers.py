"""Read any supported raw file into validated canonical records.

Two layers: a *container* (csv / json / jsonl) yields raw rows with their line numbers, then a
*record format* from the registry in formats.py converts each row. ``format="auto"`` picks the
container from the extension and the record format from the first row's keys.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Iterator

from glmtune.data.formats import CONTAINERS, RecordFormat, RowContext, detect_format, get_format
from glmtune.data.labels import load_label_map
from glmtune.data.records import validate_record
from glmtune.errors import InputError
from glmtune.io import check_input_file, decode_strict_at, iter_jsonl, loads_strict, read_text_utf8

EXTENSIONS = {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json"}
# Columns a table format cannot do without, checked against the CSV header (line 1) up front.
REQUIRED_COLUMNS = {
    "cmcc": lambda o: [o.get("text_col") or "sentence_sep", "c_numerical"],
    "classification": lambda o: [o.get("text_col") or "text",
                                 *([] if o.get("response_col") else [o.get("label_col") or "label"])],
}
Row = tuple[int, dict]


def read_records(path: str | Path, format: str = "auto", **options: Any) -> list[dict]:
    """Read ``path`` into canonical records, each validated and tagged with meta source/line.

    Options: text_col, label_col, response_col (CSV columns); label_map (path or dict raw -> name);
    system (text) or system_file (path) used when a record has no system prompt; columns (dict
    canonical key -> key in the file, renamed before conversion); turn_joiner (CMCC turns, default
    newline); require_assistant (default True).
    """
    path = Path(path)
    _check_exists(path)
    options = _resolve_options(options)
    container, fmt = _container_and_format(path, format)
    rows = list(_read_rows(path, container, options.get("delimiter")))
    if not rows:
        raise InputError("no records: the file is empty", file=path, line=1,
                         fix="check that you passed the right file")
    rows = [(line, _rename_columns(row, options.get("columns"))) for line, row in rows]
    if fmt is None:
        fmt = _detect(rows[0], path, options)
    if container == "csv":
        if "response" in rows[0][1] and not options.get("response_col"):
            options["response_col"] = "response"  # a `response` column is the answer, not noise
        _check_header(path, rows[0][1], fmt, options)
    return [_convert_row(row, fmt, RowContext(path, line, options)) for line, row in rows]


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise InputError("file not found", file=path, field="path", fix="check the path or the registry entry")
    if path.is_dir():
        raise InputError("expected a file, got a folder", file=path, field="path")
    check_input_file(path)  # a FIFO, socket or device: refused before anything opens it


def _resolve_options(options: dict) -> dict:
    options = {k: v for k, v in options.items() if v is not None}
    if isinstance(options.get("label_map"), (str, Path)):
        options["label_map"] = load_label_map(options["label_map"])
    if options.get("system_file"):
        system = read_text_utf8(options.pop("system_file")).strip()
        options.setdefault("system", system)
    return options


def _container_and_format(path: Path, format: str) -> tuple[str, RecordFormat | None]:
    if format in CONTAINERS:
        # "csv" as a format means a CSV table; its record shape is still detected from the header.
        return format, None
    fmt = None if format == "auto" else get_format(format, file=path)
    container = (fmt.container if fmt else None) or EXTENSIONS.get(path.suffix.lower()) or _sniff(path)
    return container, fmt


def _sniff(path: Path) -> str:
    head = read_text_utf8(path).lstrip()[:1]
    if head == "[":
        return "json"
    if head == "{":
        return "jsonl"
    raise InputError(f"cannot tell the format of a '{path.suffix or 'no extension'}' file", file=path, line=1,
                     field="format", fix="rename it to .csv/.json/.jsonl or pass --format")


def _read_rows(path: Path, container: str, delimiter: str | None) -> Iterator[Row]:
    if container == "csv":
        yield from _csv_rows(path, delimiter or ("\t" if path.suffix.lower() == ".tsv" else ","))
    elif container == "jsonl":
        for line, obj in iter_jsonl(path):
            yield line, _as_object(obj, path, line)
    else:
        yield from _json_rows(path)


def _csv_rows(path: Path, delimiter: str) -> Iterator[Row]:
    """Rows of a CSV table as dicts keyed by the header (line 1), each with the line it ends on.

    A quote that is never closed swallows the rest of the file into one field, which then shows up as
    a row with too few fields at the end; the row that reaches the end of the file is checked for
    that, so the error names the line the quote opens on."""
    text = read_text_utf8(path)
    lines = io.StringIO(text, newline="").readlines()  # the physical lines, as csv counts them
    reader = csv.reader(lines, delimiter=delimiter)
    header, start = None, 1
    try:
        for cells in reader:
            line = reader.line_num
            if line == len(lines) and _unclosed_quote(lines[start - 1:], delimiter):
                raise InputError("a quoted field opens on this line and is never closed", file=path, line=start,
                                 fix='close the quote, or double a quote meant literally ("")')
            start = line + 1
            if header is None:
                header = cells
                dup = next((h for i, h in enumerate(header) if h in header[:i]), None)
                if dup is not None:
                    raise InputError(f"column '{dup}' appears twice in the header", file=path, line=1, field=dup,
                                     fix="rename one of the columns")
                continue
            if not cells:  # a blank line (csv.DictReader skips them too)
                continue
            if len(cells) > len(header):
                raise InputError(f"row has {len(cells)} fields but the header has {len(header)}", file=path,
                                 line=line, fix="quote cells that contain commas")
            if len(cells) < len(header):
                missing = header[len(cells):]
                raise InputError(f"row has fewer fields than the header (missing {', '.join(missing)})",
                                 file=path, line=line, field=missing[0])
            yield line, dict(zip(header, cells))
    except csv.Error as e:
        raise InputError(f"malformed CSV ({e})", file=path, line=reader.line_num) from None


def _unclosed_quote(lines: list[str], delimiter: str) -> bool:
    """Whether the CSV text of ``lines`` ends inside a quoted field. The lenient reader takes such a
    field to the end of the file; strict mode reports it as "unexpected end of data" (its only other
    complaint, a character after a closing quote, is not this problem)."""
    try:
        for _ in csv.reader(lines, delimiter=delimiter, strict=True):
            pass
    except csv.Error as e:
        return "unexpected end of data" in str(e)
    return False


def _json_rows(path: Path) -> Iterator[Row]:
    """Rows of a JSON file holding a list of objects (or one object), with each element's line.

    The syntax is checked by ``json.loads`` first; each element is then decoded again with the strict
    rules (no NaN, duplicate keys, lone surrogates) so a problem names the element's line."""
    text = read_text_utf8(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # a .json file that is really JSONL
            yield from ((ln, _as_object(o, path, ln)) for ln, o in iter_jsonl(path))
            return
        raise InputError(f"invalid JSON ({e.msg} at column {e.colno})", file=path, line=e.lineno) from None
    except RecursionError:
        raise InputError("JSON nested too deeply to read", file=path, line=1) from None
    if isinstance(data, dict):
        yield 1, loads_strict(text, file=path, line=1)
        return
    if not isinstance(data, list):
        raise InputError(f"expected a list of records, got {type(data).__name__}", file=path, line=1)
    for line, obj in _elements(text, path):
        yield line, _as_object(obj, path, line)


def _elements(text: str, path: Path) -> Iterator[tuple[int, Any]]:
    """(line, value) of each top-level list element of a syntactically valid JSON list."""
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        line = text.count("\n", 0, pos) + 1
        obj, pos = decode_strict_at(text, pos, file=path, line=line)
        yield line, obj


def _as_object(obj: Any, path: Path, line: int) -> dict:
    if not isinstance(obj, dict):
        raise InputError(f"expected a JSON object, got {type(obj).__name__}", file=path, line=line)
    return obj


def _rename_columns(row: dict, columns: dict | None) -> dict:
    if not columns:
        return row
    renamed = dict(row)
    for canonical, source in columns.items():
        if source in renamed and canonical != source:
            renamed[canonical] = renamed.pop(source)
    return renamed


def _detect(first: Row, path: Path, options: dict) -> RecordFormat:
    line, row = first
    if options.get("text_col") and options["text_col"] in row:
        # An explicit text column means a classification table, whatever else the header holds.
        if "sentence_sep" in row and "c_numerical" in row:
            return get_format("cmcc")
        return get_format("classification")
    return detect_format(row, file=path, line=line)


def _check_header(path: Path, first_row: dict, fmt: RecordFormat, options: dict) -> None:
    required = REQUIRED_COLUMNS.get(fmt.name, lambda o: [])(options)
    for col in required:
        if col not in first_row:
            raise InputError(f"missing column '{col}' (header has: {', '.join(first_row)})", file=path, line=1,
                             field=col, fix="rename the column or choose another with --text-col/--label-col")


def _convert_row(row: dict, fmt: RecordFormat, ctx: RowContext) -> dict:
    record = fmt.convert(row, ctx)
    meta = dict(record.get("meta") or {})
    if "source" in meta and "origin" not in meta:
        # Re-reading converted data: keep where the row first came from, point errors at this file.
        meta["origin"] = f"{meta['source']}:{meta.get('line')}"
    record["meta"] = {**meta, "source": str(ctx.file), "line": ctx.line}
    validate_record(record, file=ctx.file, line=ctx.line,
                    require_assistant=ctx.options.get("require_assistant", True))
    return record
