"""`glmtune data ...`: convert, clean, dedupe, merge, split, stats, render.

Every IN accepts a file or a dataset name registered in ./datasets.yaml (or --registry).
Summaries go to stderr so that stdout carries only data (render --plain / --ids).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from glmtune.cli.main import app

data_app = typer.Typer(no_args_is_help=True, help="Prepare data: convert raw files to chat records, clean, "
                                                   "dedupe, merge, split, inspect.")
app.add_typer(data_app, name="data")
console = Console(stderr=True)

FORMAT_HELP = ("auto | csv | jsonl | json | alpaca | sharegpt | messages | prompt_completion | conversation | "
               "roleplay | classification | cmcc")
IN_HELP = "Input file, or a dataset name from the registry."
REGISTRY_OPT = typer.Option(None, "--registry", help="datasets.yaml to look names up in (default ./datasets.yaml).")


def _table(title: str, rows: dict) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows.items():
        table.add_row(str(key), str(value))
    return table


@data_app.command("convert")
def convert_cmd(
    source: str = typer.Argument(..., metavar="IN", help=IN_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Canonical JSONL to write."),
    format: str = typer.Option("auto", "--format", "-f", help=FORMAT_HELP),
    text_col: Optional[str] = typer.Option(None, help="CSV column holding the user text."),
    label_col: Optional[str] = typer.Option(None, help="CSV column holding the label."),
    response_col: Optional[str] = typer.Option(None, help="CSV column holding the assistant's answer "
                                                          "(default: a `response` column if there is one, "
                                                          "else the label name)."),
    label_map: Optional[Path] = typer.Option(None, help="Label map: JSON/YAML {raw: name}, a list, or a .txt."),
    system_file: Optional[Path] = typer.Option(None, help="System prompt for records that have none."),
    registry: Optional[Path] = REGISTRY_OPT,
) -> None:
    """Convert a raw file (CSV, alpaca, sharegpt, messages, CMCC-34, ...) to canonical JSONL records."""
    from glmtune.data.pipeline import convert_file

    with console.status(f"reading {source}"):
        s = convert_file(source, out, format=format, registry=registry, text_col=text_col, label_col=label_col,
                         response_col=response_col, label_map=label_map, system_file=system_file)
    console.print(_table(f"converted {source}", {"records": s.records, "with label": s.labels, "written": s.out}))


@data_app.command("clean")
def clean_cmd(
    source: str = typer.Argument(..., metavar="IN", help=IN_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Cleaned JSONL to write."),
    rules: str = typer.Option("control,emoji,self_intro,whitespace", help="Comma-separated rules to apply."),
    self_intro: Optional[str] = typer.Option(None, help="Regex removed from the start of assistant turns "
                                                        "(default: 你好/您好，我是…)."),
    registry: Optional[Path] = REGISTRY_OPT,
) -> None:
    """Strip emoji, control characters, self-introductions; normalise whitespace; report each rule."""
    from glmtune.data.clean import DEFAULT_SELF_INTRO
    from glmtune.data.pipeline import clean_file

    rule_list = tuple(r.strip() for r in rules.split(",") if r.strip())
    with console.status(f"cleaning {source}"):
        report = clean_file(source, out, rules=rule_list, self_intro=self_intro or DEFAULT_SELF_INTRO,
                            registry=registry)
    table = Table(title=f"cleaned {source} -> {out}", title_justify="left")
    for col in ("rule", "messages changed", "chars removed"):
        table.add_column(col)
    for rule, count in report.rules.items():
        table.add_row(rule, str(count.messages), str(count.chars_removed))
    console.print(table)
    console.print(f"records: {report.records_in} in, {report.records_changed} changed, "
                  f"{len(report.dropped)} dropped (empty after cleaning), {report.records_out} written")
    for why in report.dropped[:5]:
        console.print(f"  [yellow]dropped[/] {why}", highlight=False)


@data_app.command("dedupe")
def dedupe_cmd(
    source: str = typer.Argument(..., metavar="IN", help=IN_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Deduplicated JSONL to write."),
    near: bool = typer.Option(True, help="Also drop near duplicates (character n-gram Jaccard)."),
    threshold: float = typer.Option(0.9, help="Jaccard similarity at or above which two records are duplicates."),
    ngram: int = typer.Option(3, help="Character n-gram size for near-duplicate shingles."),
    registry: Optional[Path] = REGISTRY_OPT,
) -> None:
    """Remove exact and near-duplicate records (the first occurrence is kept)."""
    from glmtune.data.pipeline import dedupe_file

    with console.status(f"deduplicating {source}"):
        report = dedupe_file(source, out, near=near, threshold=threshold, ngram=ngram, registry=registry)
    console.print(_table(f"deduplicated {source}", {"records in": report.records_in, "exact duplicates": report.exact,
                                                     "near duplicates": report.near, "written": report.records_out}))
    for ex in report.examples[:5]:
        console.print(f"  {ex}", highlight=False)


@data_app.command("merge")
def merge_cmd(
    sources: List[str] = typer.Argument(..., metavar="IN...", help="Two or more files or registered names."),
    out: Path = typer.Option(..., "--out", "-o", help="Merged JSONL to write."),
    dedupe: bool = typer.Option(False, help="Drop exact duplicates across the inputs."),
    registry: Optional[Path] = REGISTRY_OPT,
) -> None:
    """Concatenate several inputs (any formats) into one canonical JSONL."""
    from glmtune.data.pipeline import merge_files

    s = merge_files(sources, out, dedupe=dedupe, registry=registry)
    console.print(_table(f"merged into {s.out}", {**s.per_source, "duplicates removed": s.duplicates_removed,
                                                  "written": s.records}))


@data_app.command("split")
def split_cmd(
    source: str = typer.Argument(..., metavar="IN", help=IN_HELP),
    out_dir: Path = typer.Option(..., "--out-dir", help="Folder for train.jsonl, dev.jsonl[, test.jsonl]."),
    ratios: str = typer.Option("8:1:1", help="train:dev[:test] proportions."),
    stratify: Optional[str] = typer.Option(None, help="Field to stratify on (e.g. label)."),
    seed: int = typer.Option(42, help="Random seed; the same seed gives the same split."),
    registry: Optional[Path] = REGISTRY_OPT,
) -> None:
    """Split into train/dev/test, optionally stratified by a label."""
    from glmtune.data.pipeline import split_file

    result, paths = split_file(source, out_dir, ratios=ratios, stratify=stratify, seed=seed, registry=registry)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    console.print(_table(f"split {source}", {f"{n} ({paths[n]})": c for n, c in result.counts().items()}))


@data_app.command("stats")
def stats_cmd(
    source: str = typer.Argument(..., metavar="IN", help=IN_HELP),
    template: Optional[str] = typer.Option(None, help="Template for token lengths (glm4, chatglm3, qwen, ...)."),
    tokenizer: Optional[Path] = typer.Option(None, help="Tokenizer (or model) folder for token lengths."),
    cutoff: Optional[int] = typer.Option(None, help="Count records longer than this many tokens and report what "
                                                    "training at data.cutoff_len=CUTOFF does with them."),
    train_on: str = typer.Option("all_assistant", help="all_assistant | last_assistant | everything."),
    on_overflow: str = typer.Option("truncate", help="As data.on_overflow: truncate | drop | error."),
    truncate_side: str = typer.Option("left", help="As data.truncate_side: left | right (dialogue text cut first)."),
    as_json: bool = typer.Option(False, "--json", help="Print the statistics as JSON on stdout."),
    registry: Optional[Path] = REGISTRY_OPT,
) -> None:
    """Counts, label distribution and token-length percentiles under a template and tokenizer."""
    from glmtune.data.pipeline import stats_file

    with console.status(f"measuring {source}"):
        stats = stats_file(source, template=template, tokenizer=tokenizer, cutoff=cutoff, train_on=train_on,
                           registry=registry, on_overflow=on_overflow, truncate_side=truncate_side)
    if as_json:
        sys.stdout.write(json.dumps(stats.as_dict(), ensure_ascii=False) + "\n")
        return
    console.print(_stats_table(source, stats))
    if stats.labels:
        labels = Table(title=f"labels ({len(stats.labels)})", title_justify="left")
        labels.add_column("label")
        labels.add_column("records", justify="right")
        for label, n in stats.labels.items():
            labels.add_row(label, str(n))
        console.print(labels)


def _stats_table(source: str, s) -> Table:
    rows = {"records": s.records, "messages": s.messages,
            "roles": ", ".join(f"{k} {v}" for k, v in s.roles.items()),
            "with system / tools": f"{s.with_system} / {s.with_tools}",
            "assistant turns p50/max": f"{s.turns.p50} / {s.turns.max}",
            "characters p50/p90/p99/max": f"{s.chars.p50} / {s.chars.p90} / {s.chars.p99} / {s.chars.max}"}
    if s.tokens is not None:
        rows[f"tokens ({s.template}) p50/p90/p99/max"] = (f"{s.tokens.p50} / {s.tokens.p90} / {s.tokens.p99} / "
                                                           f"{s.tokens.max}")
        rows["trained tokens"] = s.trained_tokens
        if s.reasoning_tokens or s.reasoning_dropped:
            rows["reasoning tokens / turns left out"] = f"{s.reasoning_tokens} / {s.reasoning_dropped}"
        if s.cutoff:
            style = "red" if s.over_cutoff else "green"
            rows[f"over cutoff {s.cutoff}"] = f"[{style}]{s.over_cutoff}[/]"
        if s.cutoff_error:
            from rich.markup import escape
            rows[f"training at cutoff {s.cutoff}"] = f"[red]stops: {escape(s.cutoff_error)}[/]"
        if s.after_cutoff is not None:
            c = s.after_cutoff
            rows[f"training at cutoff {s.cutoff}"] = (
                f"{c['encoded']} trained ({c['truncated']} truncated), {c['dropped']} dropped "
                f"({c['answer_too_long']} answer alone too long), {c['no_loss']} without trained tokens")
            rows["trained tokens after cutoff"] = s.trained_tokens_after_cutoff
    return _table(f"stats of {source}", rows)


@data_app.command("render")
def render_cmd(
    source: str = typer.Argument(..., metavar="FILE", help=IN_HELP),
    template: str = typer.Option(..., help="Template family: glm4, glmz1, glm45, glm47, chatglm3, chatglm2, qwen, llama3."),
    tokenizer: Optional[Path] = typer.Option(None, help="Tokenizer (or model) folder (needed except with --plain)."),
    index: int = typer.Option(0, help="Which record (0-based; -1 = last)."),
    plain: bool = typer.Option(False, "--plain", help="Print the exact rendered text only (no trailing newline)."),
    ids: bool = typer.Option(False, "--ids", help="Print the token ids as a JSON list (training ids, incl. the "
                                                 "final end token; prompt ids with --add-generation-prompt)."),
    add_generation_prompt: bool = typer.Option(False, "--add-generation-prompt",
                                               help="Render the prompt for the last assistant turn, as inference does."),
    no_thinking: bool = typer.Option(False, "--no-thinking", help="GLM-4.5+ (glm45, glm47): render as with "
                                     "enable_thinking=false (glm45: /nothink and an empty think block)."),
    train_on: str = typer.Option("all_assistant", help="all_assistant | last_assistant | everything."),
    registry: Optional[Path] = REGISTRY_OPT,
) -> None:
    """Show exactly what the model sees; trained tokens in green (or [[...]] without colour)."""
    from glmtune.data.pipeline import render_file
    from glmtune.data.render import bracketed
    from glmtune.errors import InputError

    if tokenizer is None and not plain:
        raise InputError("token ids and trained tokens need the model's tokenizer", field="--tokenizer",
                         fix="pass --tokenizer MODEL_OR_TOKENIZER_DIR, or --plain for the text alone")
    view = render_file(source, template=template, tokenizer=tokenizer, index=index,
                       add_generation_prompt=add_generation_prompt, train_on=train_on, registry=registry,
                       enable_thinking=False if no_thinking else None)
    if plain:
        sys.stdout.write(view.text)
    elif ids:
        sys.stdout.write(json.dumps(view.ids) + "\n")
    else:
        _print_marked(view.spans, bracketed)
        trained = sum(1 for _, t in view.spans if t)
        console.print(f"[dim]{len(view.ids)} tokens, {trained} trained stretch(es); "
                      f"trained text {'in green' if _colour(Console()) else 'inside [[...]]'}[/]")


def _colour(out: Console) -> bool:
    return out.color_system is not None and not out.no_color


def _print_marked(spans, bracketed) -> None:
    out = Console(highlight=False, soft_wrap=True)
    if not _colour(out):
        sys.stdout.write(bracketed(spans) + "\n")
        return
    text = Text()
    for chunk, trained in spans:
        text.append(chunk, style="bold green" if trained else None)
    out.print(text)


# ---------------------------------------------------------------- data you do not have yet: crawl, synthesize, augment

LLM_HELP = ("OpenAI-compatible base URL (http://127.0.0.1:8000/v1; key from $GLMTUNE_LLM_API_KEY or $OPENAI_API_KEY) "
            "or a local model folder.")


@data_app.command("crawl")
def crawl_cmd(
    url: str = typer.Argument(..., help="Start URL."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for one .txt per page and manifest.jsonl."),
    depth: int = typer.Option(1, help="Link levels to follow from the start page (0 = only that page)."),
    max_pages: int = typer.Option(100, help="Stop after this many saved pages (earlier runs count)."),
    delay: float = typer.Option(1.0, help="Seconds between requests (the site's Crawl-delay wins if larger)."),
    same_domain: bool = typer.Option(True, "--same-domain/--any-domain", help="Follow links on the start host only."),
    max_bytes: int = typer.Option(5_000_000, help="Skip pages larger than this (the download stops there)."),
    timeout: float = typer.Option(15.0, help="Seconds per request."),
) -> None:
    """Crawl a site politely (robots.txt, rate limit) and keep each page's main text; reruns resume."""
    from glmtune.data.crawl import crawl_site

    with console.status(f"crawling {url}") as status:
        s = crawl_site(url, out, depth=depth, max_pages=max_pages, delay=delay, same_domain=same_domain,
                       max_bytes=max_bytes, timeout=timeout, progress=lambda u, why: status.update(f"{why}: {u}"))
    rows = {"saved": len(s.saved), "already done (earlier runs)": s.already_done, "HTTP requests": s.requests,
            "off-domain links not followed": len(s.off_domain), "manifest": out / "manifest.jsonl"}
    console.print(_table(f"crawled {url} -> {out}: saved {len(s.saved)}", rows))
    for reason, urls in s.skipped.items():
        console.print(f"  [yellow]skipped[/] {len(urls)} {reason}: {', '.join(urls[:5])}"
                      f"{' ...' if len(urls) > 5 else ''}", highlight=False)
    if s.stopped_at_max_pages:
        console.print(f"[yellow]stopped at --max-pages {max_pages}[/]; raise it and rerun to continue")


