"""Load a causal LM and its tokenizer from a local folder. Never downloads."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from glmtune.errors import GlmtuneError, InputError, ModelNotFoundError

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def check_model_dir(path: str | Path, *, trust_remote_code: bool = False) -> Path:
    """Fail early, with what to do, when a model folder is missing, incomplete, or remote-code
    ChatGLM (unless the caller explicitly trusts its code). Every command that loads a model
    passes through here."""
    path = Path(path)
    if not path.is_dir():
        raise ModelNotFoundError(path)
    if not (path / "config.json").exists():
        raise ModelNotFoundError(path, "config.json")
    if not any(any(path.glob(p)) for p in WEIGHT_PATTERNS):
        raise ModelNotFoundError(path, "the weight files (*.safetensors)")
    check_safetensors_files(path)
    if not trust_remote_code and is_remote_chatglm(path):
        raise GlmtuneError(f"{path} is a remote-code ChatGLM checkpoint (model_type chatglm, modeling_chatglm.py): "
                           f"glmtune does not run a model folder's own code. Fix: `glmtune model import-chatglm {path} "
                           f"--out {path}-native` and use the new folder (a training config may set model.trust_remote_code: "
                           f"true to run the folder's code instead).")
    return path


def check_safetensors_files(folder: str | Path) -> None:
    """Every ``*.safetensors`` file in ``folder`` is whole: its header parses and its size is what the
    header says. A copy or download cut short fails here as one line naming the file, before any
    loading starts; safe_open reads only the header (the weights are memory-mapped, not read)."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except SafetensorError as e:
            raise InputError(f"damaged weight file, probably cut short by a copy or download ({e})", file=file,
                             fix="copy or download this file again (compare its size with the original)") from None


def is_remote_chatglm(path: str | Path) -> bool:
    """See :attr:`glmtune.models.folder.ModelFolder.is_remote_chatglm` (an unreadable config: False)."""
    from glmtune.errors import InputError
    from glmtune.models.folder import read_model_folder

    try:
        return read_model_folder(path).is_remote_chatglm
    except InputError:
        return False


def load_model(path: str | Path, *, dtype: str = "auto", attn_implementation: str | None = None,
               device_map=None, quantization_config=None, **kwargs):
    """AutoModelForCausalLM.from_pretrained with local_files_only and a clear missing-folder error.

    A vision-language folder (:func:`is_vision_model`) loads through AutoModelForImageTextToText,
    the class its processor's pixel inputs go to; no remote code either way.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    path = check_model_dir(path, trust_remote_code=bool(kwargs.get("trust_remote_code")))
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    auto = AutoModelForImageTextToText if is_vision_model(path) else AutoModelForCausalLM
    return auto.from_pretrained(path, dtype=torch_dtype, local_files_only=True, device_map=device_map,
                                quantization_config=quantization_config, **extra, **kwargs)


def model_type(path: str | Path) -> str:
    """``model_type`` from a model folder's config.json ('' when absent)."""
    from glmtune.models.folder import read_model_folder

    return read_model_folder(path).model_type or ""


def is_vision_model(path: str | Path) -> bool:
    """True for image-text-to-text architectures (Qwen2-VL, GLM-4V, LLaVA, ...): they take images."""
    from glmtune.models.folder import read_model_folder

    return read_model_folder(path).is_vision


def load_processor(path: str | Path):
    """The folder's multimodal processor (AutoProcessor: image processor + tokenizer), no remote code.

    Image processors fall back to their PIL version without torchvision; some processors (Qwen2-VL,
    GLM-4V) also build a video processor, which needs torchvision: that is reported with the fix.
    """
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    try:
        return AutoProcessor.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (ImportError, AttributeError, TypeError, ValueError) as e:
        if not is_torchvision_available():
            raise GlmtuneError(f"{path}: this model's processor needs torchvision ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:160]}). Fix: install the torchvision build that "
                               f"matches your torch (CPU: pip install torchvision --index-url "
                               f"https://download.pytorch.org/whl/cpu)") from None
        raise GlmtuneError(f"{path}: cannot load the image processor ({e}). Fix: copy the model's "
                           f"processor files (preprocessor_config.json / processor_config.json) into the "
                           f"folder") from None


@dataclass(frozen=True)
class Decoder:
    """Where a loaded causal LM keeps its transformer blocks."""
    lm: object      # the causal LM itself (a PEFT wrapper removed)
    body: object    # the module holding the blocks (transformers-native: `lm.model`, with embed_tokens / norm)
    layers: object  # the blocks, in order (a ModuleList)


# (module holding the blocks, its attribute with them); first match wins. transformers-native causal
# LMs and ChatGLM's remote code (`transformer.encoder.layers`), GPT-2-style `transformer.h`, encoder-
# decoder style `model.decoder.layers`, vision-language models' `model.language_model.layers`.
DECODER_LAYOUTS = (("model", "layers"), ("transformer.encoder", "layers"), ("transformer", "h"),
                   ("model.decoder", "layers"), ("model.language_model", "layers"))


def find_decoder(model) -> Decoder:
    """The transformer blocks of a (possibly PEFT-wrapped) causal LM: the one place that knows the
    layouts, for freezing blocks (method freeze), compiling them and CUDA-graphing them."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    for body_path, attr in DECODER_LAYOUTS:
        body = lm
        for part in body_path.split("."):
            body = getattr(body, part, None)
        layers = getattr(body, attr, None) if body is not None else None
        if layers is not None and hasattr(layers, "__len__"):
            return Decoder(lm, body, layers)
    raise GlmtuneError(f"cannot find the transformer blocks of {type(lm).__name__} (looked for "
                       f"{', '.join(f'{b}.{a}' for b, a in DECODER_LAYOUTS)})")
