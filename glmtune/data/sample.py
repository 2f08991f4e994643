"""Built-in sample data (glmtune/resources/sample/), used by `glmtune demo` and the docs.

English data for the real-model demo comes from chatterbot-corpus (BSD-3, installed by the `real`
extra): its conversation files are grouped by topic, so the opening user message of each
conversation labelled with its file's topic is a small, real topic-classification set.
"""
from __future__ import annotations

import csv
import importlib.util
import random
from pathlib import Path

from glmtune.errors import InputError

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "resources" / "sample"
SAMPLES = {
    # CMCC-34-shaped intent data: sentence_sep ([SEP] turns), c_numerical, label_raw, word_mf2, num_cnum;
    # 6 dialogues for each of the 34 intents, so an 8:1:1 stratified split keeps every intent in train.
    "cmcc34": "cmcc34_sample.csv",
    # Alpaca-format multi-turn role-play / emotional-support chats (system persona + history).
    "roleplay": "roleplay_alpaca.json",
}

# The tiny demo's task: 4 customer-service requests, each said with its own words, wrapped in shared
# greetings and endings. A randomly initialised model can learn it from ~200 rows in a minute on a CPU
# (the words decide the label), so held-out accuracy shows learning, which 34 CMCC intents from 6
# dialogues each cannot.
SERVICE_REQUESTS = {
    "查询话费": ["我想查一下这个月的话费", "帮我看看还剩多少话费", "我的话费余额是多少", "上个月话费怎么这么多",
                 "查询一下本月的账单", "我的话费还够不够用"],
    "办理宽带": ["我想装个宽带", "家里要办一条宽带", "新装宽带怎么办理", "想开通一百兆的光纤宽带",
                 "新房子需要安装宽带", "宽带怎么办理比较划算"],
    "取消业务": ["帮我把视频会员退订了", "我要取消那个流量包", "这个彩铃业务帮我关掉", "这个套餐我不想要了帮我取消",
                 "退订一下短信提醒业务", "把自动续费的业务取消掉"],
    "投诉信号": ["家里的手机信号特别差", "最近打电话老是断线", "小区里一点信号都没有", "信号太弱了网页都打不开",
                 "地下室完全没有信号", "通话的时候总是听不清信号不好"],
}
REQUEST_OPENINGS = ["", "您好，", "你好，", "喂，", "麻烦问一下，", "客服你好，"]
REQUEST_ENDINGS = ["", "，谢谢", "，麻烦尽快", "，可以吗", "。", "，挺急的"]
REQUEST_SYSTEM = "判断用户的诉求类别。"  # short: the demo's steps cost ~B x T x 151k-vocabulary logits


def service_request_rows(per_label: int = 60, seed: int = 0) -> list[dict]:
    """``{"text", "label"}`` rows, ``per_label`` distinct sentences per request, seeded, labels interleaved."""
    rng, by_label = random.Random(seed), {}
    for label, phrases in SERVICE_REQUESTS.items():
        texts = [f"{o}{p}{e}" for p in phrases for o in REQUEST_OPENINGS for e in REQUEST_ENDINGS]
        rng.shuffle(texts)
        by_label[label] = texts[:per_label]
    return [{"text": by_label[label][i], "label": label} for i in range(per_label) for label in SERVICE_REQUESTS]


def write_rows_csv(rows: list[dict], out: str | Path) -> Path:
    """Write text,label rows as a CSV (the `classification` format `glmtune data convert` reads), atomically."""
    from glmtune.io import atomic_path

    out = Path(out)
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return out


# chatterbot-corpus English files with >= 48 distinct opening messages -> topic label.
# (tech_support.yml has 1050 conversations but only 10 distinct openings.)
CHATTERBOT_TOPICS = {"trivia.yml": "trivia", "coding.yml": "coding", "ai.yml": "ai", "emotion.yml": "emotion",
                     "psychology.yml": "psychology"}
TOPIC_SYSTEM = ("Classify the topic of the user's message. Answer with exactly one of: "
                + ", ".join(CHATTERBOT_TOPICS.values()) + ".")
REAL_EXTRA = 'pip install -e ".[real]"'


def sample_path(name: str) -> Path:
    """Path of a built-in sample file by name: ``cmcc34`` or ``roleplay``."""
    if name not in SAMPLES:
        raise InputError(f"no built-in sample named {name!r}", field="name", fix=f"use one of {', '.join(SAMPLES)}")
    return SAMPLE_DIR / SAMPLES[name]


def chatterbot_english_dir() -> Path:
    """The English data folder of the installed chatterbot-corpus package."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("chatterbot-corpus (English sample data of the real-model demo) is not installed",
                         field="chatterbot_corpus", fix=f"{REAL_EXTRA} (or pip install chatterbot-corpus)")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "english"


def chatterbot_topic_rows(per_topic: int = 48, seed: int = 0) -> list[dict]:
    """``{"text", "label"}`` rows: ``per_topic`` distinct opening messages of each topic, seeded choice.

    48 per topic keeps the classes balanced (emotion.yml has 48 distinct openings).
    """
    import yaml

    folder, rng, rows = chatterbot_english_dir(), random.Random(seed), []
    for fname, topic in CHATTERBOT_TOPICS.items():
        path = folder / fname
        convs = yaml.safe_load(path.read_text(encoding="utf-8"))["conversations"]
        texts = sorted({" ".join(str(c[0]).split()) for c in convs if c and str(c[0]).strip()})
        if len(texts) < per_topic:
            raise InputError(f"only {len(texts)} distinct opening messages, {per_topic} wanted", file=path,
                             field="per_topic", fix=f"use per_topic <= {len(texts)}")
        rng.shuffle(texts)
        rows += [{"text": t, "label": topic} for t in texts[:per_topic]]
    return rows


def topic_of(answer: str) -> str:
    """A generated answer as a topic label: case, surrounding space, quotes and a final full stop do not count."""
    return answer.strip().strip(".!\"'").strip().lower()


def write_chatterbot_topics(out: str | Path, per_topic: int = 48, seed: int = 0) -> Path:
    """Write the topic rows as a text,label CSV (the `classification` format `glmtune data convert` reads)."""
    return write_rows_csv(chatterbot_topic_rows(per_topic, seed), out)
