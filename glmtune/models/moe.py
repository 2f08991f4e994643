"""Mixture-of-experts models (GLM-4.5 / 4.6 / 4.7 = Glm4Moe, GLM-4.7-Flash = Glm4MoeLite): what gets
LoRA, the router, and the router's balance statistic.

How transformers keeps them (5.17 to 5.24, `models/glm4_moe*/modeling_*.py`): each MoE block
(`mlp`) holds `gate` (the router: an fp32 ``(E, hidden)`` weight + the aux-loss-free bias
``e_score_correction_bias``, sigmoid scores, top-k within the top groups), `shared_experts` (a plain
gated MLP of nn.Linear) and `experts`, whose E routed experts are two fused 3-D parameters,
``gate_up_proj (E, 2I, hidden)`` and ``down_proj (E, hidden, I)``, run by grouped GEMMs
(``config._experts_implementation = "grouped_mm"``, transformers' default where torch has it).
The first layer(s) are dense MLPs. No nn.Linear holds an expert, so PEFT's ``all-linear`` misses
every routed expert.

Which LoRA (decided by what PEFT 0.21 does, checked in tests/models/test_moe.py):
* routed experts: PEFT's parameter targeting (``LoraConfig(target_parameters=[...experts.gate_up_proj,
  ...experts.down_proj])``, ``lora.ParamWrapper``): per-expert rank-r factors, saved, loaded and merged
  (``merge_and_unload``) by PEFT. Its forward folds ``W + s B A`` into a full copy of every expert's
  weight on each call (and its backward a full-size weight gradient); training instead runs
  glmtune.models.expert_lora (the same factors through grouped GEMMs, never a full-size tensor;
  equal to PEFT's forward in tests), the ``speed.expert_lora`` lever.
* attention: PEFT ``target_modules`` (nn.Linear).
* dense and shared-expert MLPs: also *parameter* targets (``mlp.gate_proj.weight``, ...), not module
  names: on transformers 5 PEFT rewrites module names ``gate_proj`` / ``up_proj`` / ``down_proj`` /
  ``gate`` of glm4_moe models into the fused expert parameters and the router (its v4-checkpoint
  conversion, ``peft.utils.transformers_weight_conversion``), dropping those linears from the adapter
  and putting LoRA on the router. A 2-D parameter target is plain LoRA on that linear (same
  factors, same merge) and survives PEFT's load-time conversion unchanged.
* the router stays frozen (``method.train_router: true`` trains its weight in full, saved with the
  adapter as a PEFT ``modules_to_save`` entry).
"""
from __future__ import annotations

from glmtune.errors import ConfigError

# The routed experts' fused parameters and the MLP linears, as PEFT parameter targets (key suffixes).
EXPERT_PARAMS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
MLP_PARAMS = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")
ROUTER = "gate"  # the MoE block's router attribute (PEFT modules_to_save name)
# The attention linears per model type: GQA (GLM-4.5/4.6/4.7) and MLA (GLM-4.7-Flash; q_proj when
# q_lora_rank is None, else the q_a / q_b pair).
ATTENTION = {
    "glm4_moe": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "glm4_moe_lite": ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"),
}
# What `method.target_modules` may name on a MoE model besides the attention linears.
MOE_NAMES = ("gate_proj", "up_proj", "down_proj", "experts")


def moe_blocks(model) -> list:
    """The MoE blocks of a (possibly PEFT-wrapped) model: modules with routed `experts` and a router `gate`."""
    # GLM's sigmoid router carries the aux-loss-free bias; softmax routers (Mixtral, Qwen-MoE) do not
    # and are not handled here
    return [m for m in model.modules() if hasattr(m, "experts") and hasattr(m, ROUTER)
            and hasattr(getattr(m, ROUTER), "e_score_correction_bias")]


def is_moe(model) -> bool:
    return bool(moe_blocks(model))


def lora_spec(model, choice) -> tuple[list[str], list[str]]:
    """(target_modules, target_parameters) for LoRA on a MoE model (see the module docstring).

    ``auto`` and ``all-linear``: attention + dense/shared MLPs + routed experts (never the router). A
    list names attention linears and any of gate_proj / up_proj / down_proj (dense and shared MLPs)
    and ``experts`` (both fused expert parameters)."""
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    attention = [t for t in ATTENTION.get(getattr(model.config, "model_type", ""), ATTENTION["glm4_moe"])
                 if t in names]
    if choice in ("auto", "all-linear"):
        return attention, [*MLP_PARAMS, *EXPERT_PARAMS]
    missing = [t for t in choice if t not in names and t not in MOE_NAMES]
    if missing:
        raise ConfigError(f"no module named {missing} in this mixture-of-experts model (it has "
                          f"{attention + list(MOE_NAMES)})", field="method.target_modules",
                          fix="use auto, or names from that list (experts = the routed experts)")
    modules = [t for t in choice if t not in MOE_NAMES]
    params = [f"{t}.weight" for t in choice if t in MOE_NAMES[:3]]
    if "experts" in choice:
        params += list(EXPERT_PARAMS)
    return modules, params


