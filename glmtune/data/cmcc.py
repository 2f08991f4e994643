"""CMCC-34 (China Mobile customer-service intents): the 34 intents and the seed's classification prompt.

The prompt, the answer format ``意图：{id}：{name}`` and :func:`parse_intent` live together so that
training data and evaluation can never disagree about them.
"""
from __future__ import annotations

import re

# c_numerical -> label_raw, as listed in ../shared/data/cmcc34/README.md.
CMCC_INTENTS: dict[int, str] = {
    0: "咨询（含查询）业务规定", 1: "办理取消", 2: "咨询（含查询）业务资费", 3: "咨询（含查询）营销活动信息",
    4: "咨询（含查询）办理方式", 5: "投诉（含抱怨）业务使用问题", 6: "咨询（含查询）账户信息", 7: "办理开通",
    8: "咨询（含查询）业务订购信息查询", 9: "投诉（含抱怨）不知情定制问题", 10: "咨询（含查询）产品/业务功能",
    11: "咨询（含查询）用户资料", 12: "投诉（含抱怨）费用问题", 13: "投诉（含抱怨）业务办理问题",
    14: "投诉（含抱怨）服务问题", 15: "办理变更", 16: "咨询（含查询）服务渠道信息", 17: "投诉（含抱怨）业务规定不满",
    18: "投诉（含抱怨）营销问题", 19: "投诉（含抱怨）网络问题", 20: "办理停复机", 21: "投诉（含抱怨）信息安全问题",
    22: "办理重置/修改/补发", 23: "咨询（含查询）使用方式", 24: "咨询（含查询）号码状态",
    25: "咨询（含查询）工单处理结果", 26: "办理打印/邮寄", 27: "咨询（含查询）宽带覆盖范围",
    28: "办理移机/装机/拆机", 29: "办理缴费", 30: "办理下载/设置", 31: "办理补换卡", 32: "办理销户/重开",
    33: "咨询（含查询）电商货品信息",
}
# The major class of each intent (num_cnum): 0 consult, 1 complain, 2 handle.
CMCC_MAJOR = {"咨询": 0, "投诉": 1, "办理": 2}

CMCC_COLUMNS = ("sentence_sep", "c_numerical", "label_raw")
TURN_SEPARATOR = "[SEP]"

_SYSTEM_HEAD = (
    "你是中国移动客服对话的意图识别专家。阅读客户与客服的完整对话，判断客户的最终意图。\n"
    "判断标准：关注客户最终想解决的问题，而不是中间过程；结合关键词和上下文综合判断。\n\n"
    "意图列表（编号：名称）：\n"
)
_SYSTEM_TAIL = "\n\n只输出一行，格式为：意图：编号：名称"


def cmcc_system_prompt() -> str:
    """The system prompt listing all 34 intents as ``{id}：{name}`` lines."""
    lines = "\n".join(f"{i}：{name}" for i, name in sorted(CMCC_INTENTS.items()))
    return _SYSTEM_HEAD + lines + _SYSTEM_TAIL


def cmcc_answer(intent_id: int) -> str:
    """The assistant's answer for an intent, e.g. ``意图：7：办理开通``."""
    return f"意图：{intent_id}：{CMCC_INTENTS[intent_id]}"


def dialogue_text(sentence_sep: str, joiner: str = "\n") -> str:
    """Turn a ``[SEP]``-joined dialogue into one user message (empty turns are dropped)."""
    turns = [t.strip() for t in sentence_sep.split(TURN_SEPARATOR)]
    return joiner.join(t for t in turns if t)


_ANSWER_RE = re.compile(r"意图\s*[：:]\s*(\d{1,2})(?:\s*[：:]\s*(\S+))?")


def parse_intent(text: str) -> int | None:
    """The intent id in a model's answer (``意图：7：办理开通``, or a bare intent name); None if absent."""
    m = _ANSWER_RE.search(text)
    if m and int(m.group(1)) in CMCC_INTENTS:
        return int(m.group(1))
    # Longest name first: "咨询（含查询）业务规定" must not match inside a longer name.
    for intent_id, name in sorted(CMCC_INTENTS.items(), key=lambda kv: -len(kv[1])):
        if name in text:
            return intent_id
    return None
