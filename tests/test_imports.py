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


# -- private names stay in their module ------------------------------------------------------------
def module_of(path: Path) -> str:
    """Dotted name of a module file: glmtune/a/b.py -> glmtune.a.b, glmtune/a/__init__.py -> glmtune.a."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    base = PACKAGE.parent.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def imported_from(node: ast.ImportFrom, here: str, package: bool) -> str:
    """The absolute module an ImportFrom reads (a relative one resolved against module ``here``)."""
    if not node.level:
        return node.module or ""
    parts = here.split(".") if package else here.split(".")[:-1]
    return ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))


def dotted(node: ast.expr) -> list[str] | None:
    """``a.b.c`` -> ["a", "b", "c"]; None for anything but a chain of names."""
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.Attribute) and (head := dotted(node.value)) is not None:
        return head + [node.attr]
    return None


def private_reaches(source: str, here: str, package: bool = False) -> list[str]:
    """'line: what' for each private name of another glmtune module that module ``here`` uses:
    ``from glmtune.a import _b`` (lazy ones too), ``import glmtune.a._b``, and ``m._b`` /
    ``glmtune.a._b`` where ``m`` is bound to a glmtune module."""
    tree = ast.parse(source)
    found, modules = [], {}  # local name -> the glmtune module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            origin = imported_from(node, here, package)
            if origin.split(".")[0] != "glmtune":
                continue
            for alias in node.names:
                if is_private(alias.name) and origin != here:
                    found.append(f"{node.lineno}: from {origin} import {alias.name}")
                if is_module(f"{origin}.{alias.name}"):
                    modules[alias.asname or alias.name] = f"{origin}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != "glmtune":
                    continue
                if any(is_private(part) for part in alias.name.split(".")):
                    found.append(f"{node.lineno}: import {alias.name}")
                if alias.asname:
                    modules[alias.asname] = alias.name
                else:  # `import glmtune.a.b` binds `glmtune`
                    modules["glmtune"] = "glmtune"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr) and (chain := dotted(node.value)):
            target = modules.get(chain[0])
            for part in chain[1:]:  # glmtune.a.b._c: follow the chain while it names modules
                target = f"{target}.{part}" if target and is_module(f"{target}.{part}") else None
            if target and target != here:
                found.append(f"{node.lineno}: {'.'.join(chain)}.{node.attr} (private to {target})")
    return found


def test_private_names_stay_in_their_module():
    """A `_name` is its module's own business: what another module needs gets a public name (one name
    per thing), so renaming a helper never silently breaks a stage that reached in."""
    found = [f"{path.relative_to(PACKAGE.parent)}:{line}" for path in sorted(PACKAGE.rglob("*.py"))
             for line in private_reaches(path.read_text(encoding="utf-8"), module_of(path), path.name == "__init__.py")]
    assert not found, "private names used outside their module (give them a public name):\n" + "\n".join(found)


def test_every_way_of_reaching_in_is_found():
    """The checker itself: each form is reported; a module's own private names and public ones are not."""
    source = ("import glmtune.infer.backends as b\nimport glmtune.templates.base\nimport glmtune.io._raw\n"
              "from glmtune.serve import engine\nfrom glmtune.infer.backends import _x, BASE\n"
              "from . import predictor\nfrom .predictor import _y\n"
              "def f():\n    from glmtune.infer.chat import _own, _lazy\n"
              "    return b._z, glmtune.templates.base._w, engine._v, predictor._u, b.BASE, self._t, x.y._s\n")
    found = [line.split(": ", 1)[1] for line in private_reaches(source, "glmtune.infer.chat")]
    assert found == ["import glmtune.io._raw", "from glmtune.infer.backends import _x",
                     "from glmtune.infer.predictor import _y", "b._z (private to glmtune.infer.backends)",
                     "glmtune.templates.base._w (private to glmtune.templates.base)",
                     "engine._v (private to glmtune.serve.engine)", "predictor._u (private to glmtune.infer.predictor)"]


# Private attributes read on objects that are not ``self`` (no public API does the job), each with why.
# Anything else (`predictor._gen`, `template._checked`, transformers' `output_router._lock`) is another
# class's private state: ask for a public method instead.
OTHER_OBJECTS_PRIVATE = {
    ("glmtune/cli/main.py", "os._exit"): "the standard library's way to end at once, skipping interpreter shutdown",
    ("glmtune/infer/engine/attention.py", "config._attn_implementation"):
        "transformers: switched for each engine forward and back (set_attn_implementation re-validates the model)",
    ("glmtune/infer/engine/fused.py", "m._forward_hooks"):
        "torch: a module's registered forward hooks have no public getter (a hooked Linear is not fused)",
    ("glmtune/infer/engine/fused.py", "m._forward_pre_hooks"):
        "torch: the same check for forward pre-hooks",
    ("glmtune/infer/predictor.py", "PreTrainedTokenizerFast._decode"):
        "transformers: whether a tokenizer class overrides the decode step the Rust fast path replaces",
    ("glmtune/infer/predictor.py", "type(tokenizer)._decode"):
        "transformers: the same check, on the tokenizer's own class",
    ("glmtune/models/fused_lora.py", "module._glmtune_peft_forward"):
        "glmtune's own attribute on a peft layer, set and removed in that module",
    ("glmtune/models/expert_lora.py", "child._glmtune_peft_forward"):
        "glmtune's own attribute on a peft ParamWrapper, set and removed in that module",
    ("glmtune/models/speed.py", "layer._compiled_call_impl"): "torch: nn.Module.compile() has no public undo",
    ("glmtune/train/speed.py", "base.config._attn_implementation"):
        "transformers: the attention implementation in use has no public getter",
}


def test_no_private_state_of_other_objects():
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Attribute) and is_private(node.attr)):
                continue
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
                continue
            found.add((str(path.relative_to(PACKAGE.parent)), ast.unparse(node)))
    unexplained = sorted(f"{file}: {expr}" for file, expr in found - set(OTHER_OBJECTS_PRIVATE))
    assert not unexplained, "private state of another object (use or add a public method):\n" + "\n".join(unexplained)
