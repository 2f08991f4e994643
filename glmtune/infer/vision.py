"""Images in prompts: content parts -> pictures -> the model processor's pixel inputs + prompt ids.

A message's content is a string or a list of parts (:mod:`glmtune.data.records`). For a
vision-language model every image part becomes ``IMAGE_MARK`` in its message's text, the template
builds the prompt ids exactly as for text (so serving cannot drift from training), and each mark
is replaced by that image's placeholder ids as the model's own processor expands them (e.g. 729
``<image>`` tokens for a 384 px SigLIP tower, grid-dependent ``<|image_pad|>`` runs for Qwen2-VL).

Pictures come from a local path, ``file://`` or a ``data:`` URI; never from the network. They are
checked against :class:`ImageLimits` before they are decoded (a corrupt or oversized picture is a
one-line :class:`~glmtune.errors.InputError`), then sized per part (``min_pixels``/``max_pixels``,
or ``resized_height``/``resized_width``) before the processor sees them.
"""
from __future__ import annotations

import base64
import binascii
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
from urllib.parse import unquote, urlparse

from glmtune.data.records import content_images, content_text
from glmtune.errors import InputError
from glmtune.templates import IMAGE_MARK

# Keys of a processor's output that have one value per prompt token (padded with the prompt);
# every other tensor holds per-image rows and is concatenated image after image.
PER_TOKEN_KEYS = ("mm_token_type_ids", "token_type_ids")
TEXT_KEYS = ("input_ids", "attention_mask")


@dataclass
class ImageLimits:
    """Caps on untrusted pictures; a picture beyond one is refused with a 4xx / one-line error."""
    max_bytes: int = 20 * 2**20  # bytes of one image file or decoded data: URI (20 MiB)
    max_pixels: int = 40_000_000  # width x height as stored: PIL reads it from the header, before decoding
    max_images: int = 8  # pictures per prompt: each costs hundreds of tokens and a vision-tower pass


class VisionPrompt(list):
    """A prompt's token ids (a list, so queues, lengths and back-ends treat it as any prompt) that
    also carries what its images add: the processor's tensors (``inputs``: pixel values, grids,
    per-token modality ids), the sized pictures and the ids before placeholder expansion (vLLM's
    own processor expands placeholders itself)."""

    def __init__(self, ids: list[int], inputs: dict, images: list, unexpanded_ids: list[int]):
        super().__init__(ids)
        self.inputs, self.images, self.unexpanded_ids = inputs, images, unexpanded_ids


def has_images(messages: Sequence[dict]) -> bool:
    return any(content_images(m.get("content")) for m in messages)


def first_image_field(messages: Sequence[dict]) -> str | None:
    """``messages[i].content`` of the first message holding an image (for error messages)."""
    return next((f"messages[{i}].content" for i, m in enumerate(messages) if content_images(m.get("content"))),
                None)


def text_messages(messages: Sequence[dict]) -> list[dict]:
    """Messages with list content flattened to its text (for models and stages that take text)."""
    return [{**m, "content": content_text(m.get("content"))} if isinstance(m.get("content"), list) else m
            for m in messages]


