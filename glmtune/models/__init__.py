"""Model folders, tokenizers, loading, PEFT set-up, tiny test models, GGUF and ChatGLM import.

Importing this package installs one narrow warning filter: transformers 5.2x deprecated the model
property ``is_gradient_checkpointing`` (FutureWarning), and peft reads it in every ``PeftModel``
constructor (``peft_model.py``: training a LoRA, loading an adapter) as TRL does in its trainers.
The cause is inside those libraries and a user can do nothing about it, so it is not printed. Our own
code uses the new names (``peft_setup.enable_checkpointing``).
"""
from __future__ import annotations

import warnings

warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
