"""Imports run one way: a stage imports only stages below it (docs/ARCHITECTURE.md, "Import graph").

Read from the source with `ast` (lazy imports inside functions count too), so an upward arrow fails
here before it becomes a cycle or a hidden coupling."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "glmtune"
# Same layer = neither imports the other (templates / models; train / infer; evaluate / synth;
# align / serve). align's rewards reuse evaluation's label parser and judge (a reward cannot drift
# from the metric); synth runs infer's LLM clients.
LAYERS = {"errors": 0, "io": 1, "templates": 2, "models": 2, "data": 3, "train": 4, "infer": 4,
          "evaluate": 5, "synth": 5, "align": 6, "serve": 6, "ui": 7, "cli": 8, "__init__": 9, "__main__": 9}


def stage_imports() -> set[tuple[str, str, str]]:
    """(module file, its stage, imported stage) for every glmtune import across stages."""
    edges = set()
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).parts
        stage = rel[0] if len(rel) > 1 else rel[0][:-3]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "glmtune":
                names = [node.module] if node.module != "glmtune" else [f"glmtune.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.split(".")[0] == "glmtune"]
            for name in names:
                target = name.split(".")[1] if "." in name else "__init__"
                if target != stage:
                    edges.add((str(path.relative_to(PACKAGE.parent)), stage, target))
    return edges


def test_every_stage_has_a_layer():
    stages = {p.name if p.is_dir() else p.stem for p in PACKAGE.iterdir()
              if (p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py"}
    assert stages <= set(LAYERS), f"add {sorted(stages - set(LAYERS))} to LAYERS (and to ARCHITECTURE.md)"


def test_no_upward_imports():
    upward = sorted(f"{path}: {stage} -> {target}" for path, stage, target in stage_imports()
                    if LAYERS[target] >= LAYERS[stage])
    assert not upward, "imports against the pipeline's direction:\n" + "\n".join(upward)
