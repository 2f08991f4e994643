"""Data tab: upload, convert (format auto-detect), clean, dedupe, split, stats, preview.

Each button calls the same `glmtune.data.pipeline` function as its `glmtune data ...` command; this
module only resolves the page's paths inside the workspace and formats the results.
"""
from __future__ import annotations

from pathlib import Path

from glmtune.ui.common import guarded, html_escape, md_escape, ok
from glmtune.ui.workspace import Workspace


def upload(ws: Workspace, file) -> tuple[str, str]:
    """A browser upload -> uploads/NAME in the workspace; returns (status, its workspace path)."""
    if not file:
        return "upload a file first", ""
    dest = ws.save_upload(file)
    return ok(f"uploaded {ws.relative(dest)} ({dest.stat().st_size:,} bytes)"), ws.relative(dest)


def convert(ws: Workspace, source: str, fmt: str, out: str) -> str:
    from glmtune.data.pipeline import convert_file
    src = ws.resolve(source, field="input", must_exist=True)
    s = convert_file(src, ws.resolve(out, field="converted file"), format=fmt or "auto")
    return ok(f"converted {source}: {s.records} records ({s.labels} with a label) -> {out}")


def clean(ws: Workspace, source: str, out: str, dedupe: bool) -> str:
    """Clean (emoji, control characters, self-introductions, whitespace), then optionally dedupe."""
    from glmtune.data.pipeline import clean_file, dedupe_file
    src = ws.resolve(source, field="input", must_exist=True)
    dest = ws.resolve(out, field="cleaned file")
    report = clean_file(src, dest)
    lines = [f"cleaned {source}: {report.records_in} in, {report.records_changed} changed, "
             f"{len(report.dropped)} dropped, {report.records_out} written -> {out}"]
    lines += [f"{rule}: {c.messages} messages changed, {c.chars_removed} chars removed"
              for rule, c in report.rules.items()]
    if dedupe:
        d = dedupe_file(dest, dest.with_name(dest.stem + ".dedup.jsonl"))
        dest.with_name(dest.stem + ".dedup.jsonl").replace(dest)  # atomic: the deduped file takes the name
        lines.append(f"dedupe: {d.exact} exact + {d.near} near duplicates removed, {d.records_out} kept")
    return ok(lines[0]) + "\n\n" + "\n".join(f"- {md_escape(x)}" for x in lines[1:])


def split(ws: Workspace, source: str, ratios: str, stratify: str, seed: float, out_dir: str) -> str:
    from glmtune.data.pipeline import split_file
    src = ws.resolve(source, field="input", must_exist=True)
    result, paths = split_file(src, ws.resolve(out_dir, field="split folder"), ratios=ratios,
                               stratify=stratify.strip() or None, seed=int(seed))
    parts = ", ".join(f"{name} {count} -> {ws.relative(paths[name])}" for name, count in result.counts().items())
    warnings = "".join(f"\n\n**warning:** {md_escape(w)}" for w in result.warnings)
    return ok(f"split {source}: {parts}") + warnings


def file_list(ws: Workspace) -> str:
    """The workspace's data and config files, to pick from (type the path into a field)."""
    # model folders, runs and reports hold many JSON files of their own: show only data and configs
    files = ws.files(skip=("models", "runs", "eval"))
    if not files:
        return "_the workspace holds no data files yet: upload one_"
    return "**workspace files:** " + " · ".join(f"`{f}`" for f in files)


def tokenizer_dir(ws: Workspace, template: str, tokenizer: str) -> Path:
    """The tokenizer folder typed on the page, or glmtune's built-in GLM-4 tokenizer for glm4."""
    from glmtune.errors import InputError
    from glmtune.models.tiny import BUILTIN_GLM4_TOKENIZER
    if tokenizer.strip():
        return ws.resolve(tokenizer, field="tokenizer", must_exist=True)
    if template == "glm4":
        return BUILTIN_GLM4_TOKENIZER
    raise InputError(f"template {template} needs a tokenizer folder", field="tokenizer",
                     fix="type a model folder inside the workspace (only glm4 has a built-in tokenizer)")


def stats(ws: Workspace, source: str, template: str, tokenizer: str, cutoff: float) -> str:
    """Counts, labels and token lengths under the template, with how many records exceed the cutoff."""
    from glmtune.data.pipeline import stats_file
    src = ws.resolve(source, field="input", must_exist=True)
    s = stats_file(src, template=template, tokenizer=tokenizer_dir(ws, template, tokenizer), cutoff=int(cutoff))
    rows = {"records": s.records, "messages": s.messages, "with system / tools": f"{s.with_system} / {s.with_tools}",
            "characters p50 / p90 / max": f"{s.chars.p50} / {s.chars.p90} / {s.chars.max}",
            f"tokens ({s.template}) p50 / p90 / p99 / max": f"{s.tokens.p50} / {s.tokens.p90} / {s.tokens.p99} / "
                                                            f"{s.tokens.max}",
            "trained tokens": s.trained_tokens, f"over cutoff {s.cutoff}": s.over_cutoff,
            "labels": len(s.labels)}
    table = "| statistic | value |\n|---|---|\n" + "\n".join(f"| {md_escape(k)} | {md_escape(v)} |"
                                                          for k, v in rows.items())
    return f"**{md_escape(source)}**\n\n{table}"


