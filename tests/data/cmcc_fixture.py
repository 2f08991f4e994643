"""A CMCC-shaped CSV written in code: Chinese dialogues, [SEP] turns, all 34 intents."""
from __future__ import annotations

import csv
from pathlib import Path

from glmtune.data.cmcc import CMCC_INTENTS

ASKS = ["我想问一下{name}的事情", "麻烦帮我处理{name}", "关于{name}我有个问题", "请帮我看看{name}怎么弄",
        "我打电话是为了{name}", "{name}这个能不能帮忙", "你好，我想咨询{name}"]


def write_cmcc_csv(path: Path, per_label: int = 5) -> Path:
    rows = []
    for k in range(per_label):
        for cid, name in CMCC_INTENTS.items():
            turns = ["您好请讲", ASKS[k % len(ASKS)].format(name=name), f"好的，第{k + 1}次为您记录{cid}号业务", "谢谢"]
            rows.append({"sentence_sep": "[SEP]".join(turns), "c_numerical": cid, "label_raw": name})
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["sentence_sep", "c_numerical", "label_raw"])
        w.writeheader()
        w.writerows(rows)
    return path
