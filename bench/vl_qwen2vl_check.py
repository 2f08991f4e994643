"""Qwen2-VL through glmtune's vision path, where torchvision is installed (Qwen2-VL's processor always
builds its video processor, which needs torchvision; the CPU test box has none, so its tests use LLaVA).

A tiny random Qwen2-VL folder (the real architecture, processor defaults and chat template) goes
through `Predictor`: prompt ids equal the model's chat template run through its own processor
(grid-dependent `<|image_pad|>` runs, `mm_token_type_ids` for M-RoPE), 1 and 2 images change the
greedy answer, streaming equals the one-shot answer, `max_pixels` shrinks the image-token count.

Usage (CPU or GPU, any machine with torch + torchvision):
    python bench/vl_qwen2vl_check.py [--device cuda] [--out bench/results/vl_qwen2vl_check.json]
Prints one JSON line (also written to --out); exits 1 if a check fails.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "infer"))

p = argparse.ArgumentParser()
p.add_argument("--device", default=None)
p.add_argument("--out", default=None)
args = p.parse_args()

from PIL import Image  # noqa: E402
from vl_helpers import write_picture  # noqa: E402

from glmtune import Predictor  # noqa: E402
from glmtune.models.tiny import build_tiny_qwen2_vl  # noqa: E402

work = Path(tempfile.mkdtemp())
pics = [write_picture(work / f"p{i}.png", seed=i, size=(224, 168)) for i in range(3)]
vl = Predictor(build_tiny_qwen2_vl(work / "qwen2-vl"), max_new_tokens=8, device=args.device)


def img(i, **sizing):
    return {"type": "image", "image": str(pics[i]), **sizing}


q = {"type": "text", "text": "Describe it."}
proc = vl.vision.processor
prompt = vl.prompt_ids([{"role": "user", "content": [img(0), q]}])
rendered = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, q]}], tokenize=False,
                                    add_generation_prompt=True)
ref = proc(text=[rendered], images=[Image.open(pics[0]).convert("RGB")], add_special_tokens=False,
           return_tensors="pt")
one = [vl([img(i), q]) for i in range(3)]
two = [img(0), {"type": "text", "text": "and"}, img(1), {"type": "text", "text": "compare"}]
small = vl.prompt_ids([{"role": "user", "content": [img(0, max_pixels=56 * 56), q]}])
checks = {
    "ids_equal_processor": list(prompt) == ref["input_ids"][0].tolist(),
    "mm_token_type_ids_equal": prompt.inputs["mm_token_type_ids"].tolist() == ref["mm_token_type_ids"][0].tolist(),
    "placeholder": vl.vision.placeholder == "<|vision_start|><|image_pad|><|vision_end|>",
    "one_image_changes_answer": len(set(one)) == 3,
    "two_images_change_answer": vl(two) != vl([img(0), two[1], img(2), two[3]]),
    "stream_equals_call": "".join(vl.stream(two)) == vl(two),
    "max_pixels_shrinks_tokens": small.count(proc.image_token_id) < prompt.count(proc.image_token_id),
}
result = {"checks": checks, "ok": all(checks.values()), "image_tokens": prompt.count(proc.image_token_id),
          "image_tokens_max_pixels_3136": small.count(proc.image_token_id),
          "image_grid_thw": prompt.inputs["image_grid_thw"].tolist(), "device": str(vl.backend.device)}
line = json.dumps(result)
print(line)
if args.out:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(line + "\n")
sys.exit(0 if result["ok"] else 1)
