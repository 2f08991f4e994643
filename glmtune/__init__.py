"""glmtune: fine-tune GLM-family and other Hugging Face chat models, from raw data to a served model.

Importing glmtune is cheap: torch, transformers and GPU back-ends load only when a stage needs them.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Predictor", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import glmtune` does not pull torch in.
    if name == "Predictor":
        from glmtune.infer.predictor import Predictor
        return Predictor
    raise AttributeError(f"module 'glmtune' has no attribute {name!r}")
