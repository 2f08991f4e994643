"""File helpers shared by every stage: atomic writes (nothing half-written is ever left behind)
and JSONL reading with file:line error positions."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from glmtune.errors import InputError


def cache_dir(kind: str) -> Path:
    """``$GLMTUNE_CACHE_DIR/KIND`` (default ``~/.cache/glmtune/KIND``): converted tokenizers, imported models."""
    return Path(os.environ.get("GLMTUNE_CACHE_DIR", Path.home() / ".cache" / "glmtune")) / kind


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to ``path``; rename it over ``path`` only if the block succeeds.

    The temp file lives in the same folder so the final ``os.replace`` is atomic on POSIX.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_file():
            # mkstemp creates 0600 files; give the result the usual permissions (umask applies)
            umask = os.umask(0); os.umask(umask)
            os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp folder next to ``path``; it replaces ``path`` (an old folder there is removed)
    only if the block succeeds, so an interrupted writer never leaves a half-written folder."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        # mkdtemp/mkstemp create owner-only entries; give the folder the usual umask modes
        umask = os.umask(0); os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        for p in tmp.iterdir():
            p.chmod(0o666 & ~umask)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict]) -> int:
    """Write rows as JSONL atomically; return how many were written."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_text_utf8(path: str | Path) -> str:
    """Read a text file as UTF-8 (BOM allowed), with a clear error for other encodings."""
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", file=path, fix="check the path")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})",
                         file=path, line=line,
                         fix="re-save the file as UTF-8 (e.g. `iconv -f GBK -t UTF-8 IN > OUT`)") from None


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield (line_number, parsed_object) for each non-blank line; bad JSON names file and line."""
    text = read_text_utf8(path)
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"invalid JSON ({e.msg} at column {e.colno})", file=path, line=lineno,
                             fix="each line must be one complete JSON object") from None
