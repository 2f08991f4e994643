"""Evaluate tab: `glmtune eval classify` (metrics table, confusion matrix, failed predictions),
`glmtune eval generate` and `glmtune eval compare`, through the same glmtune.evaluate functions."""
from __future__ import annotations

import json
from pathlib import Path

from glmtune.ui.common import guarded, ok
from glmtune.ui.workspace import Workspace

# The headline numbers of each report kind, in table order (everything else stays in metrics.json).
HEADLINE = {"classification": ["n_samples", "accuracy", "f1_macro", "f1_weighted", "precision_macro",
                               "recall_macro", "invalid_count", "samples_per_s"]}


def metrics_table(metrics: dict) -> list[list]:
    keys = HEADLINE.get(metrics.get("task"), [k for k, v in metrics.items() if isinstance(v, (int, float))])
    return [[k, _num(metrics.get(k))] for k in keys if k in metrics]


def _num(v):
    return round(v, 4) if isinstance(v, float) else v


def classify(ws: Workspace, model: str, adapter: str, data: str, out: str, mode: str, quick: float,
             batch_size: float):
    """Run the classification report; return (status, metrics rows, confusion matrix image, failed rows)."""
    from PIL import Image

    from glmtune.evaluate.classify import classify_report
    out_dir = ws.resolve(out, field="report folder")
    m = classify_report(ws.resolve(model, field="model", must_exist=True),
                        ws.resolve(data, field="data", must_exist=True), out_dir,
                        adapter=ws.resolve(adapter, field="adapter", must_exist=True) if adapter.strip() else None,
                        quick=int(quick) or None, batch_size=int(batch_size), mode=mode)
    with Image.open(out_dir / "confusion_matrix.png") as im:
        cm = im.copy()
    failed = [[r.get("id", r.get("index")), r.get("true"), r.get("pred"), r.get("raw_output", "")]
              for r in _jsonl_head(out_dir / "failed_predictions.jsonl", 50)]
    return (ok(f"{m['n_samples']} samples, accuracy {m['accuracy']:.4f} -> {out}/report.md"),
            metrics_table(m), cm, failed)


def generate(ws: Workspace, data: str, out: str, metrics: str, tokenize: str):
    """BLEU/ROUGE/METEOR/TER of a predictions file (rows {"prediction", "references"})."""
    from glmtune.evaluate.generation import generation_report_files
    m = generation_report_files(ws.resolve(data, field="predictions", must_exist=True),
                                ws.resolve(out, field="report folder"),
                                [x.strip() for x in metrics.split(",") if x.strip()], tokenize)
    return ok(f"scored {data} -> {out}/metrics.json"), metrics_table(m)


def compare(ws: Workspace, folders: str) -> str:
    """One Markdown table over several report folders (best per column in bold)."""
    from glmtune.evaluate.compare import compare_rows, markdown_table
    paths = [ws.resolve(f, field="report folders", must_exist=True) for f in folders.split(",") if f.strip()]
    table = markdown_table(compare_rows(paths))
    return table.replace(str(ws.root) + "/", "")


def _jsonl_head(path: Path, n: int) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if len(rows) >= n:
                break
            rows.append(json.loads(line))
    return rows


def build(ws: Workspace) -> None:
    import gradio as gr

    gr.Markdown("### Classification report (`glmtune eval classify`)")
    with gr.Row():
        model = gr.Textbox("models/tiny-glm4", label="Model folder (base or merged)", elem_id="eval-model")
        adapter = gr.Textbox("runs/lora/final", label="Adapter / checkpoint folder (optional)", elem_id="eval-adapter")
        data = gr.Textbox("data/test.jsonl", label="Test data", elem_id="eval-data")
        out = gr.Textbox("eval/lora-final", label="Report folder", elem_id="eval-out")
    with gr.Row():
        mode = gr.Dropdown(["constrained", "generate"], value="constrained", label="Mode",
                           info="constrained scores every label (never an invalid answer); generate = greedy + parse")
        quick = gr.Number(0, label="Only N samples, stratified (0 = all)", precision=0)
        batch = gr.Number(8, label="Batch size", precision=0)
        run = gr.Button("Evaluate", variant="primary", elem_id="eval-run")
    status = gr.Markdown(elem_id="eval-status")
    with gr.Row():
        table = gr.Dataframe(headers=["metric", "value"], label="Metrics", elem_id="eval-metrics",
                             interactive=False)
        cm = gr.Image(label="Confusion matrix", type="pil", elem_id="eval-cm", interactive=False, format="png")
    failed = gr.Dataframe(headers=["id", "true", "predicted", "raw output"], label="Failed predictions (first 50)",
                          elem_id="eval-failed", interactive=False, wrap=True)
    run.click(guarded(4)(lambda *a: classify(ws, *a)), [model, adapter, data, out, mode, quick, batch],
              [status, table, cm, failed])

    gr.Markdown("### Generation metrics (`glmtune eval generate`)")
    with gr.Row():
        preds = gr.Textbox("eval/predictions.jsonl", label='Predictions ({"prediction", "references"} rows)')
        gen_out = gr.Textbox("eval/generate", label="Report folder")
        gen_metrics = gr.Textbox("bleu,rouge,meteor,ter", label="Metrics")
        tokenize = gr.Dropdown(["auto", "jieba", "char", "whitespace"], value="auto", label="Tokenize")
        gen_btn = gr.Button("Score", elem_id="eval-generate")
    gen_status = gr.Markdown()
    gen_table = gr.Dataframe(headers=["metric", "value"], label="Generation metrics", interactive=False)
    gen_btn.click(guarded(2)(lambda *a: generate(ws, *a)), [preds, gen_out, gen_metrics, tokenize],
                  [gen_status, gen_table])

    gr.Markdown("### Compare checkpoints (`glmtune eval compare`)")
    with gr.Row():
        folders = gr.Textbox("", label="Report folders, comma-separated", elem_id="eval-compare-folders", scale=3)
        cmp_btn = gr.Button("Compare", elem_id="eval-compare")
    cmp_md = gr.Markdown(elem_id="eval-compare-out")
    cmp_btn.click(guarded(1)(lambda f: compare(ws, f)), folders, cmp_md)