@data_app.command("synthesize")
def synthesize_cmd(
    pages: Path = typer.Argument(..., help="Folder from `glmtune data crawl` (or a folder of .txt files)."),
    out: Path = typer.Option(..., "--out", "-o", help="QA records (canonical JSONL) to write."),
    llm: str = typer.Option(..., "--llm", help=LLM_HELP),
    model: Optional[str] = typer.Option(None, help="Model name at the endpoint (default: its first model)."),
    per_chunk: int = typer.Option(3, help="QA pairs to ask for per chunk."),
    lang: str = typer.Option("zh", help="Prompt language: zh | en."),
    chunk_tokens: int = typer.Option(512, help="Tokens per chunk."),
    overlap: int = typer.Option(64, help="Tokens shared by neighbouring chunks."),
    prompt: Optional[Path] = typer.Option(None, help="Your own prompt template ($text, $k, $title)."),
    min_grounding: float = typer.Option(0.5, help="Minimum share of an answer's bigrams found in its chunk."),
    batch_size: int = typer.Option(8, help="Chunks asked at once (threads for a URL, a batch for a folder)."),
    system: Optional[str] = typer.Option(None, help="System prompt to put in every record."),
) -> None:
    """Have an LLM write grounded question/answer pairs from each chunk of the pages; reruns resume."""
    from rich.progress import Progress

    from glmtune.synth.synthesize import Limits, synthesize_qa

    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("chunks", total=None)
        s = synthesize_qa(pages, out, llm=llm, model=model, per_chunk=per_chunk, lang=lang, chunk_tokens=chunk_tokens,
                          overlap=overlap, prompt=prompt, batch_size=batch_size, system=system,
                          limits=Limits(min_grounding=min_grounding),
                          progress=lambda done, total: bar.update(task, completed=done, total=total))
    rows = {"pages": s.pages, "chunks": s.chunks, "chunks done before": s.chunks_done_before,
            "LLM requests": s.requests, "pairs kept": s.pairs_kept,
            **{f"dropped: {k}": v for k, v in sorted(s.dropped.items())}}
    console.print(_table(f"synthesized {pages} -> {out}", rows))
    for rec in s.samples:
        console.print(f"  Q: {rec['messages'][-2]['content']}\n  A: {rec['messages'][-1]['content']}", highlight=False)


