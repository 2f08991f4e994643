"""Errors a user can act on: each names where the problem is (file, line, field) and what to do."""
from __future__ import annotations

from pathlib import Path


class GlmtuneError(Exception):
    """Base error. The CLI prints it as one red line and exits with status 2 (no traceback)."""


class InputError(GlmtuneError):
    """A problem in a user's file or config.

    The message reads ``FILE:LINE: field 'F': PROBLEM. Fix: HINT`` so a user can jump to the spot.
    """

    def __init__(self, problem: str, *, file: str | Path | None = None, line: int | None = None,
                 field: str | None = None, fix: str | None = None):
        self.problem, self.file, self.line, self.field, self.fix = problem, file, line, field, fix
        super().__init__(self._format())

    def _format(self) -> str:
        where = ""
        if self.file is not None:
            where = str(self.file)
            if self.line is not None:
                where += f":{self.line}"
            where += ": "
        elif self.line is not None:
            where = f"line {self.line}: "
        field = f"field '{self.field}': " if self.field else ""
        fix = f" Fix: {self.fix}" if self.fix else ""
        return f"{where}{field}{end_sentence(self.problem)}{fix}"


def end_sentence(text: str) -> str:
    """``text`` ending in one period: a problem that already ends in one (often a quoted message) gets
    none added. Only the end is looked at, so a path such as ``../data`` inside is printed as given."""
    return text if text.endswith(".") else f"{text}."


class ConfigError(InputError):
    """A bad key or value in a YAML config or a --set override."""


class DistributedError(GlmtuneError):
    """The processes of a multi-process / multi-node run could not meet or lost each other.

    Not the user's input (exit status ``exit_code``, 1 by default, or the failed worker's own status)."""

    def __init__(self, problem: str, *, fix: str | None = None, exit_code: int = 1):
        self.problem, self.fix, self.exit_code = problem, fix, exit_code
        super().__init__(end_sentence(problem) + (f" Fix: {fix}" if fix else ""))


class ModelNotFoundError(GlmtuneError):
    """A model folder that does not exist or lacks weights/tokenizer. glmtune never downloads."""

    def __init__(self, path: str | Path, missing: str = "the folder"):
        super().__init__(
            f"model not found: {path} ({missing} is missing). glmtune loads models from local folders "
            f"and never downloads. Fix: download it on a machine with internet (e.g. "
            f"`huggingface-cli download THUDM/glm-4-9b-chat --local-dir {path}`), copy it here, "
            f"or import a GGUF file with `glmtune model import-gguf FILE --out DIR`.")
