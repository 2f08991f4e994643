"""LoRA adapters at inference without merging and without PEFT's one-active-adapter state: every
adapter of a base is loaded at once, and each token of a batch runs the adapter its request named.

For each adapted linear layer the adapters' A matrices are stacked along the rank (A_cat: R x in,
B_cat: out x R, R = the sum of their ranks). A token's output is the base output plus
``((x @ A_cat.T) * m) @ B_cat.T`` where ``m`` keeps (and scales by alpha/r) only the rank columns of
its own adapter: two small GEMMs for the whole batch whatever the mix of adapters (the
segmented-GEMM idea of S-LoRA / punica, written with dense ops so it runs on any device and inside
CUDA graphs). Base layers are never changed, so a 4-bit (QLoRA) base works the same.

Supported: plain LoRA on linear layers (rank/alpha patterns, rsLoRA). An adapter that needs more
(DoRA, trained embeddings, modules_to_save, LoRA biases) raises :class:`UnsupportedAdapter` and the
back-end falls back to PEFT.
"""
from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from glmtune.errors import InputError

PREFIX = "base_model.model."


class UnsupportedAdapter(InputError):
    """An adapter the batched LoRA cannot run (the PEFT path can)."""


@dataclass
class _Layer:
    a: object          # (R, in)
    b: object          # (out, R)
    owner: object      # (R,) int64: adapter index of each rank column
    scale: object      # (R,) model dtype: that adapter's alpha / r
    adapters: set


def _pattern_value(patterns: dict, name: str, default):
    # PEFT's rule: a pattern key matches a module name it ends (after a dot), as a regex.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def read_adapter(path: Path) -> tuple[dict, dict[str, tuple]]:
    """(adapter_config, {module name: (A, B, scale)}) of one adapter folder, checked."""
    from peft.utils import load_peft_weights

    config_file = path / "adapter_config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read the adapter config ({e})", file=config_file,
                         fix="pass the folder that training wrote the adapter to") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise UnsupportedAdapter(f"a {config.get('peft_type')} adapter", file=path, field="peft_type")
    for key, bad in (("use_dora", True), ("lora_bias", True), ("fan_in_fan_out", True)):
        if config.get(key) == bad:
            raise UnsupportedAdapter(f"{key}: {bad}", file=config_file, field=key)
    if config.get("target_parameters"):  # e.g. LoRA on a MoE model's fused 3-D expert weights
        raise UnsupportedAdapter(f"LoRA on parameters ({', '.join(sorted(config['target_parameters']))}), "
                                 f"not only on linear layers", file=config_file, field="target_parameters")
    if config.get("bias", "none") != "none" or config.get("modules_to_save"):
        raise UnsupportedAdapter("trains biases or whole modules (bias / modules_to_save)", file=config_file,
                                 field="modules_to_save")
    weights = load_peft_weights(str(path), device="cpu")
    layers: dict[str, dict] = {}
    for key, tensor in weights.items():
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise UnsupportedAdapter(f"weight {key} is not a LoRA A/B matrix", file=path, field="weights")
        name = m.group(1).removeprefix(PREFIX)
        layers.setdefault(name, {})[m.group(2)] = tensor
    use_rs = bool(config.get("use_rslora"))
    out = {}
    for name, ab in layers.items():
        if set(ab) != {"A", "B"}:
            raise UnsupportedAdapter(f"layer {name} lacks its lora_A or lora_B", file=path, field="weights")
        r = ab["A"].shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", r))
        out[name] = (ab["A"], ab["B"], alpha / (r ** 0.5 if use_rs else r))
    return config, out


class MultiLoRA:
    """Several adapters on one base model, chosen per token (see the module docstring).

    ``names[i]`` is adapter index ``i``; index -1 means the base model alone."""

    def __init__(self, model, adapters: dict[str, Path]):
        import torch

        self.names = list(adapters)
        modules = dict(model.named_modules())
        stacked: dict[str, list] = {}
        for index, (name, path) in enumerate(adapters.items()):
            _, layers = read_adapter(Path(path))
            for module_name, (a, b, scale) in layers.items():
                if module_name not in modules or not hasattr(modules[module_name], "weight"):
                    raise InputError(f"the adapter targets {module_name}, which this model does not have",
                                     file=path, fix="use the adapter with the base model it was trained on")
                stacked.setdefault(module_name, []).append((index, a, b, scale))
        self.layers: dict[str, _Layer] = {}
        self._hooks = []
        for module_name, parts in stacked.items():
            module = modules[module_name]
            dtype, device = _compute_dtype(module), module.weight.device
            self.layers[module_name] = _Layer(
                a=torch.cat([a for _, a, _, _ in parts]).to(device, dtype),
                b=torch.cat([b for _, _, b, _ in parts], dim=1).to(device, dtype),
                owner=torch.cat([torch.full((a.shape[0],), i, dtype=torch.long) for i, a, _, _ in parts]).to(device),
                scale=torch.cat([torch.full((a.shape[0],), s) for _, a, _, s in parts]).to(device, dtype),
                adapters={i for i, *_ in parts})
        self.selection = None  # None | adapter index (every token) | (N,) per-token indices
        self.attach(model)

    def attach(self, model) -> None:
        """Hook the adapted layers of ``model`` by name (again after its modules were swapped, e.g.
        by :func:`glmtune.infer.engine.fused.fuse_projections`)."""
        self.remove()
        modules = dict(model.named_modules())
        for module_name, layer in self.layers.items():
            self._hooks.append(modules[module_name].register_forward_hook(self._hook(layer)))

    def index(self, adapter: str | None) -> int:
        return -1 if adapter is None else self.names.index(adapter)

    @contextlib.contextmanager
    def select(self, selection):
        """Run the forwards inside with ``selection``: an adapter index for every token, or an (N,)
        tensor of per-token indices in the order of the flattened (batch, sequence) tokens."""
        old, self.selection = self.selection, selection
        try:
            yield
        finally:
            self.selection = old

    def _hook(self, layer: _Layer):
        def hook(module, args, output):
            sel = self.selection
            if sel is None or (isinstance(sel, int) and sel not in layer.adapters):
                return None
            x = args[0]
            h = x.to(layer.a.dtype) @ layer.a.T
            if isinstance(sel, int):
                mask = (layer.owner == sel).to(h.dtype) * layer.scale
            else:
                mask = ((sel[:, None] == layer.owner[None, :]).to(h.dtype) * layer.scale).view(*h.shape[:-1], -1)
            return output + ((h * mask) @ layer.b.T).to(output.dtype)
        return hook

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


def _compute_dtype(module):
    """The dtype activations have at this layer (a 4-bit layer computes in its compute dtype)."""
    import torch

    dtype = getattr(module, "compute_dtype", None) or module.weight.dtype
    return dtype if dtype.is_floating_point and dtype != torch.uint8 else torch.bfloat16
