"""Both packaged GGUF models import into folders that plain transformers loads, and the folders
generate exactly what the GGUF-loaded models generate."""
from __future__ import annotations

import gc

import pytest

pytestmark = pytest.mark.real_model
torch = pytest.importorskip("torch")

PROMPTS = {
    "smollm2": [("What is the capital of France?", ("paris",)),
                ("How many days are there in a week?", ("7", "seven")),
                ("Name a primary color.", ())],
    "qwen2.5-coder-0.5b": [("Write a Python function that adds two numbers.", ("def ",)),
                           ("What does the SQL keyword SELECT do?", ("select",)),
                           ("用一句话解释什么是递归。", ())],
}
DEFAULT_SYSTEM = {"smollm2": "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
                  "qwen2.5-coder-0.5b": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."}
ARCH = {"smollm2": "LlamaForCausalLM", "qwen2.5-coder-0.5b": "Qwen2ForCausalLM"}
PARAMS_M = {"smollm2": 134.5, "qwen2.5-coder-0.5b": 630.2}  # embeddings tied, counted once


def greedy(model, tok, question: str, max_new_tokens: int = 24) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, ids["input_ids"].shape[1]:].tolist()


@pytest.fixture(params=["smollm2", "qwen2.5-coder-0.5b"])
def imported(request):
    name = request.param
    fixture = {"smollm2": "smollm2_import", "qwen2.5-coder-0.5b": "qwen_coder_import"}[name]
    return name, *request.getfixturevalue(fixture)


def test_import_report_and_folder(imported, read_meta):
    name, out, report = imported
    assert report.architecture == ARCH[name]
    assert report.num_parameters / 1e6 == pytest.approx(PARAMS_M[name], abs=0.1)
    assert report.template == "qwen" and report.chat_template_kept
    assert report.max_abs_logit_diff == 0.0 and report.same_argmax  # same fp32 weights, same kernels
    meta = read_meta(out)
    assert meta["template"] == "qwen"
    assert meta["default_system"] == DEFAULT_SYSTEM[name]


def test_plain_transformers_greedy_matches_gguf(imported, packaged_gguf):
    """Load the folder with nothing but transformers and compare greedy tokens with the GGUF model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from glmtune.models.gguf import gguf_single_file, load_gguf_model, load_gguf_tokenizer

    name, out, _ = imported
    folder_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    folder_tok = AutoTokenizer.from_pretrained(out)
    with gguf_single_file(packaged_gguf(name)) as path:
        gguf_model, gguf_tok = load_gguf_model(path, "fp32"), load_gguf_tokenizer(path)
    for question, expected in PROMPTS[name]:
        a, b = greedy(folder_model, folder_tok, question), greedy(gguf_model, gguf_tok, question)
        assert a == b, (question, folder_tok.decode(a), gguf_tok.decode(b))
        answer = folder_tok.decode(a, skip_special_tokens=True)
        if expected:  # a sanity check that dequantisation gave a working model, not just equal ones
            assert any(e in answer.lower() for e in expected), (question, answer)
    del folder_model, gguf_model
    gc.collect()
