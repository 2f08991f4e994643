"""The web UI's path guard: every path the page reads or writes resolves inside one workspace folder.

A path typed into the page (relative to the workspace, or absolute) is resolved with symlinks
followed *before* it is used, so `../x`, `/etc/passwd` or a link pointing out of the workspace is
refused with an InputError and never opened. Uploads are copied in under `uploads/`, size-limited.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from glmtune.errors import InputError

# Training files are text; 200 MB holds millions of short conversations and stops a runaway upload.
MAX_UPLOAD_MB = 200
UPLOAD_SUFFIXES = (".csv", ".json", ".jsonl", ".yaml", ".yml", ".txt", ".tsv")
# Files the UI itself writes (logs, plots) live here, out of the user's way.
UI_DIR = ".glmtune-ui"


class Workspace:
    """A folder the UI is confined to. ``resolve`` is the only way a page path becomes a Path."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def resolve(self, path: str | Path, *, field: str = "path", must_exist: bool = False) -> Path:
        """The absolute path of ``path`` (relative paths start at the workspace), or an InputError."""
        text = str(path).strip()
        if not text:
            raise InputError("no path given", field=field, fix="type a path inside the workspace")
        full = Path(os.path.realpath(self.root / Path(text).expanduser()))
        if full != self.root and self.root not in full.parents:
            raise InputError(f"{text} is outside the workspace {self.root}", field=field,
                             fix="use a path inside the workspace (upload the file first)")
        if must_exist and not full.exists():
            raise InputError(f"{text} does not exist in the workspace", field=field,
                             fix="check the name in the workspace file list")
        return full

    def relative(self, path: Path) -> str:
        """How the page shows a workspace path."""
        return str(Path(path).resolve().relative_to(self.root))

    def ui_path(self, *parts: str) -> Path:
        path = self.root.joinpath(UI_DIR, *parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def files(self, suffixes: tuple[str, ...] = UPLOAD_SUFFIXES, limit: int = 200,
              skip: tuple[str, ...] = ()) -> list[str]:
        """Workspace files with these suffixes (relative paths, sorted), without hidden folders (the UI's
        own) and the top-level folders in ``skip``."""
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            top = dirpath == str(self.root)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not (top and d in skip))
            for name in sorted(filenames):
                if name.endswith(suffixes) and not name.startswith("."):
                    found.append(self.relative(Path(dirpath) / name))
                    if len(found) >= limit:
                        return found
        return found

    def save_upload(self, tmp_file: str | Path, *, subdir: str = "uploads", max_mb: float = MAX_UPLOAD_MB,
                    suffixes: tuple[str, ...] = UPLOAD_SUFFIXES) -> Path:
        """Copy a browser upload (gradio's temp file) into ``subdir`` under a safe name; return its path."""
        src = Path(tmp_file)
        name = safe_name(src.name)
        if not name.lower().endswith(suffixes):
            raise InputError(f"{src.name}: unsupported file type", field="upload",
                             fix=f"upload one of: {', '.join(suffixes)}")
        size_mb = src.stat().st_size / 2**20
        if size_mb > max_mb:
            raise InputError(f"{src.name} is {size_mb:.1f} MB, over the {max_mb:g} MB upload limit", field="upload",
                             fix="split the file, or copy it into the workspace folder directly")
        dest = self.resolve(Path(subdir) / name, field="upload")
        dest.parent.mkdir(parents=True, exist_ok=True)
        from glmtune.io import atomic_path
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
        return dest


def safe_name(name: str) -> str:
    """A file name without folders or odd characters (a browser may send any name)."""
    base = Path(name.replace("\\", "/")).name
    cleaned = re.sub(r"[^\w.\-]+", "_", base).lstrip(".")
    return cleaned or "upload"