def marked_messages(messages: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """Messages whose images are ``IMAGE_MARK`` in their text, and the image parts in that order.

    A mark a user typed in text is dropped, so marks and pictures always pair up."""
    out, parts = [], []
    for m in messages:
        content = m.get("content")
        if not isinstance(content, list):
            out.append({**m, "content": (content or "").replace(IMAGE_MARK, "")})
            continue
        text = ""
        for part in content:
            if part.get("type") == "image":
                text += IMAGE_MARK
                parts.append(part)
            else:
                text += part["text"].replace(IMAGE_MARK, "")
        out.append({**m, "content": text})
    return out, parts


# -- reading pictures ------------------------------------------------------------------------------
def image_bytes(src: str, limits: ImageLimits, *, field: str | None = None) -> bytes:
    """The encoded picture behind ``src``: a ``data:`` URI, a ``file://`` URL or a local path."""
    if src.startswith("data:"):
        header, sep, payload = src.partition(",")
        payload = "".join(payload.split())  # some clients wrap base64 in lines
        if not sep or ";base64" not in header:
            raise InputError("a data: URI must be base64 (data:image/png;base64,...)", field=field)
        if len(payload) * 3 // 4 > limits.max_bytes:
            raise _too_big(len(payload) * 3 // 4, limits, field)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise InputError("the data: URI is not valid base64", field=field) from None
    path = local_image_path(src, field=field)
    if not path.is_file():
        raise InputError(f"image not found: {path}", field=field, fix="check the path (relative paths start "
                         "at the current folder)")
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise _too_big(size, limits, field)
    return path.read_bytes()


def local_image_path(src: str, *, root: str | Path | None = None, field: str | None = None) -> Path:
    """The file a path or ``file://`` URL names; with ``root``, it must lie inside that folder
    (relative paths start there; symlinks and ``..`` are resolved before the check)."""
    scheme = urlparse(src).scheme.lower()
    if scheme == "file":
        src = unquote(urlparse(src).path)
    elif len(scheme) > 1:  # one letter is a Windows drive (C:\...)
        raise InputError(f"images are read from files or data: URIs, not {scheme}: URLs (never fetched)",
                         field=field, fix="download the picture and give its path, or send a data: URI")
    path = Path(src).expanduser()
    if root is not None:
        root = Path(root).resolve()
        resolved = (root / path).resolve()  # an absolute `path` replaces root here
        if not resolved.is_relative_to(root):
            raise InputError(f"image path {resolved} is outside the allowed image folder", field=field,
                             fix="send the picture as a data: URI, or put it under the server's --image-root")
        return resolved
    return path


def open_image(data: bytes, limits: ImageLimits, *, field: str | None = None):
    """Decode a picture to RGB, refusing corrupt files and pictures larger than ``max_pixels``."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > limits.max_pixels:  # header only: nothing decoded yet
            raise InputError(f"image is {img.width}x{img.height} pixels, more than the limit of "
                             f"{limits.max_pixels:,}", field=field, fix="send a smaller picture")
        img.load()
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"not a readable image ({type(e).__name__})", field=field,
                         fix="send a PNG, JPEG, WebP or GIF file") from None
    return img.convert("RGB")


def sized(img, part: dict):
    """Apply a part's sizing: ``resized_height``/``resized_width`` exactly, else scale (keeping the
    aspect ratio) into ``[min_pixels, max_pixels]``; the processor then rounds to its patch grid."""
    from PIL import Image

    if "resized_height" in part:
        return img.resize((part["resized_width"], part["resized_height"]), Image.Resampling.BICUBIC)
    area = img.width * img.height
    scale = 1.0
    if part.get("max_pixels") and area > part["max_pixels"]:
        scale = math.sqrt(part["max_pixels"] / area)
    elif part.get("min_pixels") and area < part["min_pixels"]:
        scale = math.sqrt(part["min_pixels"] / area)
    if scale == 1.0:
        return img
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.BICUBIC)


def load_images(parts: list[dict], limits: ImageLimits, fields: list[str] | None = None) -> list:
    if len(parts) > limits.max_images:
        raise InputError(f"{len(parts)} images in one prompt, more than the limit of {limits.max_images}",
                         field="messages", fix="send fewer pictures per request")
    fields = fields or [None] * len(parts)
    return [sized(open_image(image_bytes(p["image"], limits, field=f), limits, field=f), p)
            for p, f in zip(parts, fields)]


def _too_big(size: int, limits: ImageLimits, field: str | None) -> InputError:
    return InputError(f"image is {size / 2**20:.1f} MiB, more than the limit of "
                      f"{limits.max_bytes / 2**20:.1f} MiB", field=field, fix="send a smaller picture")


# -- the model's processor -------------------------------------------------------------------------
class VisionEncoder:
    """A VL model folder's processor, turning marked messages + pictures into a :class:`VisionPrompt`."""

    def __init__(self, model_dir: str | Path):
        from glmtune.models.loading import load_processor

        self.processor = load_processor(model_dir)
        self.placeholder = image_placeholder(self.processor)

    def encode(self, template, tokenizer, messages: Sequence[dict], tools, limits: ImageLimits) -> VisionPrompt:
        import torch

        marked, parts = marked_messages(messages)
        images = load_images(parts, limits, _image_fields(messages))
        per_image = [self.processor(text=[self.placeholder], images=[img], add_special_tokens=False,
                                    return_tensors="pt") for img in images]
        ids = template.encode_prompt(tokenizer, marked, tools,
                                     image_ids=[o["input_ids"][0].tolist() for o in per_image])
        unexpanded = template.encode_prompt(tokenizer, marked, tools, image_ids=[self._placeholder_ids()] * len(images))
        inputs = {k: torch.cat([o[k] for o in per_image]) for k in per_image[0]
                  if k not in TEXT_KEYS + PER_TOKEN_KEYS}
        if any(k in per_image[0] for k in PER_TOKEN_KEYS):
            # Which tokens are image tokens, for the whole prompt (Qwen2-VL's M-RoPE needs it).
            inputs["mm_token_type_ids"] = torch.tensor(self.processor.create_mm_token_type_ids([ids])[0])
        return VisionPrompt(ids, inputs, images, unexpanded)

    def _placeholder_ids(self) -> list[int]:
        return self.processor.tokenizer(self.placeholder, add_special_tokens=False)["input_ids"]


def image_placeholder(processor) -> str:
    """The text one image stands for in the model's own chat template (e.g. ``<image>\\n``, or
    ``<|vision_start|><|image_pad|><|vision_end|>``): what it adds when a user turn gains an image.

    Read from the template rather than a per-model table, so any image-text-to-text model works;
    the part holds the processor's ``image_token`` once, which the processor expands per image."""
    token = getattr(processor, "image_token", None)
    if not token:
        raise InputError(f"{type(processor).__name__} has no image token", field="model",
                         fix="use a vision-language model whose processor marks images with a token")
    if not getattr(processor, "chat_template", None):
        return token
    probe = "glmtune-probe"
    with_image = _render(processor, [{"type": "image"}, {"type": "text", "text": probe}])
    text_only = _render(processor, [{"type": "text", "text": probe}])
    prefix = len(_common_prefix(with_image, text_only))
    # The suffix may not reach into the prefix: with "user\n<image>\n{text}" vs "user\n{text}" the
    # image part is "<image>\n", not "\n<image>".
    room = len(text_only) - prefix
    suffix = len(_common_prefix(with_image[::-1], text_only[::-1])[:room])
    placeholder = with_image[prefix:len(with_image) - suffix]
    return placeholder if placeholder.count(token) == 1 else token


def _render(processor, content: list[dict]) -> str:
    return processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=False)


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _image_fields(messages: Sequence[dict]) -> list[str]:
    """``messages[i].content[j]`` of every image part, in order, for error messages."""
    return [f"messages[{i}].content[{j}]" for i, m in enumerate(messages) if isinstance(m.get("content"), list)
            for j, p in enumerate(m["content"]) if p.get("type") == "image"]
