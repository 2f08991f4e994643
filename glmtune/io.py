"""File helpers shared by every stage: atomic writes (nothing half-written is ever left behind)
and JSONL reading with file:line error positions.

JSONL follows JSON's own line rules: a record ends at ``\n`` only. ``str.splitlines`` would also
split at U+2028/U+2029/U+0085 (legal raw inside JSON strings), so readers split on ``\n`` and writers
escape those three characters, which keeps the output readable by line-splitting tools too.
NaN/Infinity (not JSON) and numbers that overflow a float (1e400 reads as infinity), duplicate keys
(JSON leaves them undefined) and lone surrogates (not characters; no tokenizer takes them) are refused
with the file and line. Inputs that are not regular files (a FIFO would block) are refused unopened.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from glmtune.errors import InputError


def cache_dir(kind: str) -> Path:
    """``$GLMTUNE_CACHE_DIR/KIND`` (default ``~/.cache/glmtune/KIND``): converted tokenizers, imported models."""
    return Path(os.environ.get("GLMTUNE_CACHE_DIR", Path.home() / ".cache" / "glmtune")) / kind


def writable_target(path: str | Path) -> Path:
    """The regular file that writing ``path`` should replace: a symlink is followed to its target
    (written through, as shells do); a folder, device, FIFO or socket is refused."""
    path = Path(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return target
    except OSError as e:
        raise _write_error(e, path) from None
    require_regular(mode, path, "the output path is a folder", "the output path is a {kind}, not a regular file",
                    folder_fix="name a file inside it, e.g. DIR/out.jsonl",
                    fix="write to a regular file (glmtune replaces outputs atomically)")
    return target


def _write_error(e: OSError, path: Path) -> InputError:
    """An OSError while writing ``path`` as one line a user can act on."""
    if e.errno == errno.ENOSPC:
        return InputError("disk full while writing (nothing was replaced)", file=path, fix="free space and rerun")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return InputError(f"cannot write here ({e.strerror})", file=path,
                          fix="choose a folder you can write to, or fix its permissions")
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        return InputError("a parent of the output path is a file, not a folder", file=path,
                          fix="choose another output path")
    return InputError(f"cannot write ({e.strerror or e})", file=path)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to ``path``; rename it over ``path`` only if the block succeeds.

    The temp file lives in the same folder so the final ``os.replace`` is atomic on POSIX. A symlink
    is written through to its target; folders, devices and FIFOs are refused (see writable_target).
    OS errors (disk full, permissions) become one-line InputErrors; the old file stays as it was.
    """
    path = writable_target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_error(e, path) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_file():
            # mkstemp creates 0600 files; give the result the usual permissions (umask applies)
            umask = os.umask(0); os.umask(umask)
            os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        raise _write_error(e, path) from None
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


def check_output_dir(path: str | Path, overwrite: bool) -> None:
    """Refuse, before anything is written, an output folder that is a file, or one that holds files
    unless ``overwrite`` (``atomic_dir`` then replaces it whole)."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise InputError("exists and is not a folder", file=path, fix="choose another --out")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise InputError("output folder is not empty", file=path,
                         fix="choose another --out, delete it, or pass --overwrite")


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


# Characters legal raw inside a JSON string that line-based readers (Python's splitlines, JS) treat
# as line ends: written as \\uXXXX escapes.
_LINE_UNSAFE = re.compile("[\u2028\u2029\u0085]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def jsonl_line(obj: Any, *, file: str | Path | None = None, line: int | None = None) -> str:
    """One JSONL line (with its ``\\n``): UTF-8 text, line-unsafe characters escaped, NaN refused."""
    try:
        text = json.dumps(obj, ensure_ascii=False, allow_nan=False)
    except ValueError as e:  # NaN / Infinity: not JSON, other readers reject them
        raise InputError(f"cannot write a non-finite number as JSON ({e})", file=file, line=line,
                         fix="replace NaN/Infinity with null or a number") from None
    if _SURROGATE.search(text):  # what the readers refuse is never written
        raise InputError("a string holds a lone surrogate (half of a UTF-16 pair, not a character)",
                         file=file, line=line, fix="drop or fix that character in the input") from None
    return _LINE_UNSAFE.sub(lambda m: f"\\u{ord(m.group(0)):04x}", text) + "\n"


def write_jsonl_lines(f, rows: Iterable[dict], *, file: str | Path | None = None) -> int:
    """Write rows to an open text file as JSONL lines; return how many."""
    n = 0
    for n, row in enumerate(rows, start=1):
        f.write(jsonl_line(row, file=file, line=n))
    return n


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict]) -> int:
    """Write rows as JSONL atomically; return how many were written."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        return write_jsonl_lines(f, rows, file=path)


def read_append_log(path: str | Path) -> list[tuple[int, Any]]:
    """(line, row) of a JSONL file that is appended to as work is done (predictions), after cutting
    off a last line half-written by a kill (the only line that can be). Missing file -> []."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    keep = raw.rfind(b"\n") + 1
    if keep != len(raw):
        with open(path, "r+b") as f:
            f.truncate(keep)
    text = raw[:keep].decode("utf-8")
    return [(n, loads_strict(line, file=path, line=n))
            for n, line in enumerate(text.split("\n"), start=1) if line.strip()]


def append_jsonl_synced(f, rows: Iterable[dict], *, file: str | Path | None = None) -> None:
    """Append rows to an open append-log and fsync: a kill loses at most the rows in flight."""
    f.write("".join(jsonl_line(r, file=file) for r in rows))
    f.flush()
    os.fsync(f.fileno())


def check_input_file(path: str | Path) -> Path:
    """``path`` if it is a regular file (or a symlink to one), else an InputError, decided by ``stat``
    before anything opens it: opening a FIFO blocks until a writer comes, so a FIFO with none would
    hang the command silently; a folder, socket or device is no input file either."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InputError("file not found", file=path, fix="check the path") from None
    except OSError as e:
        raise InputError(f"cannot read ({e.strerror or e})", file=path, fix="check the path and its permissions") from None
    require_regular(mode, path, "expected a file, got a folder", "the input is a {kind}, not a regular file",
                    folder_fix="name a file inside it", fix="write the data to a regular file and pass that")
    return path


