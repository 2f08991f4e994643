"""Classification-evaluation throughput (issue 4 / issue 6): constrained vs generate, CMCC-like prompts.

GLM-4-9B-0414's shape with random bf16 weights (or `--layers/--hidden` for a CPU dry run), the real
GLM-4 tokenizer, the CMCC-34 system prompt (the 34 intents, ~400 tokens, shared by all samples) and
dialogues of 300-700 tokens built from the bundled CMCC sample (turns joined by [SEP]).

  constrained  glmtune's label scoring: shared system-prompt KV computed once, the 34 answers as one
               trie after each dialogue, one forward per batch (glmtune.evaluate.label_scoring)
  generate     batched greedy `generate` with the template's stop ids, then parsing: the seed's method
               (bf16 here; the seed ran it in 4-bit)

With random weights greedy never writes a valid label, so generate runs to its token limit, as an
untrained or confused model does; agreement of the two modes is tested on CPU (tests/evaluate).
Prints one JSON line per measurement.

  python3 bench/eval_throughput.py --tokenizer .device_data/glm4-tokenizer --n 256 --gen-n 64
"""
import argparse
import json
import time

import numpy as np
import torch

p = argparse.ArgumentParser()
p.add_argument("--tokenizer", required=True)
p.add_argument("--layers", type=int, default=40)
p.add_argument("--hidden", type=int, default=4096)
p.add_argument("--n", type=int, default=256, help="samples for constrained mode")
p.add_argument("--gen-n", type=int, default=64, help="samples for generate mode")
p.add_argument("--batch", default="16,32", help="constrained batch sizes")
p.add_argument("--gen-batch", type=int, default=32)
p.add_argument("--liger", action="store_true", help="liger RMSNorm + SwiGLU kernels (inference: no fused CE)")
p.add_argument("--compile", action="store_true", help="regional torch.compile of the decoder layers")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
args = p.parse_args()

from transformers import Glm4Config, Glm4ForCausalLM  # noqa: E402

from glmtune.data.cmcc import CMCC_INTENTS, cmcc_answer, cmcc_system_prompt  # noqa: E402
from glmtune.evaluate.classify import LabelSet, classify  # noqa: E402
from glmtune.infer.predictor import Predictor  # noqa: E402
from glmtune.models.tokenizer import load_tokenizer  # noqa: E402


def build_model():
    from glmtune.models import speed
    if args.liger:
        speed.apply_liger("glm4", fused_linear_cross_entropy=False, rms_norm=True, swiglu=True)
    big = args.hidden == 4096
    cfg = Glm4Config(hidden_size=args.hidden, intermediate_size=13696 if big else args.hidden * 3,
                     num_hidden_layers=args.layers, num_attention_heads=32 if big else 4,
                     num_key_value_heads=2, head_dim=128 if big else args.hidden // 4, vocab_size=151552,
                     max_position_embeddings=32768, rms_norm_eps=1.5625e-07, partial_rotary_factor=0.5,
                     attention_bias=True, tie_word_embeddings=False, pad_token_id=151329,
                     eos_token_id=[151329, 151336, 151338])
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.set_default_dtype(dtype)
    with torch.device(args.device):
        model = Glm4ForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.config._attn_implementation = "sdpa"
    if args.compile:
        speed.compile_decoder_layers(model)
    return model.eval()


def dialogues(tok, n: int, rng) -> list[tuple[str, int]]:
    """Dialogues of 300-700 tokens from the bundled CMCC sample's turns, each with a random intent."""
    import csv
    from importlib.resources import files
    path = files("glmtune.resources.sample") / "cmcc34_sample.csv"
    with open(path, encoding="utf-8") as f:
        turns = [t for row in csv.DictReader(f) for t in row["sentence_sep"].split("[SEP]") if t.strip()]
    out = []
    for _ in range(n):
        target, parts, length = int(rng.integers(300, 700)), [], 0
        while length < target:
            t = turns[int(rng.integers(len(turns)))]
            parts.append(t)
            length += len(tok.encode(t + "[SEP]", add_special_tokens=False))
        out.append(("[SEP]".join(parts), int(rng.integers(0, 34))))
    return out


def main():
    tok = load_tokenizer(args.tokenizer)
    rng = np.random.default_rng(0)
    system = cmcc_system_prompt()
    data = dialogues(tok, max(args.n, args.gen_n), rng)
    records = [{"messages": [{"role": "system", "content": system}, {"role": "user", "content": d},
                             {"role": "assistant", "content": cmcc_answer(y)}], "label": y} for d, y in data]
    names = [str(i) for i in sorted(CMCC_INTENTS)]
    labels = LabelSet(names, {n: cmcc_answer(int(n)) for n in names})
    model = build_model()
    predictor = Predictor.from_model(model, tok, "glm4")
    sys_tokens = len(tok.encode(system, add_special_tokens=False))
    prompt_lens = [len(predictor.template.encode_prompt(tok, r["messages"][:-1])) for r in records]
    base = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "torch": torch.__version__, "layers": args.layers, "hidden": args.hidden,
            "liger": args.liger, "compile": args.compile, "system_prompt_tokens": sys_tokens, "mean_prompt_tokens": float(np.mean(prompt_lens))}
    classify(predictor, records[:8], labels, "constrained", batch_size=8)  # warm-up (kernels, allocator)
    results = {}
    for bs in [int(b) for b in args.batch.split(",")]:
        if args.device == "cuda":
            torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        res = classify(predictor, records[:args.n], labels, "constrained", batch_size=bs)
        if args.device == "cuda":
            torch.cuda.synchronize()
        results[f"constrained_b{bs}"] = res
        print(json.dumps({**base, "mode": "constrained", "batch": bs, "n": args.n,
                          "samples_per_s": round(args.n / res.seconds, 2), "seconds": round(res.seconds, 2),
                          "peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if args.device == "cuda" else None,
                          "invalid": sum(y is None for y in res.y_pred)}), flush=True)
    if args.gen_n:
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        res = classify(predictor, records[:args.gen_n], labels, "generate", batch_size=args.gen_batch)
        print(json.dumps({**base, "mode": "generate", "batch": args.gen_batch, "n": args.gen_n,
                          "samples_per_s": round(args.gen_n / res.seconds, 2), "seconds": round(res.seconds, 2),
                          "peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if args.device == "cuda" else None,
                          "invalid": sum(y is None for y in res.y_pred)}), flush=True)
        # Same predictions where greedy wrote a valid label (none expected with random weights).
        con = next(iter(results.values()))
        exact = {labels.answers[n]: n for n in names}
        valid = [i for i, t in enumerate(res.raw_outputs) if t in exact]
        agree = sum(con.y_pred[i] == exact[res.raw_outputs[i]] for i in valid)
        print(json.dumps({"agreement_where_generate_valid": f"{agree}/{len(valid)}"}), flush=True)


if __name__ == "__main__":
    main()