def freeze_routers(model, *, train: bool) -> int:
    """Router weights trainable or not (full / freeze methods); returns how many routers there are."""
    blocks = moe_blocks(model)
    for block in blocks:
        getattr(block, ROUTER).requires_grad_(train)
    return len(blocks)


# --------------------------------------------------------------------------------------------------
# the router's balance statistic

def balance_loss(router_logits, top_k_index, num_experts: int, token_mask=None):
    """DeepSeek-V3's complementary balance loss without its alpha (Liu et al. 2024, eqs. 17-19), over
    the tokens given: ``sum_i f_i P_i`` with ``f_i = E / (K T) * #(tokens routing to i)`` and ``P_i``
    the mean over tokens of the normalised sigmoid score ``s_i / sum_j s_j``. 1.0 = perfectly even
    load; E / K (all tokens on the same K experts) at worst. router_logits (T, E), top_k_index (T, K);
    ``token_mask`` (T,) bool: only its True tokens count (a fixed-size row's padding is routed too)."""
    import torch

    scores = router_logits.float().sigmoid()
    tokens, k = top_k_index.shape
    weight = (torch.ones(tokens, device=scores.device) if token_mask is None
              else token_mask.to(device=scores.device, dtype=torch.float32))
    n = weight.sum().clamp(min=1.0)
    probs = ((scores / scores.sum(-1, keepdim=True)) * weight[:, None]).sum(0) / n          # (E,)
    counts = torch.zeros(num_experts, device=probs.device, dtype=torch.float32)
    counts.scatter_add_(0, top_k_index.reshape(-1), weight.repeat_interleave(k))
    frac = counts * num_experts / (n * k)                                                  # (E,)
    return (frac * probs).sum()


class RouterBalance:
    """Forward hooks on every router: the balance loss (:func:`balance_loss`) of each training
    forward, averaged over MoE layers and micro-batches until read. Logged, not added to the loss:
    GLM-4.5+ balance their experts with the aux-loss-free bias, and the router is frozen by default.

    The sum and the count are device tensors updated in place, read once per logging window: so the
    hook's work is ordinary kernels, and a CUDA-graphed block (speed.cuda_graphs), whose Python hooks
    never run on replay, still adds its value at every replay (the capture recorded the in-place
    adds). A block recomputed under gradient checkpointing reports the same value again, which leaves
    the mean unchanged; eval forwards (module.eval()) are not counted."""

    def __init__(self, model):
        import torch

        self.total = self.count = None  # (sum, calls) on the device, made at the first training forward
        # (T,) bool, the real tokens of the forward (a CUDA-graphed row, refilled by its owner before each
        # replay; a padded batch's attention mask); used for forwards of exactly T tokens
        self.token_mask = None
        # run eagerly under torch.compile: traced, the host-side state would be a guard that
        # recompiles the block on every call
        hook = torch.compiler.disable(self._hook)
        self._hooks = [getattr(b, ROUTER).register_forward_hook(hook) for b in moe_blocks(model)]

    def _hook(self, module, args, output):
        if not module.training:
            return
        import torch

        router_logits, _, top_k_index = output
        with torch.no_grad():
            mask = self.token_mask
            if mask is not None and mask.shape[0] != router_logits.shape[0]:
                mask = None
            value = balance_loss(router_logits, top_k_index, router_logits.shape[-1], mask)
            if self.total is None:
                self.total, self.count = torch.zeros_like(value), torch.zeros_like(value)
            self.total.add_(value)
            self.count.add_(1)

    def read(self) -> float | None:
        """The mean since the last read (None when no router ran in training mode), and reset."""
        import torch

        if self.total is None:
            return None
        total, count = torch.stack([self.total, self.count]).tolist()  # one wait for the device, not two
        self.reset()
        return total / count if count else None

    def reset(self) -> None:
        """Forget what was counted so far (in place: a captured graph keeps adding to the same tensors)."""
        if self.total is not None:
            self.total.zero_()
            self.count.zero_()

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
