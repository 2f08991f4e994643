"""`glmtune data synthesize` with a real local model (Qwen2.5-Coder-0.5B-Instruct, batched through Predictor)
writing Chinese QA pairs from real Chinese text shipped in a package (chatterbot-corpus, the `real` extra)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.real_model
TOPICS = ("science", "history", "literature", "food", "sports", "money")


def chinese_pages(folder: Path) -> Path:
    """chatterbot-corpus's Chinese topic files, each rendered as one plain-text page (one "question？answer" line
    per conversation): real Chinese text shipped in a package, ~2,000 Qwen tokens, ~9 chunks of 320."""
    corpus = pytest.importorskip("chatterbot_corpus", reason='pip install chatterbot-corpus (or -e ".[real]")')
    import yaml

    folder.mkdir()
    for topic in TOPICS:
        data = yaml.safe_load((Path(corpus.__file__).parent / "data" / "chinese" / f"{topic}.yml").read_text("utf-8"))
        lines = [f"{conv[0]}？{'。'.join(str(x) for x in conv[1:])}" for conv in data["conversations"]]
        (folder / f"{topic}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def test_qwen_coder_writes_grounded_chinese_pairs(qwen_coder_dir, tmp_path):
    from glmtune.synth.synthesize import synthesize_qa

    pages = chinese_pages(tmp_path / "pages")
    out = tmp_path / "qa.jsonl"
    s = synthesize_qa(pages, out, llm=str(qwen_coder_dir), per_chunk=4, lang="zh", chunk_tokens=320, overlap=32,
                      batch_size=4, max_tokens=400)
    records = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    print(json.dumps(s.as_dict(), ensure_ascii=False))
    for rec in records[:5]:
        print(json.dumps({"q": rec["messages"][0]["content"], "a": rec["messages"][1]["content"],
                          "grounding": rec["meta"]["grounding"], "chunk": rec["meta"]["chunk_id"]}, ensure_ascii=False))
    assert s.pairs_kept >= 10, s.as_dict()
    assert all(r["meta"]["grounding"] >= 0.5 and r["meta"]["model"] == qwen_coder_dir.name for r in records)
    assert sum(any("\u4e00" <= ch <= "\u9fff" for ch in r["messages"][0]["content"]) for r in records) >= 10
