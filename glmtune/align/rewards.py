"""Rewards for GRPO/PPO, as TRL reward functions: `fn(prompts, completions, **columns) -> list[float]`.

TRL passes every dataset column as a keyword list aligned with the completions; glmtune's prompt rows
carry `label`, `references` (gold answers), `bad_answers` and `answer` (glmtune.align.data). A YAML
entry `{name, weight, options}` is built by :func:`build_rewards`: `name` is one of REWARDS or a
`module:function` (a plain TRL reward function, or a factory taking `(context, **options)` when it
is marked with `glmtune_factory = True`).

Each reward reuses the code its evaluation counterpart uses, so metric and reward cannot drift:
`label` parses answers with `glmtune.evaluate.classify.parse_label`, `judge` builds the prompt with
`glmtune.evaluate.judge.build_messages`, `reward_model` encodes with glmtune's template.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from glmtune.errors import ConfigError

RewardFn = Callable[..., list[float]]


@dataclass
class RewardContext:
    """What a reward may need besides the completions: the training records and the template."""
    records: list[dict]
    template: Any = None
    tokenizer: Any = None
    prompt_messages: dict[str, list[dict]] = field(default_factory=dict)  # rendered prompt -> conversation


def _named(fn: RewardFn, name: str) -> RewardFn:
    fn.__name__ = name  # TRL logs rewards/<name>/mean by the function's name
    return fn


# -- label -----------------------------------------------------------------------------------------
def label_reward(ctx: RewardContext, labels: list[str] | None = None) -> RewardFn:
    """1.0 when the completion parses to the gold `label` (evaluation's parser: exact answer text of a
    label, a CMCC intent id, or the bare label name), else 0.0."""
    from glmtune.evaluate.classify import parse_label

    by_answer: dict[str, str] = {}
    for rec in ctx.records:
        if rec.get("label") is not None and rec["messages"][-1]["role"] == "assistant":
            by_answer.setdefault(rec["messages"][-1]["content"].strip(), str(rec["label"]))
    names = list(labels or sorted({str(r["label"]) for r in ctx.records if r.get("label") is not None}))
    if not names:
        raise ConfigError("the label reward needs records with a `label`", field="align.rewards",
                          fix="use classification data (glmtune data convert) or another reward")

    def label(prompts, completions, label=None, **_):
        gold = label or [None] * len(completions)
        return [float(g is not None and parse_label(c, by_answer, names) == g) for c, g in zip(completions, gold)]
    return _named(label, "label")


# -- format ----------------------------------------------------------------------------------------
def format_reward(ctx: RewardContext, pattern: str = r"^\S[\s\S]*$", full: bool = True) -> RewardFn:
    """1.0 when the completion matches `pattern` (re.fullmatch, or re.search with full: false)."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"invalid regex ({e})", field="align.rewards.options.pattern") from None
    match = rx.fullmatch if full else rx.search

    def format(prompts, completions, **_):  # noqa: A001 - the reward's YAML name
        return [float(match(c.strip()) is not None) for c in completions]
    return _named(format, "format")


# -- length ----------------------------------------------------------------------------------------
def length_reward(ctx: RewardContext, max_chars: int = 400) -> RewardFn:
    """0 up to max_chars, then -(excess / max_chars): a penalty, to add beside a quality reward."""
    def length(prompts, completions, **_):
        return [-max(0, len(c) - max_chars) / max_chars for c in completions]
    return _named(length, "length")


# -- similarity (the RLHF starter kit's reward) -------------------------------------------------------
def jaccard(a: str, b: str, unit: str = "word") -> float:
    """|A & B| / |A | B| over word or character sets (1.0 for two empty texts)."""
    sa, sb = (set(a.split()), set(b.split())) if unit == "word" else (set(a), set(b))
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def similarity_scores(texts: list[str], refs: list[list[str]], encode, cosine_weight: float,
                      jaccard_weight: float) -> list[float]:
    """Per text: max over its references of cosine_weight * cos + jaccard_weight * mean(word, char Jaccard);
    0.0 where a text has no references. `encode(list[str]) -> (N, d)` normalised embeddings."""
    flat = [r for rs in refs for r in rs]
    if not flat:
        return [0.0] * len(texts)
    emb_t, emb_r = encode(texts), encode(flat)
    out, k = [], 0
    for i, rs in enumerate(refs):
        scores = [cosine_weight * float((emb_t[i] * emb_r[k + j]).sum())
                  + jaccard_weight * (jaccard(texts[i], r, "word") + jaccard(texts[i], r, "char")) / 2
                  for j, r in enumerate(rs)]
        out.append(max(scores, default=0.0))
        k += len(rs)
    return out


def similarity_reward(ctx: RewardContext, model: str | None = None, cosine_weight: float = 0.5,
                      jaccard_weight: float = 0.5, bad_weight: float = 1.0) -> RewardFn:
    """Similarity to the gold answers (`references`) minus bad_weight x similarity to `bad_answers`;
    similarity = cosine_weight x sentence-transformers cosine + jaccard_weight x word/char Jaccard."""
    from glmtune.infer.rag import default_embedding_model
    state: dict = {}

    def encode(texts: list[str]):
        if "model" not in state:  # loaded at the first call: building the trainer stays cheap
            from sentence_transformers import SentenceTransformer
            state["model"] = SentenceTransformer(str(model or default_embedding_model()), device="cpu")
        return state["model"].encode(texts, normalize_embeddings=True, convert_to_tensor=True)

    def similarity(prompts, completions, references=None, bad_answers=None, **_):
        n = len(completions)
        good = similarity_scores(completions, references or [[]] * n, encode, cosine_weight, jaccard_weight)
        bad = similarity_scores(completions, bad_answers or [[]] * n, encode, cosine_weight, jaccard_weight)
        return [g - bad_weight * b for g, b in zip(good, bad)]
    return _named(similarity, "similarity")


