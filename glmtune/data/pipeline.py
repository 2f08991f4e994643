"""One function per `glmtune data` command: read (path or registered name), transform, write atomically.

The CLI only parses arguments and calls these, so the demo and tests run the same code paths.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from glmtune.data.clean import RULES, DEFAULT_SELF_INTRO, CleanReport, clean_records
from glmtune.data.dedupe import DedupeReport, dedupe_records
from glmtune.data.registry import load_dataset
from glmtune.data.split import SplitResult, split_records
from glmtune.errors import InputError
from glmtune.io import atomic_path, write_jsonl_atomic, write_jsonl_lines


def _check_out(out: Path, sources: Sequence[Any]) -> None:
    for src in sources:
        if Path(str(src)).exists() and Path(str(src)).resolve() == Path(out).resolve():
            raise InputError("output would overwrite the input", file=out, field="out",
                             fix="write to a new file")


@dataclass
class ConvertSummary:
    out: Path
    records: int
    labels: int  # records that carry a label


def convert_file(source: str | Path, out: str | Path, *, format: str = "auto", registry: str | Path | None = None,
                 **options: Any) -> ConvertSummary:
    """Raw file (or registered name) -> canonical JSONL at ``out``."""
    out = Path(out)
    _check_out(out, [source])
    records = load_dataset(source, registry=registry, format=format, **options)
    write_jsonl_atomic(out, records)
    return ConvertSummary(out, len(records), sum("label" in r for r in records))


def clean_file(source: str | Path, out: str | Path, *, rules: Sequence[str] = RULES,
               self_intro: str = DEFAULT_SELF_INTRO, registry: str | Path | None = None,
               format: str = "auto") -> CleanReport:
    out = Path(out)
    _check_out(out, [source])
    records = load_dataset(source, registry=registry, format=format)
    kept, report = clean_records(records, rules=tuple(rules), self_intro=self_intro)
    write_jsonl_atomic(out, kept)
    return report


def dedupe_file(source: str | Path, out: str | Path, *, near: bool = True, threshold: float = 0.9,
                ngram: int = 3, registry: str | Path | None = None, format: str = "auto") -> DedupeReport:
    out = Path(out)
    _check_out(out, [source])
    records = load_dataset(source, registry=registry, format=format)
    kept, report = dedupe_records(records, near=near, threshold=threshold, ngram=ngram)
    write_jsonl_atomic(out, kept)
    return report


@dataclass
class MergeSummary:
    out: Path
    per_source: dict[str, int] = field(default_factory=dict)
    duplicates_removed: int = 0
    records: int = 0


def merge_files(sources: Sequence[str | Path], out: str | Path, *, dedupe: bool = False,
                registry: str | Path | None = None) -> MergeSummary:
    """Concatenate several files/registered names (any formats) into one JSONL; optional exact dedupe."""
    if len(sources) < 2:
        raise InputError("merge needs at least two inputs", field="inputs", fix="glmtune data merge A B --out C")
    out = Path(out)
    _check_out(out, sources)
    summary = MergeSummary(out)
    records: list[dict] = []
    for src in sources:
        part = load_dataset(src, registry=registry)
        summary.per_source[str(src)] = len(part)
        records += part
    if dedupe:
        records, report = dedupe_records(records, near=False)
        summary.duplicates_removed = report.exact
    summary.records = write_jsonl_atomic(out, records)
    return summary


def split_file(source: str | Path, out_dir: str | Path, *, ratios: str | list[float] = "8:1:1",
               stratify: str | None = None, seed: int = 42, registry: str | Path | None = None,
               format: str = "auto") -> tuple[SplitResult, dict[str, Path]]:
    """Write train/dev[/test].jsonl into ``out_dir``; all parts appear together or none does."""
    records = load_dataset(source, registry=registry, format=format)
    result = split_records(records, ratios, stratify=stratify, seed=seed)
    paths = {name: Path(out_dir) / f"{name}.jsonl" for name in result.parts}
    with contextlib.ExitStack() as stack:
        for name, rows in result.parts.items():
            tmp = stack.enter_context(atomic_path(paths[name]))
            with open(tmp, "w", encoding="utf-8") as f:
                write_jsonl_lines(f, rows, file=paths[name])
    return result, paths


def stats_file(source: str | Path, *, template: str | None = None, tokenizer: str | Path | None = None,
               cutoff: int | None = None, train_on: str = "all_assistant", registry: str | Path | None = None,
               format: str = "auto", on_overflow: str = "truncate", truncate_side: str = "left"):
    """DataStats of a file; token lengths when both a template and a tokenizer folder are given."""
    from glmtune.data.stats import compute_stats

    if (template is None) != (tokenizer is None):
        raise InputError("token lengths need both --template and --tokenizer", field="tokenizer"
                         if tokenizer is None else "template")
    records = load_dataset(source, registry=registry, format=format)
    tpl, tok = _template_and_tokenizer(template, tokenizer) if template else (None, None)
    return compute_stats(records, template=tpl, tokenizer=tok, cutoff=cutoff, train_on=train_on,
                         on_overflow=on_overflow, truncate_side=truncate_side)


def render_file(source: str | Path, *, template: str, tokenizer: str | Path | None = None, index: int = 0,
                add_generation_prompt: bool = False, train_on: str = "all_assistant",
                registry: str | Path | None = None, format: str = "auto", enable_thinking: bool | None = None):
    """RenderView of record ``index`` (0-based; negative counts from the end). Without a tokenizer only the
    text is rendered (no ids). ``enable_thinking``: the GLM-4.5+ templates' option (None: the default)."""
    from glmtune.data.render import RenderView, render_record, prompt_messages

    records = load_dataset(source, registry=registry, format=format,
                           require_assistant=not add_generation_prompt)
    if not -len(records) <= index < len(records):
        raise InputError(f"index {index} is out of range ({len(records)} records)", file=source, field="index",
                         fix=f"use 0..{len(records) - 1}")
    options = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    rec = records[index]
    if tokenizer is None:
        from glmtune.templates import get_template

        tpl = get_template(template).variant(**options)
        msgs = prompt_messages(rec["messages"]) if add_generation_prompt else rec["messages"]
        return RenderView(tpl.render(msgs, tools=rec.get("tools"), add_generation_prompt=add_generation_prompt), [], [])
    tpl, tok = _template_and_tokenizer(template, tokenizer)
    return render_record(rec, tpl.variant(**options), tok, add_generation_prompt=add_generation_prompt,
                         train_on=train_on)


def _template_and_tokenizer(template: str, tokenizer: str | Path):
    from glmtune.models.folder import read_model_folder
    from glmtune.models.tokenizer import load_tokenizer
    from glmtune.templates import get_template

    # The tokenizer argument is a model folder: its own details (a default system prompt) are kept.
    return get_template(**read_model_folder(tokenizer).template_args(template)), load_tokenizer(tokenizer)