@data_app.command("augment")
def augment_cmd(
    source: str = typer.Argument(..., metavar="IN", help=IN_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Input records plus paraphrases (JSONL) to write."),
    min_per_class: int = typer.Option(..., "--min-per-class", help="Paraphrase classes under N until they reach N."),
    llm: str = typer.Option(..., "--llm", help=LLM_HELP),
    model: Optional[str] = typer.Option(None, help="Model name at the endpoint (default: its first model)."),
    lang: str = typer.Option("zh", help="Prompt language: zh | en."),
    label_field: str = typer.Option("label", help="Field (top level or meta) holding the class."),
    per_request: int = typer.Option(3, help="Paraphrases asked for per request."),
    max_rounds: int = typer.Option(4, help="Rounds of requests before giving up on a class."),
    too_close: float = typer.Option(0.8, help="Drop a paraphrase this similar (3-gram Jaccard) to another record."),
    temperature: float = typer.Option(0.7, help="Sampling temperature (0 = greedy)."),
    prompt: Optional[Path] = typer.Option(None, help="Your own prompt template ($text, $k)."),
) -> None:
    """Paraphrase dialogues of rare classes (label kept, marked meta.augmented so `split` keeps them in train)."""
    from glmtune.synth.augment import augment_classes

    with console.status(f"augmenting {source}") as status:
        s = augment_classes(source, out, min_per_class=min_per_class, llm=llm, model=model, lang=lang,
                            label_field=label_field, per_request=per_request, max_rounds=max_rounds,
                            too_close=too_close, temperature=temperature, prompt=prompt,
                            progress=lambda done, total: status.update(f"round {done}/{total}"))
    grown = {k: f"{s.before[k]} -> {s.after[k]}" for k in s.after if s.after[k] != s.before[k]}
    rows = {"classes augmented": len(grown), "records added": s.augmented, "LLM requests": s.requests,
            **{f"dropped: {k}": v for k, v in sorted(s.dropped.items())}, **grown}
    console.print(_table(f"augmented {source} -> {out}", rows))
    if s.short:
        console.print(f"[yellow]still under {min_per_class}:[/] "
                      + ", ".join(f"{k} ({n})" for k, n in s.short.items()), highlight=False)
