"""Checkpoints: written atomically, the last K kept, each loadable on its own.

Layout of `OUT/checkpoint-<step>/`:
  adapter_model.safetensors + adapter_config.json   (lora/qlora/prefix: `PeftModel.from_pretrained`)
  or model*.safetensors + config.json               (full/freeze: `AutoModelForCausalLM.from_pretrained`)
  tokenizer files, glmtune.json                      (so the folder is self-describing)
  trainer_state.json                                 ({"step": ..., "micro_batches": ...})
  state/                                             (accelerate: optimizer, scheduler, RNG of every process)
The weights live only in the loadable files; accelerate's copy of them is skipped (see the hooks).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from glmtune.errors import ConfigError

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete step checkpoints, oldest first (temp dirs of an interrupted save are not listed)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := CKPT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / "trainer_state.json").exists()]


def resolve_resume(resume: str | None, out_dir: str | Path) -> Path | None:
    """`latest` -> newest checkpoint in out_dir (None if there is none yet); a path -> that folder."""
    if not resume:
        return None
    if resume == "latest":
        ckpts = list_checkpoints(out_dir)
        return ckpts[-1] if ckpts else None
    path = Path(resume)
    if not (path / "trainer_state.json").exists():
        raise ConfigError(f"{path} is not a glmtune checkpoint (no trainer_state.json)", field="--resume",
                          fix="pass `latest` or a checkpoint-<step> folder")
    return path


def register_state_hooks(accelerator) -> None:
    """Keep accelerate's save_state/load_state to optimizer, scheduler and RNG: the weights are
    saved as a loadable adapter/model folder instead (a 9B base would otherwise be copied into every
    checkpoint). DeepSpeed saves through its own engine and is left alone."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return

    def drop_weights(models, weights, output_dir):
        weights.clear()

    def skip_model_load(models, input_dir):
        models.clear()

    accelerator.register_save_state_pre_hook(drop_weights)
    accelerator.register_load_state_pre_hook(skip_model_load)


def save_weights(model, accelerator, path: Path) -> None:
    """Loadable weights: the PEFT adapter, or the whole model for full/freeze."""
    unwrapped = accelerator.unwrap_model(model)
    state = accelerator.get_state_dict(model)  # gathers ZeRO-3 / FSDP shards on the main process
    if accelerator.is_main_process:
        unwrapped.save_pretrained(path, state_dict=state, safe_serialization=True)


def load_weights(model, accelerator, path: Path) -> None:
    """Inverse of save_weights, into the live (possibly wrapped) model."""
    from safetensors.torch import load_file

    unwrapped = accelerator.unwrap_model(model)
    adapter = path / "adapter_model.safetensors"
    if adapter.exists():
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(unwrapped, load_file(adapter, device="cpu"))
        return
    state = {}
    for f in sorted(path.glob("model*.safetensors")):
        state.update(load_file(f, device="cpu"))
    missing, unexpected = unwrapped.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"checkpoint {path} does not match the model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")


def save_checkpoint(accelerator, model, out_dir: Path, step: int, write_extras,
                    trainer_state: dict, keep_last: int | None, with_state: bool = True,
                    name: str | None = None) -> Path:
    """Write OUT/<name> atomically: everything goes to a hidden temp dir first, renamed at the end.

    A SIGKILL during the save leaves only `.tmp-*`, never a half checkpoint that `latest` would pick.
    """
    name = name or f"checkpoint-{step}"
    final = out_dir / name
    tmp = out_dir / f".tmp-{name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_weights(model, accelerator, tmp)
    if with_state:
        accelerator.save_state(str(tmp / "state"))
    if accelerator.is_main_process:
        write_extras(tmp)  # tokenizer files and glmtune.json
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if keep_last:
            for old in list_checkpoints(out_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, model, path: Path) -> dict:
    """Restore weights, optimizer, scheduler and RNG; return trainer_state (step, micro_batches)."""
    load_weights(model, accelerator, path)
    accelerator.load_state(str(path / "state"))
    return json.loads((path / "trainer_state.json").read_text())
