"""Held-out numbers TRL does not log: the policy's KL to its reference on preference data."""
from __future__ import annotations


def preference_kl(trainer, dataset, batch_size: int = 8) -> float:
    """Mean per-token KL(policy || reference) over the answer tokens of `dataset`'s pairs (nats).

    Both distributions are full next-token softmaxes at the same positions, so this is the exact KL
    on those contexts, not a sampled estimate. The reference is TRL's: the frozen "ref" adapter when
    the run started from an adapter, the adapters disabled otherwise, or TRL's separate ref_model."""
    import contextlib

    import torch
    from trl.trainer.utils import use_adapter

    from glmtune.templates.base import IGNORE_INDEX

    model = trainer.accelerator.unwrap_model(trainer.model)
    device = next(model.parameters()).device
    rows = [(r["prompt_ids"], r[side]) for r in dataset for side in ("chosen_ids", "rejected_ids")]

    def ref_ctx():
        if getattr(trainer, "ref_model", None) is not None:
            return contextlib.nullcontext(trainer.ref_model)
        name = "ref" if "ref" in getattr(model, "peft_config", {}) else None
        return _Using(use_adapter(model, adapter_name=name), model)

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            width = max(len(p) + len(a) for p, a in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            labels = torch.full_like(ids, IGNORE_INDEX)
            for j, (p, a) in enumerate(chunk):
                ids[j, :len(p) + len(a)] = torch.tensor(p + a)
                mask[j, :len(p) + len(a)] = 1
                labels[j, len(p):len(p) + len(a)] = torch.tensor(a)
            ids, mask = ids.to(device), mask.to(device)
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
            with ref_ctx() as ref:
                ref_logp = torch.log_softmax(ref(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
            kl = (logp.exp() * (logp - ref_logp)).sum(-1)  # (B, T-1): KL at each position
            keep = (labels[:, 1:] != IGNORE_INDEX).to(device)
            total += float(kl[keep].sum())
            count += int(keep.sum())
    model.train()
    return total / max(count, 1)


class _Using:
    """Enter a context manager, yield the model it configured."""

    def __init__(self, ctx, model):
        self.ctx, self.model = ctx, model

    def __enter__(self):
        self.ctx.__enter__()
        return self.model

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc)
