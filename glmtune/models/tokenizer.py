"""Tokenizer loading without remote code.

GLM-family checkpoints ship a custom Python tokenizer (`tokenization_chatglm.py`) that needs
``trust_remote_code``. We never run remote code, so their ``tokenizer.model`` files are converted
into ordinary ``tokenizers`` fast tokenizers that produce the same ids:

- GLM-4: ``tokenizer.model`` is a tiktoken rank file (``<base64> <rank>`` lines); special tokens
  follow the last rank in a fixed order.
- ChatGLM2/3: ``tokenizer.model`` is a SentencePiece BPE model; ChatGLM encodes text with plain
  ``SentencePieceProcessor.encode`` (dummy-prefix ``▁`` on every separately encoded piece) and adds
  its special tokens after the 64,789 pieces.

Conversion of the 151k-rank GLM-4 file takes a few seconds, so the converted ``tokenizer.json`` is
cached under ``$GLMTUNE_CACHE_DIR`` (default ``~/.cache/glmtune``) keyed by the file's sha256.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from glmtune.errors import InputError, ModelNotFoundError
from glmtune.io import cache_dir, write_text_atomic
from glmtune.models.folder import is_tiktoken_file, read_model_folder

# ChatGLM4Tokenizer's pre-tokenizer pattern (the cl100k_base one) and special tokens, whose ids
# start right after the last BPE rank (151329 for glm-4-9b-chat).
GLM4_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GLM4_SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>",
                 "<|user|>", "<|assistant|>", "<|observation|>", "<|begin_of_image|>",
                 "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>"]
# GLM-4.5+ (GLM-4.5/4.6/4.7, GLM-4.7-Flash) ship the GLM-4 vocabulary with these added tokens, ids 151343..151364
# in this order. Checked against public copies (no hub access here): a GLM-4.5-Air GGUF's load log (ik_llama.cpp
# PR #689 thread, 2025-08-14) names 151343-151349 (<|begin_of_audio|> .. <|code_suffix|>), 151360 /nothink,
# 151361-151364 (box, image, video) and 36 special tokens in all (151329..151364); SGLang's
# Glm4MoeThinkingBudgetLogitProcessor pins <think> 151350 / </think> 151351; transformers' Glm4vMoeConfig
# defaults image_token_id 151363 / video_token_id 151364. The eight tool tags fill 151352..151359, the ids left;
# their order among themselves (<tool_call> 151352 .. </arg_value> 151359) is not confirmed by a public copy.
# GLM-5.x (glm_moe_dsa) has another vocabulary (<|endoftext|> 154820, <think> 154841): its folder's tokenizer is used.
GLM45_SPECIALS = ["<|begin_of_audio|>", "<|end_of_audio|>", "<|begin_of_transcription|>",
                  "<|end_of_transcription|>", "<|code_prefix|>", "<|code_middle|>", "<|code_suffix|>",
                  "<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
                  "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>", "/nothink", "<|begin_of_box|>",
                  "<|end_of_box|>", "<|image|>", "<|video|>"]
# ChatGLM2/3 specials, appended after the sentencepiece vocabulary (64789 pieces) in this order.
CHATGLM2_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]
CHATGLM3_SPECIALS = CHATGLM2_SPECIALS + ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
# ChatGLM3's official chat template (its early tokenizer_config.json has none).
CHATGLM3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}[gMASK]sop<|{{ message['role'] }}|>\n "
    "{{ message['content'] }}{% else %}<|{{ message['role'] }}|>\n {{ message['content'] }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")

_CONVERTER_VERSION = "1"  # bump when the conversion changes, so stale caches are not reused


PACKAGED_TOKENIZERS = Path(__file__).resolve().parents[1] / "resources" / "tokenizers"


def packaged_tokenizer_dir(family: str) -> Path:
    """A tokenizer folder that ships inside the package (glm4: GLM-4's, with its licence)."""
    path = PACKAGED_TOKENIZERS / family
    if not path.is_dir():
        raise ModelNotFoundError(path, f"a packaged tokenizer (glmtune ships: "
                                       f"{', '.join(sorted(p.name for p in PACKAGED_TOKENIZERS.iterdir()))})")
    return path


def load_tokenizer(path: str | Path, *, family: str | None = None):
    """Load a local tokenizer folder as a ``PreTrainedTokenizerFast`` (never remote code).

    ``family`` (glm4/chatglm3/chatglm2) overrides detection when a sentencepiece folder does not
    say whether it is ChatGLM2 or ChatGLM3 (they share the same ``tokenizer.model``).
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelNotFoundError(path)
    if (path / "tokenizer.json").exists():
        return _load_hf_folder(path)
    model_file = path / "tokenizer.model"
    if not model_file.exists():
        raise ModelNotFoundError(path, "tokenizer.json or tokenizer.model")
    folder = read_model_folder(path)
    if is_tiktoken_file(model_file):
        return _glm4_tokenizer(model_file, folder.tokenizer_config)
    family = family or folder.family or "chatglm3"
    if family not in ("chatglm2", "chatglm3"):
        raise InputError(f"tokenizer.model is a sentencepiece model but the family is '{family}'",
                         file=model_file, fix="pass family='chatglm2' or 'chatglm3'")
    return _chatglm_tokenizer(model_file, family)


def glm45_tokenizer(glm4_tokenizer_dir: str | Path):
    """The GLM-4.5+ tokenizer built from a GLM-4 one: GLM45_SPECIALS added at their official ids (151343..).
    For tiny test and demo folders; a real GLM-4.5/4.6/4.7 folder ships its own."""
    tok = load_tokenizer(glm4_tokenizer_dir)
    first = len(tok)
    if first != 151343:  # the ids only land where GLM-4.5 has them on GLM-4's exact vocabulary
        raise InputError(f"a GLM-4 tokenizer has 151343 tokens, this one {first}", file=glm4_tokenizer_dir,
                         fix="build the GLM-4.5 tokenizer from glm-4-9b-chat's (glmtune/resources/tokenizers/glm4)")
    tok.add_special_tokens({"additional_special_tokens": GLM45_SPECIALS})
    return tok


def _load_hf_folder(path: Path):
    """A normal HF tokenizer folder; remote tokenizer classes fall back to the generic fast class."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(path, use_fast=True, trust_remote_code=False,
                                             local_files_only=True)
    except (ValueError, OSError, ImportError, AttributeError, KeyError):
        return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)


