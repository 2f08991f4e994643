"""The prefill forward's pointwise parts (RMSNorms, a dense MLP, rotary embedding) through
``torch.compile``, the rest of it (projections, the engine's attention and cache writes) eager.

Why: an eager prefill forward of the 9B shape issues ~64 kernels a layer; on the H200 a 160-token
prefill took 45 ms of host time for 46 ms of wall time (bench/RESULTS.md, session 12): launch-bound.
Most of those kernels are the RMSNorms (eight each: casts, pow, mean, rsqrt, muls) and the rotary
embedding (~18), each also a full pass over the activations. Compiled, a norm is one kernel, the
rotary two. Only these regions are compiled, not the layer: their one input shape is (1, tokens,
width), so a dynamic-shape compile has one variant (and one for a single token), where compiling
the whole layer through the decode step's function (its attention's inputs sized by tokens *and*
keys) kept making new variants under `glmtune serve` (session 12's revert). A region is its own
compiled function (its own cache), apart from the decode step's.

A region that fails to compile turns the regions off for the engine (``failure`` keeps why); the
forward is then run again eagerly (it rewrites the same cache positions).
"""
from __future__ import annotations

import contextlib
import functools
import sys

from glmtune.models.loading import find_decoder

ROTARY = "apply_rotary_pos_emb"


def norm_forward(module, *args, **kwargs):
    """A compiled norm: the module's own forward (one function per kind of region: its own cache)."""
    return type(module).forward(module, *args, **kwargs)


def mlp_forward(module, *args, **kwargs):
    """A compiled MLP: the module's own forward (its adapters' hooks included)."""
    return type(module).forward(module, *args, **kwargs)


def rotary_forward(fn, *args, **kwargs):
    return fn(*args, **kwargs)


def allow_recompiles(n: int) -> None:
    """Room for a compiled function's variants (dynamo's default of 8 runs out serving several
    adapters, and past it a variant silently runs eagerly). The setting's name by what torch has."""
    import torch._dynamo.config as dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo, name):
            setattr(dynamo, name, max(getattr(dynamo, name), n))
            return


@contextlib.contextmanager
def distinct_sizes():
    """Compiles inside give every dynamic size its own symbol. Dynamo's default ("duck sizing") makes
    equal sizes one symbol, so a 4,096-token prefill of a 4,096-wide model would tie the token count to
    the width, and the width's being fixed would fix the token count: a new compile per such count."""
    try:
        import torch.fx.experimental._config as fx_config
    except ImportError:
        yield
        return
    if not hasattr(fx_config, "use_duck_shape"):
        yield
        return
    with fx_config.patch(use_duck_shape=False):
        yield


class PrefillRegions:
    """The compiled regions of one model's decoder layers, switched on around a prefill forward."""

    def __init__(self, model):
        import torch

        self.modules = []  # (module, its compiled forward)
        self.compiled_norm = torch.compile(norm_forward, dynamic=True)
        self.compiled_mlp = torch.compile(mlp_forward, dynamic=True)
        for layer in find_decoder(model).layers:
            for module in layer.children():
                if _is_norm(module):
                    self.modules.append((module, self.compiled_norm))
                elif _is_dense_mlp(module):
                    self.modules.append((module, self.compiled_mlp))
        attention_modules = {sys.modules[type(m).__module__] for m in model.modules() if hasattr(m, "q_proj")}
        self.rotary = [(mod, getattr(mod, ROTARY)) for mod in attention_modules if callable(getattr(mod, ROTARY, None))]
        self.compiled_rotary = torch.compile(rotary_forward, dynamic=True)
        self.failure: str | None = None
        allow_recompiles(32)

    @property
    def active(self) -> bool:
        return self.failure is None and bool(self.modules or self.rotary)

    @contextlib.contextmanager
    def on(self):
        """Inside: the regions' modules run compiled (instance ``forward``s, removed after)."""
        for module, compiled in self.modules:
            module.forward = functools.partial(compiled, module)
        for mod, fn in self.rotary:
            setattr(mod, ROTARY, functools.partial(self.compiled_rotary, fn))
        try:
            with distinct_sizes():
                yield
        finally:
            for module, _ in self.modules:
                del module.forward
            for mod, fn in self.rotary:
                setattr(mod, ROTARY, fn)


def _is_norm(module) -> bool:
    name = type(module).__name__
    return name.endswith("RMSNorm") or name.endswith("LayerNorm")


def _is_dense_mlp(module) -> bool:
    """A gated MLP of plain projections (a mixture of experts routes tokens by value: left eager)."""
    name = type(module).__name__
    return name.endswith("MLP") and not any(hasattr(module, a) for a in ("experts", "gate", "router"))