def preview(ws: Workspace, source: str, template: str, tokenizer: str, index: float) -> str:
    """One record rendered exactly as the model sees it; trained tokens highlighted (HTML)."""
    from glmtune.data.pipeline import render_file
    src = ws.resolve(source, field="input", must_exist=True)
    view = render_file(src, template=template, tokenizer=tokenizer_dir(ws, template, tokenizer), index=int(index))
    body = "".join(f'<mark class="trained">{html_escape(text)}</mark>' if trained else html_escape(text)
                   for text, trained in view.spans)
    return (f'<div class="render-legend">{len(view.ids)} tokens; <mark class="trained">highlighted</mark> = '
            f'trained (carries loss)</div><pre class="render">{body}</pre>')


def build(ws: Workspace) -> None:
    """The Data tab's components and events (inside a gr.Tab)."""
    import gradio as gr

    from glmtune.data.formats import known_formats
    from glmtune.templates import list_templates

    gr.Markdown("Upload a raw file (CSV, JSON, JSONL: alpaca, sharegpt, messages, CMCC-34, ...) or type a path "
                "inside the workspace. Each step writes a new file; nothing is overwritten in place.")
    with gr.Row():
        up = gr.File(label="Upload raw data", file_types=[".csv", ".json", ".jsonl", ".tsv", ".txt"],
                     elem_id="data-upload", scale=1)
        with gr.Column(scale=2):
            uploaded = ws.files() if (ws.root / "uploads").is_dir() else []
            first = next((f for f in uploaded if f.startswith("uploads/")), "")
            source = gr.Textbox(first, label="Input file (workspace path)", elem_id="data-input")
            with gr.Row():
                fmt = gr.Dropdown(known_formats(), value="auto", label="Format", elem_id="data-format")
                converted = gr.Textbox("data/all.jsonl", label="Converted file", elem_id="data-converted")
                convert_btn = gr.Button("Convert", elem_id="data-convert")
    with gr.Row():
        cleaned = gr.Textbox("data/clean.jsonl", label="Cleaned file", elem_id="data-cleaned")
        dedupe = gr.Checkbox(True, label="Also remove exact and near duplicates")
        clean_btn = gr.Button("Clean", elem_id="data-clean")
    with gr.Row():
        ratios = gr.Textbox("8:1:1", label="Split ratios train:dev:test", elem_id="data-ratios")
        stratify = gr.Textbox("label", label="Stratify on field (empty = no)")
        seed = gr.Number(42, label="Seed", precision=0)
        split_dir = gr.Textbox("data", label="Split folder", elem_id="data-split-dir")
        split_btn = gr.Button("Split", elem_id="data-split")
    status = gr.Markdown(elem_id="data-status")
    with gr.Row():
        files = gr.Markdown(file_list(ws), elem_id="data-files")
        refresh = gr.Button("Refresh file list", size="sm", scale=0, min_width=160)
    gr.Markdown("### Inspect: statistics and one record as the model sees it")
    with gr.Row():
        inspect_file = gr.Textbox("data/train.jsonl", label="File to inspect", elem_id="data-inspect")
        template = gr.Dropdown(list_templates(), value="glm4", label="Template")
        tokenizer = gr.Textbox("", label="Tokenizer folder (empty: built-in GLM-4)")
        cutoff = gr.Number(1024, label="Cutoff (tokens)", precision=0)
        index = gr.Number(0, label="Record", precision=0)
    with gr.Row():
        stats_btn = gr.Button("Statistics", elem_id="data-stats")
        preview_btn = gr.Button("Preview record", elem_id="data-preview")
    stats_md = gr.Markdown(elem_id="data-stats-out")
    render_html = gr.HTML(elem_id="data-render")

    refresh.click(lambda: file_list(ws), None, files)
    up.upload(guarded(2)(lambda f: upload(ws, f)), up, [status, source]).then(lambda: file_list(ws), None, files)
    convert_btn.click(guarded(1)(lambda s, f, o: convert(ws, s, f, o)), [source, fmt, converted], status) \
        .then(lambda: file_list(ws), None, files)
    clean_btn.click(guarded(1)(lambda s, o, d: clean(ws, s, o, d)), [converted, cleaned, dedupe], status) \
        .then(lambda: file_list(ws), None, files)
    split_btn.click(guarded(1)(lambda s, r, st, sd, d: split(ws, s, r, st, sd, d)),
                    [cleaned, ratios, stratify, seed, split_dir], status).then(lambda: file_list(ws), None, files)
    stats_btn.click(guarded(1)(lambda s, t, k, c: stats(ws, s, t, k, c)), [inspect_file, template, tokenizer, cutoff],
                    stats_md)
    preview_btn.click(guarded(1)(lambda s, t, k, i: preview(ws, s, t, k, i)),
                      [inspect_file, template, tokenizer, index], render_html)
