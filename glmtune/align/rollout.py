"""GRPO / RLOO rollouts through glmtune's generation engine, on the very model being trained.

TRL's GRPOTrainer / RLOOTrainer sample their completions with transformers' ``generate``, whose host
issues every kernel of every decode step (~70 ms of Python per step on the GLM-4-9B shape); the
engine (glmtune.infer.engine) decodes from a static slot KV cache with CUDA-graphed steps. Colocated,
nothing copied:

- the engine runs the policy's own transformers model with PEFT's LoRA layers inside it, so each
  rollout reads the adapter weights the optimizer has just updated, in place (optimizers update
  parameters in place, so a captured CUDA graph sees the new values too). No second base model, no
  merge, no adapter copy to refresh: exact by construction;
- its forwards run under inference_mode and in eval mode (LoRA dropout off: the rollouts sample the
  policy itself), and the model's train mode is restored after: gradients, optimizer and checkpoint
  state are untouched;
- the KV cache is allocated once, for the rollout batch (slots) and the longest prompt +
  max_completion_length (positions), and reused every step. Between rollouts it is detached from the
  attention modules, so no wrapper (DDP broadcasts a model's buffers), state dict or checkpoint ever
  sees it; ``close`` frees it at the end of the run.

Sampling is TRL's own generation config translated (temperature, top_p, top_k, repetition penalty,
max_new_tokens; do_sample False = greedy), stopping at TRL's eos ids (the template's end tokens); a
completion keeps its stop token, as TRL's generate path does. A generation option the engine cannot
run is an error, never ignored. ``align.rollouts`` picks: auto (the engine when it can run the
model, else transformers generate, the reason printed once), engine (an error when it cannot) or
generate (TRL's own path).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from glmtune.errors import ConfigError, GlmtuneError

# GenerationConfig fields TRL sets that the engine reads or that do not change what is sampled
_ENGINE_READS = {"max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "min_p",
                 "pad_token_id", "bos_token_id", "eos_token_id", "cache_implementation", "disable_compile",
                 "transformers_version"}


@dataclass(frozen=True)
class Sampling:
    """One rollout's decoding settings, as the engine takes them."""
    max_new_tokens: int
    temperature: float          # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0              # 0 = every token
    repetition_penalty: float = 1.0


def sampling_of(generation_config) -> Sampling:
    """TRL's GenerationConfig (what it would pass to ``generate``) as the engine's settings."""
    g = generation_config
    extra = sorted(set(g.to_diff_dict()) - _ENGINE_READS)
    if g.min_p is not None:
        extra.insert(0, "min_p")
    if extra:
        raise GlmtuneError(f"the generation engine cannot run the rollout option(s) {', '.join(extra)}. "
                           f"Fix: set align.rollouts: generate (transformers generate runs them)")
    return Sampling(max_new_tokens=int(g.max_new_tokens), temperature=float(g.temperature or 1.0) if g.do_sample else 0.0,
                    top_p=float(g.top_p if g.top_p is not None else 1.0), top_k=int(g.top_k or 0),
                    repetition_penalty=float(g.repetition_penalty or 1.0))