def _cache_dir() -> Path:
    return cache_dir("tokenizers")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@functools.lru_cache(maxsize=8)
def _converted_json(model_file: str, kind: str, mtime_ns: int) -> str:
    """tokenizer.json text for a converted model file; disk-cached by sha256, memoised per process.

    ``mtime_ns`` is part of the memo key only so an edited file is not served stale.
    """
    path = Path(model_file)
    cached = _cache_dir() / f"{kind}-{_sha256(path)}-v{_CONVERTER_VERSION}.json"
    if cached.exists():
        return cached.read_text(encoding="utf-8")
    tok = _convert_tiktoken(path) if kind == "glm4" else _convert_sentencepiece(path, kind)
    text = tok.to_str()
    try:
        write_text_atomic(cached, text)
    except OSError:
        pass  # a read-only home only costs the conversion time again
    return text


def _convert_tiktoken(path: Path):
    """GLM-4 ranks -> byte-level BPE with the cl100k split and GLM-4's special tokens."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=str(path), pattern=GLM4_PATTERN,
                            extra_special_tokens=GLM4_SPECIALS).converted()
    # Like ChatGLM4Tokenizer.build_inputs_with_special_tokens: `[gMASK]<sop>` before plain text.
    tok.post_processor = _prefix_processor(tok, "[gMASK]", "<sop>", "<|endoftext|>")
    return tok


def _convert_sentencepiece(path: Path, kind: str):
    """ChatGLM sentencepiece BPE -> tokenizers BPE that reproduces ``sp.encode`` piece for piece.

    sentencepiece (this model: identity normaliser, dummy prefix, byte fallback, whitespace-only
    pieces allowed) splits text into words that start at the first ``▁`` of a whitespace run, then
    merges pairs by the score of the merged piece. Pieces are stored best score first, so the merge
    rank is the merged piece's id. The normaliser runs on each stretch of text between special
    tokens, which gives every stretch its own dummy prefix, exactly like ChatGLM encoding each
    piece of a prompt with a separate ``sp.encode`` call.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    proto = pb.ModelProto()
    proto.ParseFromString(path.read_bytes())
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    merges = []
    for piece, idx in vocab.items():
        if proto.pieces[idx].type != 1 or len(piece) < 2:  # only normal pieces come from merges
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((idx, vocab[left], vocab[right], left, right))
    merges.sort()
    tok = Tokenizer(BPE(vocab, [(m[3], m[4]) for m in merges], unk_token="<unk>",
                        byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("▁+[^▁]*|[^▁]+"), behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    specials = CHATGLM3_SPECIALS if kind == "chatglm3" else CHATGLM2_SPECIALS
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t in ["<unk>", "<s>", "</s>"] + specials])
    tok.post_processor = _prefix_processor(tok, "[gMASK]", "sop", "</s>")
    return tok


def _prefix_processor(tok, gmask: str, sop: str, eos: str):
    """Post-processor adding the GLM prefix when a caller asks for special tokens."""
    from tokenizers import processors

    ids = [(t, tok.token_to_id(t)) for t in (gmask, sop, eos)]
    return processors.TemplateProcessing(
        single=f"{gmask}:0 {sop}:0 $A:0", pair=f"{gmask}:0 {sop}:0 $A:0 $B:1 {eos}:1",
        special_tokens=ids)


def _glm4_tokenizer(model_file: Path, tok_cfg: dict):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer.from_str(_converted_json(str(model_file), "glm4", model_file.stat().st_mtime_ns))
    first_special = raw.token_to_id("<|endoftext|>")
    if first_special != _count_lines(model_file):
        raise InputError(f"special tokens start at id {first_special}, not after the last rank",
                         file=model_file, fix="use the tokenizer.model of a GLM-4 checkpoint")
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", clean_up_tokenization_spaces=False,
                                  model_max_length=tok_cfg.get("model_max_length", 128000))
    tok.chat_template = tok_cfg.get("chat_template")
    return tok


@functools.lru_cache(maxsize=8)
def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _chatglm_tokenizer(model_file: Path, family: str):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer.from_str(_converted_json(str(model_file), family, model_file.stat().st_mtime_ns))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>", pad_token="<unk>",
                                  clean_up_tokenization_spaces=False)
    # ChatGLM's pad id is its unk id (0); the chat template is only known for ChatGLM3.
    tok.chat_template = CHATGLM3_CHAT_TEMPLATE if family == "chatglm3" else None
    return tok
