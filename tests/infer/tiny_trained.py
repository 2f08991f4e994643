"""A tiny GLM-4 model trained in a few seconds to answer a handful of questions.

Random weights answer gibberish that rarely hits a stop token; a model that has learned real
answers and when to stop exercises the whole path (metadata line, stop ids, streaming) the way a
fine-tuned checkpoint does. Trained with a plain torch loop on the template's own ids and labels.
"""
from __future__ import annotations

from pathlib import Path

QA = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("你好", "你好！我是一个小模型。"),
    ("Name a primary colour.", "Red is a primary colour."),
]
SYSTEM_QA = ("You are a pirate.", "What is the capital of France?", "Arr, it be Paris!")

_BUILT: dict[str, Path] = {}


def conversations() -> list[list[dict]]:
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in QA]
    system, q, a = SYSTEM_QA
    convs.append([{"role": "system", "content": system}, {"role": "user", "content": q},
                  {"role": "assistant", "content": a}])
    # A two-turn conversation, so history in the prompt is part of what the model saw.
    convs.append(convs[0][:2] + [{"role": "user", "content": QA[1][0]},
                                 {"role": "assistant", "content": QA[1][1]}])
    return convs


def trained_tiny_glm4(root: Path, tokenizer_dir: Path, steps: int = 300) -> Path:
    """The trained model folder: built once, then reused from an on-disk cache keyed by this file's
    source and the torch/transformers versions (training takes 15-90 s on 2 busy cores)."""
    return _cached("glm4", lambda: _train_tiny_glm4(root, tokenizer_dir, steps), f"{steps}{tokenizer_dir}")


def _cached(name: str, build, key_extra: str) -> Path:
    if name in _BUILT:
        return _BUILT[name]
    import hashlib
    import os
    import shutil

    import torch
    import transformers

    import glmtune.templates as templates
    sources = [Path(__file__)] + sorted(Path(templates.__file__).parent.glob("*.py"))
    key = hashlib.sha256(b"".join(p.read_bytes() for p in sources) + f"{torch.__version__}"
                         f"{transformers.__version__}{key_extra}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("GLMTUNE_CACHE_DIR", Path.home() / ".cache" / "glmtune")) / "test-models"
    final = cache / f"tiny-{name}-trained-{key}"
    if not (final / "glmtune.json").exists():
        built = build()
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".{final.name}.{os.getpid()}"
        shutil.copytree(built, tmp)
        try:
            os.replace(tmp, final)  # atomic: concurrent test runs never see half a folder
        except OSError:  # another run finished first
            shutil.rmtree(tmp, ignore_errors=True)
    _BUILT[name] = final
    return final


def _train_tiny_glm4(root: Path, tokenizer_dir: Path, steps: int) -> Path:
    import torch

    from glmtune.models.tiny import build_tiny_glm4
    from glmtune.models.tokenizer import load_tokenizer
    from glmtune.templates import get_template

    out = build_tiny_glm4(root / "tiny-glm4-trained", tokenizer_dir, seed=0)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok, tpl = load_tokenizer(out), get_template("glm4")
    return _learn_and_save(model, [tpl.encode(tok, c) for c in conversations()], steps, out)


def _learn_and_save(model, encs, steps: int, out):
    """Train ``model`` on the encoded conversations (padded batch) until it knows them; save it to ``out``."""
    import torch

    width = max(len(e) for e in encs)
    ids = torch.tensor([e.input_ids + [0] * (width - len(e)) for e in encs])
    labels = torch.tensor([e.labels + [-100] * (width - len(e)) for e in encs])
    mask = (torch.arange(width)[None, :] < torch.tensor([len(e) for e in encs])[:, None]).long()
    loss = _train(model, ids, mask, labels, steps)
    assert loss < 0.1, f"tiny model did not learn its answers (loss {loss:.3f})"
    model.eval().save_pretrained(out)
    return out


def _train(model, ids, mask, labels, steps: int) -> float:
    """Full-batch Adam, exact but cheap: the LM head rows of tokens the answers never use are set to
    zero and frozen, so their logits are 0 and their softmax mass is one constant column
    (log of their count); only the used rows (~100 of 151,552) are trained. The saved model is an
    ordinary model whose full-vocabulary softmax is exactly the one trained."""
    import math

    import torch
    import torch.nn.functional as F

    head = model.lm_head.weight
    targets = labels[:, 1:]
    pos = targets != -100  # (B, T-1): positions whose next token is trained
    used, target_idx = torch.unique(targets[pos], return_inverse=True)
    rows = torch.nn.Parameter(head.detach()[used].clone())
    rest = torch.tensor([[math.log(head.shape[0] - len(used))]])
    model.model.embed_tokens.requires_grad_(False)  # random input embeddings are fine; saves time
    head.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad] + [rows]
    opt = torch.optim.Adam(params, lr=1e-2)
    torch.manual_seed(0)
    model.train()
    for _ in range(steps):
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1][pos]
        logits = torch.cat([hidden @ rows.T, rest.expand(len(hidden), 1)], 1)
        loss = F.cross_entropy(logits, target_idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        head.zero_()
        head[used] = rows
    head.requires_grad_(True)
    model.model.embed_tokens.requires_grad_(True)
    return loss.item()


# -- a tiny model that speaks GLM-4.5 (glm45 template, GLM-4.5 tokenizer): thinks, calls tools ---------
WEATHER_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
GLM45_CALL = {"role": "assistant", "content": "", "reasoning_content": "需要查天气。",
              "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}]}
GLM45_CONVERSATIONS = [  # (messages, tools)
    ([{"role": "user", "content": "北京天气？"}, GLM45_CALL], WEATHER_TOOLS),
    ([{"role": "user", "content": "北京天气？"}, GLM45_CALL, {"role": "tool", "content": "晴，25 度"},
      {"role": "assistant", "content": "北京晴，25 度。", "reasoning_content": "工具说晴。"}], WEATHER_TOOLS),
    ([{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！", "reasoning_content": "打招呼。"}], None),
]


def trained_tiny_glm45(root: Path, tokenizer_dir: Path, steps: int = 300) -> Path:
    """A tiny GLM-4-architecture model trained on GLM45_CONVERSATIONS with the glm45 template and a
    GLM-4.5 tokenizer folder (cached on disk like trained_tiny_glm4; the tokenizer folder is built per
    session, so the key names its added tokens instead of its path)."""
    from glmtune.models.tokenizer import GLM45_SPECIALS

    return _cached("glm45", lambda: _train_tiny_glm45(root, tokenizer_dir, steps), f"{steps}{GLM45_SPECIALS}")


def _train_tiny_glm45(root: Path, tokenizer_dir: Path, steps: int) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    from glmtune.models.folder import write_glmtune_meta
    from glmtune.models.tiny import build_tiny_glm4
    from glmtune.models.tokenizer import load_tokenizer
    from glmtune.templates import get_template

    out = build_tiny_glm4(root / "tiny-glm45-trained", tokenizer_dir, seed=0)
    write_glmtune_meta(out, template="glm45")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok, tpl = load_tokenizer(out), get_template("glm45")
    return _learn_and_save(model, [tpl.encode(tok, msgs, tools=tools) for msgs, tools in GLM45_CONVERSATIONS],
                           steps, out)