def live_model(model):
    """The transformers model the policy's forward runs: PEFT's wrapper off, its LoRA layers inside."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def rollout_problem(model) -> str | None:
    """Why the engine cannot roll out this policy (a PeftModel or a plain model); None when it can."""
    from glmtune.infer.engine import engine_support

    kinds = sorted({str(c.peft_type.value) for c in getattr(model, "peft_config", {}).values()} - {"LORA"})
    if kinds:  # prompt-learning adapters are not layers of the base model's forward
        return f"a {'/'.join(kinds)} adapter"
    return engine_support(live_model(model), live_adapters=True)


def plan_rollouts(choice: str, model, args, prompt_lengths, algorithm: str, say: Callable[[str], None], *,
                  local_rank: int = 0) -> tuple["EngineRollouts | None", str]:
    """(the engine rollouts, or None for TRL's generate; the line the run prints) for
    align.rollouts = ``choice``. ``args``: the TRL config (its rollout batch sizes the engine's slots);
    ``prompt_lengths``: every train/dev prompt's token count (the longest sizes its positions);
    ``local_rank``: this process's GPU in a multi-GPU run."""
    if choice == "generate":
        return None, f"{algorithm} rollouts: transformers generate (align.rollouts: generate)"
    problem = rollout_problem(model)
    if problem is None and local_rank != 0:
        # the engine's thread selects the model's device, but rollouts on several GPUs at once have
        # not run yet (no multi-GPU machine was lent since): until they have, ranks past 0 generate
        problem = (f"on rank {local_rank} of a multi-GPU run: engine rollouts on several GPUs are not tested yet, "
                   f"only rank 0 uses the engine")
    if problem is not None:
        if choice == "engine":
            raise ConfigError(f"align.rollouts is engine, but glmtune's generation engine cannot run this model: "
                              f"{problem}", field="align.rollouts",
                              fix="set align.rollouts: auto (falls back to transformers generate) or generate")
        return None, f"{algorithm} rollouts: transformers generate (glmtune's generation engine cannot run them: {problem})"
    # one generation batch per process (TRL: per-device batch x steps_per_generation), or an eval batch
    slots = max(args.per_device_train_batch_size * (args.steps_per_generation or 1), args.per_device_eval_batch_size)
    positions = max(prompt_lengths, default=0) + args.max_completion_length
    return (EngineRollouts(slots=slots, positions=positions, say=say),
            f"{algorithm} rollouts: glmtune's generation engine on the policy being trained (its LoRA weights "
            f"read in place, no copy of the model), {slots} completions at once")


class EngineRollouts:
    """The engine of one run's rollouts: started at the first rollout (the trainer has then moved the
    model to its device), restarted larger if a prompt ever needs more positions, freed by ``close``."""

    def __init__(self, *, slots: int, positions: int, say: Callable[[str], None]):
        self.slots, self.positions, self.say = slots, positions, say
        self.engine = None
        self.requests = 0           # completions generated (tests: the engine did run)
        self._modules: dict = {}    # layer index -> attention module the cache attaches to
        self._said_graphs = False

    def generate(self, model, prompt_ids: list[list[int]], *, stop_ids: list[int], sampling: Sampling) -> list[list[int]]:
        """One completion per prompt (stop token included), from ``model`` as it is now."""
        import torch

        live = live_model(model)
        engine = self._engine(live, stop_ids, max(map(len, prompt_ids)) + sampling.max_new_tokens)
        # seeds from torch's generator: a run is reproducible under train.seed like TRL's sampling
        seeds = torch.randint(0, 2**31 - 1, (len(prompt_ids),)).tolist()
        was_training = live.training
        live.eval()
        engine.runner.cache.attach(self._modules)
        try:
            seqs = [engine.submit(ids, max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                                  top_p=sampling.top_p, top_k=sampling.top_k,
                                  repetition_penalty=sampling.repetition_penalty, seed=seed)
                    for ids, seed in zip(prompt_ids, seeds)]
            for seq in seqs:
                seq.done.wait()
        except BaseException:
            self.close()  # interrupted with steps in flight: stop the engine before the model moves on
            raise
        finally:
            engine.runner.cache.detach()
            live.train(was_training)
        failed = next((s for s in seqs if s.finish_reason in ("error", "cancelled")), None)
        if failed is not None:
            raise GlmtuneError(f"a rollout failed in glmtune's generation engine ({failed.error or engine.error}). "
                               f"Fix: set align.rollouts: generate to roll out with transformers generate")
        self.requests += len(seqs)
        if not self._said_graphs:
            self.say(f"rollouts: {engine.graphs_note}")
            self._said_graphs = True
        return [list(s.tokens) for s in seqs]

    def _engine(self, live, stop_ids: list[int], needed: int):
        from glmtune.infer.engine import EngineSettings, create_engine
        from glmtune.infer.engine.attention import CACHE_K

        if self.engine is not None and (needed > self.engine.max_positions or set(stop_ids) != self.engine.stop_ids):
            self.close()
        if self.engine is None:
            self.positions = max(self.positions, needed)
            # no prefix store: the copies of a prompt are admitted together, before any is prefilled,
            # so it would hold slots and never hit; no compile: a one-off minute a short run never earns;
            # no prefill graphs: a rollout's prompts come at once, in large prefills graphs earn little
            settings = EngineSettings(max_model_len=self.positions, max_slots=self.slots, prefix_cache=False,
                                      compile=False, prefill_graphs=False)
            self.engine, _, summary = create_engine(live, stop_ids=list(stop_ids), settings=settings)
            self._modules = {m.layer_idx: m for m in live.modules() if hasattr(m, CACHE_K)}
            self.engine.runner.cache.detach()  # attached for each rollout only (module docstring)
            self.say(f"rollouts: {summary}")
        return self.engine

    def close(self) -> None:
        """Stop the engine and free its KV cache and graphs (a later rollout starts a new one)."""
        if self.engine is not None:
            self.engine.close()
            self.engine, self._modules, self._said_graphs = None, {}, False