def read_text_utf8(path: str | Path) -> str:
    """Read a text file as UTF-8 (BOM allowed), with a clear error for other encodings."""
    path = check_input_file(path)
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})",
                         file=path, line=line,
                         fix="re-save the file as UTF-8 (e.g. `iconv -f GBK -t UTF-8 IN > OUT`)") from None


class _NonFinite(ValueError):
    """NaN / Infinity, or a number too large for a float (1e400 overflows to inf): nothing downstream
    can use it, and JSON writers refuse it, so a reader names the input line instead."""


def _reject_constant(name: str):
    raise _NonFinite(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NonFinite(f"the number {text[:40]} is out of range: it reads as infinity")
    return value


def _non_finite_field(obj: Any, path: str = "") -> str | None:
    """Where the first non-finite float in ``obj`` is, as a field path (``label``, ``messages[0].score``)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return path or "(the value)"
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        found = _non_finite_field(v, f"{path}[{k}]" if isinstance(k, int) else f"{path}.{k}" if path else str(k))
        if found:
            return found
    return None


def _non_finite_field_at(text: str, start: int) -> str | None:
    """The field of the first non-finite number in the JSON value at ``text[start]``, decoded again
    leniently (only on this error path); None when the rest of the value is not valid JSON either."""
    try:
        return _non_finite_field(json.JSONDecoder().raw_decode(text, start)[0])
    except (ValueError, RecursionError):
        return None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {dup!r}")
    return obj


_STRICT = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_constant=_reject_constant,
                           parse_float=_finite_float)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_WS = re.compile(r"[ \t\r\n]*")


def _lone_surrogate(obj: Any) -> str | None:
    """The first string in ``obj`` holding a surrogate that did not pair up, else None."""
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            if _SURROGATE.search(x):
                return x
        elif isinstance(x, dict):
            stack += list(x.keys()) + list(x.values())
        elif isinstance(x, list):
            stack += x
    return None


def loads_strict(text: str, *, file: str | Path | None = None, line: int | None = None) -> Any:
    """``json.loads`` that refuses NaN/Infinity, duplicate keys, lone surrogates and absurd nesting,
    each as an InputError naming file:line (line = the line ``text`` starts on)."""
    obj, end = decode_strict_at(text, 0, file=file, line=line)
    if text[end:].strip():
        raise InputError(f"invalid JSON (Extra data at column {end + 1})", file=file, line=line,
                         fix="each line must be one complete JSON object")
    return obj


def decode_strict_at(text: str, pos: int, *, file: str | Path | None = None,
                     line: int | None = None) -> tuple[Any, int]:
    """Decode one JSON value starting at ``text[pos]`` (whitespace allowed) with the strict rules of
    loads_strict; return (value, end offset)."""
    start = _WS.match(text, pos).end()
    try:
        obj, end = _STRICT.raw_decode(text, start)
    except json.JSONDecodeError as e:
        at = (line or 1) + text.count("\n", start, e.pos)
        raise InputError(f"invalid JSON ({e.msg} at column {e.colno})", file=file, line=at,
                         fix="each line must be one complete JSON object") from None
    except _NonFinite as e:
        raise InputError(str(e), file=file, line=line, field=_non_finite_field_at(text, start),
                         fix="write null or a finite number instead") from None
    except ValueError as e:  # from the hooks: duplicate key
        raise InputError(f"invalid JSON ({e})", file=file, line=line,
                         fix="keep one value per key") from None
    except RecursionError:
        raise InputError("JSON nested too deeply to read", file=file, line=line,
                         fix="records are flat objects: messages, label, meta") from None
    if _SURROGATE_ESCAPE.search(text, start, end) and (bad := _lone_surrogate(obj)) is not None:
        raise InputError(f"lone surrogate escape in {bad[:40]!r} (half of a UTF-16 pair, not a character)",
                         file=file, line=line, fix="fix the escape or drop the character") from None
    return obj, end


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield (line_number, parsed_object) for each non-blank line; bad JSON names file and line.

    Lines end at ``\\n`` only (JSON's rule; ``\\r\\n`` is fine), never at U+2028/U+2029/U+0085."""
    text = read_text_utf8(path)
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        yield lineno, loads_strict(line, file=path, line=lineno)


def require_regular(mode: int, path: Path, folder_problem: str, special_problem: str, *, folder_fix: str,
                    fix: str) -> None:
    """An InputError unless ``mode`` (a stat st_mode) is a regular file's; ``special_problem`` names
    the kind (``{kind}``: FIFO, socket or device)."""
    if stat.S_ISDIR(mode):
        raise InputError(folder_problem, file=path, fix=folder_fix)
    if not stat.S_ISREG(mode):
        kind = "FIFO (named pipe)" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device"
        raise InputError(special_problem.format(kind=kind), file=path, fix=fix)
