"""A model folder's facts (glmtune.models.folder): family, template arguments, default system, meta."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from glmtune.errors import InputError
from glmtune.models.folder import FAMILIES, read_model_folder, write_glmtune_meta


def family_of(path):
    return read_model_folder(path).family


def test_family_of(glm4_tokenizer_dir, chatglm3_tokenizer_dir, chatglm2_tokenizer_dir, tmp_path):
    assert family_of(glm4_tokenizer_dir) == "glm4"
    assert family_of(chatglm3_tokenizer_dir) == "chatglm3"
    assert family_of(chatglm2_tokenizer_dir) == "chatglm2"
    assert family_of(tmp_path) is None
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "<|im_start|>{{x}}"}))
    assert family_of(tmp_path) == "qwen"  # a Llama model speaking ChatML (SmolLM2)
    (tmp_path / "glmtune.json").write_text(json.dumps({"template": "llama3"}))
    assert family_of(tmp_path) == "llama3"
    (tmp_path / "tokenizer_config.json").write_text("{bad json")
    (tmp_path / "glmtune.json").unlink()
    with pytest.raises(InputError, match="tokenizer_config.json"):
        family_of(tmp_path)


def test_families_are_the_registered_templates():
    from glmtune.templates import list_templates
    assert sorted(FAMILIES) == list_templates()


def test_template_args_keep_the_folders_default_system_only_for_its_own_family(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nBe brief.<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")}))
    folder = read_model_folder(tmp_path)
    assert folder.family == "qwen" and folder.default_system == "Be brief."
    assert folder.template_args() == {"name": "qwen", "default_system": "Be brief."}
    assert folder.template_args("llama3") == {"name": "llama3"}
    write_glmtune_meta(tmp_path, default_system="Recorded.")   # GGUF import records it: that wins
    assert read_model_folder(tmp_path).template_args("qwen")["default_system"] == "Recorded."
    with pytest.raises(InputError, match="cannot tell which chat template"):
        read_model_folder(tmp_path / "missing").template_args()


def test_model_type_remote_code_and_meta(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "chatglm", "auto_map": {"AutoModelForCausalLM": "x.Y"}}))
    write_glmtune_meta(tmp_path, template="chatglm3", method="lora")
    write_glmtune_meta(tmp_path, base_model="/m")    # entries are added, not replaced
    folder = read_model_folder(tmp_path)
    assert (folder.model_type, folder.is_glm, folder.remote_code) == ("chatglm", True, True)
    assert folder.meta == {"template": "chatglm3", "method": "lora", "base_model": "/m"}
    assert folder.template_args() == {"name": "chatglm3"}


OFFICIAL = Path(__file__).resolve().parents[1] / "templates" / "official"


@pytest.mark.parametrize("jinja_file,model_type,family", [("glm45_chat_template.jinja", "glm4_moe", "glm45"),
                                                          ("glm46_chat_template.jinja", "glm4_moe", "glm45"),
                                                          ("glm47_chat_template.jinja", "glm4_moe", "glm47"),
                                                          ("glmz1_chat_template.jinja", "glm4", "glmz1")])
def test_glm_family_from_the_shipped_template(jinja_file, model_type, family, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    (tmp_path / "chat_template.jinja").write_text((OFFICIAL / jinja_file).read_text(encoding="utf-8"), encoding="utf-8")
    assert family_of(tmp_path) == family


# GLM-Z1-Rumination-32B-0414's template (as its GGUF conversion printed it, ik_llama.cpp PR #333), first line and
# the generation prompt: a fixed research system prompt, and no <think> to open.
RUMINATION = ("[gMASK]<sop><|system|>\n你是一个专业的深度研究助手，通过提供的工具与模拟浏览器交互，来帮助用户完成深度信息调研和报告撰写任务。"
              "{%- for message in messages if message.role != 'system' %}{%- set content = message['content'] %}"
              "{%- set visible = content.split('</think>')[-1].strip() %}{%- endfor %}"
              "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.mark.parametrize("template,match", [((OFFICIAL / "glm51_chat_template.jinja").read_text(encoding="utf-8"),
                                             "GLM-5.1's chat template"),
                                            (RUMINATION, "GLM-Z1-Rumination's chat template")])
def test_templates_glmtune_does_not_reproduce_are_refused(template, match, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "glm_moe_dsa"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    with pytest.raises(InputError, match=match) as e:
        read_model_folder(tmp_path).template_args()
    assert '{"template": "glm47"}' in e.value.fix
    write_glmtune_meta(tmp_path, template="glm47")  # the explicit choice is the way through
    assert read_model_folder(tmp_path).template_args() == {"name": "glm47"}


@pytest.mark.parametrize("model_type,family", [("glm4_moe", "glm45"), ("glm4_moe_lite", "glm47"),
                                               ("glm_moe_dsa", "glm47"), ("glm4", "glm4")])
def test_glm45_family_from_the_model_type(model_type, family, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    assert family_of(tmp_path) == family
    assert read_model_folder(tmp_path).is_glm