# -- reward model ----------------------------------------------------------------------------------
def load_reward_model(path: str):
    """A folder written by `glmtune align rm` (OUT/final): a LoRA adapter on a sequence-classification
    head over its base model, or a whole model. Returns (model, tokenizer, template)."""
    from pathlib import Path

    import torch
    from transformers import AutoModelForSequenceClassification

    from glmtune.models.tokenizer import load_tokenizer
    from glmtune.models.folder import read_model_folder
    from glmtune.templates import get_template

    folder = Path(path)
    meta = read_model_folder(folder).meta
    if not meta:
        raise ConfigError(f"{folder} is not a reward model written by `glmtune align rm` (no glmtune.json)",
                          field="align.rewards.options.path")
    base = meta.get("base_model") or str(folder)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.float32)
    if (folder / "adapter_config.json").exists():
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, folder).merge_and_unload()
    tokenizer = load_tokenizer(folder)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer, get_template(**read_model_folder(base).template_args(meta.get("template")))


def reward_model_reward(ctx: RewardContext, path: str | None = None, batch_size: int = 8) -> RewardFn:
    """The scalar score of a reward model trained with `glmtune align rm`, on the prompt + completion
    encoded with the RM's glmtune template (the ids it was trained on)."""
    import torch
    if not path:
        raise ConfigError("the reward_model reward needs options.path (a `glmtune align rm` OUT/final)",
                          field="align.rewards.options.path")
    model, tok, tpl = load_reward_model(path)

    def conversation_ids(prompt: str, completion: str) -> list[int]:
        # the ids of an `align rm` row (glmtune.align.data.reward_model_rows): prompt + the answer's ids
        msgs = ctx.prompt_messages[prompt]
        prompt_ids = tpl.encode_prompt(tok, msgs)
        return prompt_ids + tpl.answer_ids(tok, msgs, completion or " ", prompt_ids=prompt_ids)

    @torch.no_grad()
    def reward_model(prompts, completions, **_):
        scores = []
        for i in range(0, len(completions), batch_size):
            ids = [conversation_ids(p, c) for p, c in zip(prompts[i:i + batch_size], completions[i:i + batch_size])]
            scores += score_ids(model, ids, tok.pad_token_id)
        return scores
    return _named(reward_model, "reward_model")


def score_ids(model, ids: list[list[int]], pad_id: int) -> list[float]:
    """Reward-model scores of right-padded id lists (the head reads each row's last real token)."""
    import torch
    width = max(len(x) for x in ids)
    batch = torch.tensor([x + [pad_id] * (width - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    return model(input_ids=batch, attention_mask=mask).logits[:, 0].float().tolist()


# -- judge -----------------------------------------------------------------------------------------
def judge_reward(ctx: RewardContext, url: str | None = None, model: str = "judge", rubric: str = "general",
                 api_key: str | None = None, retries: int = 1) -> RewardFn:
    """An OpenAI-compatible judge scores each completion with `glmtune eval judge`'s rubric prompt;
    the score is mapped to [0, 1] on the rubric's scale (0 when no valid score comes back)."""
    from glmtune.evaluate.judge import OpenAIChatJudge, build_messages, judge_one, resolve_rubric
    if not url:
        raise ConfigError("the judge reward needs options.url (an OpenAI-compatible /v1 endpoint)",
                          field="align.rewards.options.url")
    template, scale = resolve_rubric(rubric)
    if scale is None:
        raise ConfigError("the judge reward needs a preset rubric (general, ielts) for its score scale",
                          field="align.rewards.options.rubric")
    client = OpenAIChatJudge(url, model, api_key=api_key)

    def judge(prompts, completions, references=None, **_):
        out = []
        for i, (p, c) in enumerate(zip(prompts, completions)):
            question = "\n".join(m["content"] for m in ctx.prompt_messages.get(p, []) if m["role"] == "user") or p
            row = {"question": question, "prediction": c,
                   "reference": (references[i][0] if references and references[i] else None)}
            score = judge_one(client, build_messages(template, row, scale), scale, retries)["score"]
            out.append(0.0 if score is None else (score - scale.lo) / (scale.hi - scale.lo))
        return out
    return _named(judge, "judge")


REWARDS: dict[str, Callable[..., RewardFn]] = {
    "label": label_reward, "format": format_reward, "similarity": similarity_reward, "length": length_reward,
    "reward_model": reward_model_reward, "judge": judge_reward,
}


def _import_reward(name: str, where: str) -> Callable:
    module, _, attr = name.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot import reward {name!r} ({e})", field=where,
                          fix="give module:function of an importable module") from None


def build_rewards(specs: list, ctx: RewardContext) -> tuple[list[RewardFn], list[float]]:
    """YAML reward specs -> (TRL reward functions, weights). Unknown names fail naming the YAML key."""
    fns, weights = [], []
    for i, spec in enumerate(specs):
        where = f"align.rewards.{i}.name"
        if spec.name in REWARDS:
            factory = REWARDS[spec.name]
        elif ":" in spec.name:
            fn = _import_reward(spec.name, where)
            factory = fn if getattr(fn, "glmtune_factory", False) else None
            if factory is None:
                fns.append(fn)
                weights.append(spec.weight)
                continue
        else:
            raise ConfigError(f"unknown reward {spec.name!r}", field=where,
                              fix=f"use one of {', '.join(REWARDS)} or module:function")
        try:
            fns.append(factory(ctx, **spec.options))
        except TypeError as e:
            raise ConfigError(f"bad options for reward {spec.name!r} ({e})", field=f"align.rewards.{i}.options") from None
        weights.append(spec.weight)
    return fns, weights
