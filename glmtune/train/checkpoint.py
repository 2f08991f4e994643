"""Checkpoints: written atomically, the last K kept, each loadable on its own.

Layout of `OUT/checkpoint-<step>/`:
  adapter_model.safetensors + adapter_config.json   (lora/qlora/prefix: `PeftModel.from_pretrained`)
  or model*.safetensors + config.json               (full/freeze: `AutoModelForCausalLM.from_pretrained`)
  tokenizer files, glmtune.json                      (so the folder is self-describing)
  trainer_state.json                                 ({"step", "micro_batches", "processes", "global_micro_batch"})
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
# What a run writes into output.dir (--overwrite removes these and nothing else).
RUN_FILES = ("config.yaml", "metrics.jsonl", "loss.png", "tensorboard", "final")
# Keys that may change when a run is resumed: they decide what is logged and kept, not what is learnt.
RESUMABLE_CHANGES = ("output.save_every", "output.keep_last", "output.plot", "output.tensorboard",
                     "eval.every", "eval.batch_size")


def _run_entries(out_dir: Path) -> list[Path]:
    return sorted(p for p in out_dir.iterdir()
                  if p.name in RUN_FILES or CKPT_RE.match(p.name) or p.name.startswith(".tmp-checkpoint-")
                  or p.name == ".tmp-final" or p.name.startswith(".tmp-shared-"))  # launch.check_shared_output's probe


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        flat.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return flat


def config_changes(saved: dict, new: dict) -> list[str]:
    """Dotted keys whose value differs between a run's saved config.yaml and the new config."""
    a, b = _flatten(saved), _flatten(new)
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES]


def prepare_output_dir(cfg, *, resume: str | None, overwrite: bool, processes: int | None = None) -> None:
    """Decide, before anything loads, what may happen to ``output.dir``.

    An empty or missing folder is used as is. A folder holding anything needs ``--resume`` (and the
    saved config.yaml must match the new config, apart from RESUMABLE_CHANGES) or ``--overwrite``
    (which deletes the previous run's files, never anything else): two runs are never mixed.
    `processes` (all nodes together, when the launcher knows it): a resume on another number of
    processes may change train.batch_size so that the global micro-batch stays the checkpoint's.
    """
    import yaml

    out = Path(cfg.output.dir)
    if out.exists() and not out.is_dir():
        raise ConfigError("output.dir is a file, not a folder", field="output.dir", file=out,
                          fix="choose a folder path for output.dir")
    if not out.exists() or not any(out.iterdir()):
        return
    if overwrite:
        for entry in _run_entries(out):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        return
    if not resume:
        shown = ", ".join(p.name for p in sorted(out.iterdir())[:5])
        raise ConfigError(f"output.dir {out} is not empty ({shown})", field="output.dir",
                          fix="--resume latest to continue that run, --overwrite to replace it, "
                              "or set another output.dir")
    saved_path = out / "config.yaml"
    if not saved_path.exists():
        return  # resuming from a folder glmtune did not write: the checkpoint check says what is wrong
    saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
    changed = config_changes(saved, cfg.model_dump(mode="json"))
    if changed == ["train.batch_size"] and processes is not None:
        ckpt = resolve_resume(resume, out)
        state = json.loads((ckpt / "trainer_state.json").read_text()) if ckpt else {}
        if state.get("global_micro_batch") == cfg.train.batch_size * processes:
            return  # same examples per step on more or fewer processes: the same run
    if changed:
        diff = "; ".join(f"{k}: {_flatten(saved).get(k)!r} -> {_flatten(cfg.model_dump(mode='json')).get(k)!r}"
                         for k in changed[:6])
        raise ConfigError(f"--resume continues the run in {out}, but the config differs from the one it was "
                          f"started with ({diff})", field=changed[0], file=saved_path,
                          fix="resume with the saved config, or use --overwrite / another output.dir to start a new run")


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


def check_global_batch(path: Path, batch_size: int, processes: int) -> None:
    """A resume continues the run when each step sees the checkpoint's examples: the global micro-batch
    (train.batch_size x processes, the unit glmtune.train.data.BatchStream deals out) must be the one the
    checkpoint was written with; the number of nodes and of processes per node may change."""
    state = json.loads((path / "trainer_state.json").read_text())
    before = state.get("global_micro_batch")
    if before is None or before == batch_size * processes:
        return  # a checkpoint from before this was recorded: as before, not checked
    fix = (f"--set train.batch_size={before // processes} on these {processes} processes" if before % processes == 0
           else f"{state.get('processes')} processes in all (--nnodes x --nproc)")
    raise ConfigError(f"{path.name} was written by {state.get('processes')} process(es) x train.batch_size "
                      f"{before // max(state.get('processes') or 1, 1)} (global micro-batch {before}); this run has "
                      f"{processes} x {batch_size} = {batch_size * processes}, so each step would see other examples",
                      file=path / "trainer_state.json", field="train.batch_size", fix=f"resume with {fix}")


def load_checkpoint(accelerator, model, path: Path) -> dict:
    """Restore weights, optimizer, scheduler and RNG; return trainer_state (step, micro_batches)."""
    load_weights(model, accelerator, path)
    accelerator.load_state(str(path / "state"))
    return json.loads((path / "trainer_state.json").read_text())
