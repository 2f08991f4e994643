"""glmtune's align config mapped onto TRL's configs."""
from __future__ import annotations

import warnings

import pytest

from glmtune.align.config import load_align_config
from glmtune.align.trainers import ALGORITHMS, training_arguments


@pytest.mark.parametrize("on", [True, False])
def test_checkpointing_reaches_trl_by_the_installed_name(tmp_path, on):
    """transformers 5.24 renamed TrainingArguments' `gradient_checkpointing(_kwargs)` to
    `activation_checkpointing(_kwargs)` and warns on the old names; glmtune sets whichever the
    installed config has (5.17 has only the old ones), and TRL reads the value either way (the old
    names mirror the new). False matters too: TRL's configs default checkpointing to True."""
    cfg = load_align_config({"model": {"path": "unused"}, "data": {"datasets": ["x.jsonl"]},
                             "train": {"gradient_checkpointing": on}, "output": {"dir": str(tmp_path / "out")}},
                            check_paths=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = training_arguments(cfg, ALGORITHMS["dpo"], tmp_path / "out", has_dev=False, cuda=False)
    assert args.gradient_checkpointing is on
    assert args.gradient_checkpointing_kwargs == {"use_reentrant": False}
