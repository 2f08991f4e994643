"""Label maps for CSV classification data: raw label value -> the name the assistant answers with."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from glmtune.errors import InputError
from glmtune.io import read_text_utf8


def load_label_map(path: str | Path) -> dict[str, str]:
    """Read a label map; keys are raw label values as strings (CSV cells are strings).

    Accepted: JSON/YAML object ``{raw: name}``; JSON/YAML list ``[name0, name1, ...]`` (index = id);
    a .txt file with one name per line (line number - 1 = id). Names map to themselves too, so a
    CSV may hold either the id or the name.
    """
    path = Path(path)
    text = read_text_utf8(path)
    if path.suffix.lower() == ".txt":
        data: object = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        try:
            data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        except json.JSONDecodeError as e:
            raise InputError(f"invalid JSON ({e.msg})", file=path, line=e.lineno) from None
        except yaml.YAMLError as e:
            line = e.problem_mark.line + 1 if getattr(e, "problem_mark", None) else None
            raise InputError(f"invalid YAML ({getattr(e, 'problem', e)})", file=path, line=line) from None
    if isinstance(data, list):
        mapping = {str(i): str(name) for i, name in enumerate(data)}
    elif isinstance(data, dict):
        mapping = {str(k): str(v) for k, v in data.items()}
    else:
        raise InputError("a label map must be an object {raw: name} or a list of names", file=path, line=1)
    if not mapping:
        raise InputError("label map is empty", file=path, line=1)
    for name in list(mapping.values()):
        mapping.setdefault(name, name)
    return mapping
