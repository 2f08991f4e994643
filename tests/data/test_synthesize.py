"""`glmtune data synthesize`: scripted replies from a fake OpenAI-compatible server (what is kept, retried,
dropped and why; provenance; resume), and the plumbing against `glmtune serve` on the tiny model."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "serve"))
from fake_llm import FakeLLM, prompt_text  # noqa: E402
from local_site import LocalSite  # noqa: E402

from glmtune.data.crawl import read_pages  # noqa: E402
from glmtune.synth.prompting import parse_json_list  # noqa: E402
from glmtune.synth.synthesize import chunk_page, grounding, synthesize_qa  # noqa: E402


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> Path:
    from glmtune.data.crawl import crawl_site

    out = tmp_path_factory.mktemp("pages")
    with LocalSite() as site:
        crawl_site(site.url, out, depth=1, delay=0, max_bytes=100_000)
    return out


LIBRARY_PAIRS = [
    {"question": "When does the library open on weekdays?",
     "answer": "The university library opens at eight in the morning and closes at ten in the evening."},
    {"question": "Who founded the library?", "answer": "It was founded by a famous emperor in 200 BC."},  # ungrounded
    {"question": "When does the library open on weekdays ?", "answer": "At eight in the morning."},    # duplicate
    {"question": "Hi?", "answer": "The university library opens at eight."},                          # length
    {"q": "How many books?", "a": "Twenty."},                                                          # malformed
]
NOTICE_PAIR = {"question": "新生报到的地点在哪里？", "answer": "地点在学校体育馆一楼大厅。"}
GUIDE_PAIR = {"question": "Whom should students ask if something is unclear?",
              "answer": "Ask the student office if anything is unclear."}


def scripted(messages: list[dict]) -> str:
    text = prompt_text(messages)
    if "Library" in text:   # invalid first, valid after the correction
        return "Sure! Here are the pairs you asked for." if len(messages) == 1 else json.dumps(LIBRARY_PAIRS)
    if "Dormitories" in text:
        return "I cannot answer in JSON, sorry."   # invalid every time -> dropped
    if "新生报到" in text:
        return json.dumps({"pairs": [NOTICE_PAIR]}, ensure_ascii=False)
    return "```json\n" + json.dumps([GUIDE_PAIR]) + "\n```"


def test_kept_pairs_filters_provenance_and_resume(pages, tmp_path, monkeypatch):
    monkeypatch.setenv("GLMTUNE_LLM_API_KEY", "sk-synth")
    out = tmp_path / "qa.jsonl"
    done = []
    with FakeLLM(scripted) as llm:
        s = synthesize_qa(pages, out, llm=llm.url, per_chunk=5, lang="en", progress=lambda d, t: done.append((d, t)))
        calls = len(llm.calls)
        assert set(llm.auth) == {"Bearer sk-synth"}
        assert "Passage:" in llm.calls[0][0]["content"]            # the shipped English template
        retry = next(c for c in llm.calls if len(c) == 3)
        assert retry[1]["role"] == "assistant" and "not the JSON" in retry[2]["content"]
        again = synthesize_qa(pages, out, llm=llm.url, per_chunk=5, lang="en")
        assert len(llm.calls) == calls                               # a rerun asks nothing
    assert s.pages == 4 and s.chunks == 4 and calls == s.requests == 6   # guide 1, library 2, dorms 2, notice 1
    assert s.pairs_kept == 3 and dict(s.dropped) == {"invalid_json": 1, "ungrounded": 1, "duplicate": 1,
                                                     "length": 1, "malformed": 1}
    assert done[-1] == (4, 4)
    records = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [r["messages"][0]["content"] for r in records] == [GUIDE_PAIR["question"], LIBRARY_PAIRS[0]["question"],
                                                              NOTICE_PAIR["question"]]
    lib = records[1]
    assert lib["messages"][1] == {"role": "assistant", "content": LIBRARY_PAIRS[0]["answer"]}
    assert lib["meta"]["source"].endswith("/library.html") and lib["meta"]["chunk_id"].endswith("#0")
    assert lib["meta"]["model"] == "fake-model" and lib["meta"]["grounding"] == 1.0 and lib["meta"]["synthesized"]
    assert again.chunks_done_before == 4 and again.requests == 0 and again.pairs_kept == 3
    # the output is what `glmtune data split` and training read
    from glmtune.data.registry import load_dataset
    assert len(load_dataset(out)) == 3


def test_grounding_chunking_and_parsing(glm4_tokenizer_dir):
    from glmtune.models.tokenizer import load_tokenizer

    chunk = "图书馆工作日早上八点开门，晚上十点关门。The reading room is on the third floor."
    assert grounding("早上八点开门", chunk) == 1.0
    assert grounding("图书馆由秦始皇建造", chunk) == pytest.approx(2 / 8)   # 图书, 书馆 of 8 bigrams
    assert grounding("the third floor", chunk) == 1.0 and grounding("floor the third", chunk) == 0.5
    tok = load_tokenizer(glm4_tokenizer_dir)
    text = " ".join(f"Sentence number {i} is here." for i in range(60))
    chunks = chunk_page({"url": "u", "file": "f.txt", "text": text}, tok, chunk_tokens=64, overlap=16)
    ids = [tok(c["text"], add_special_tokens=False)["input_ids"] for c in chunks]
    assert len(chunks) > 3 and all(len(i) <= 65 for i in ids)
    assert all(c["text"] in text for c in chunks) and chunks[-1]["text"].endswith("59 is here.")
    assert chunks[1]["text"][:20] in chunks[0]["text"]            # overlap: the next chunk starts inside this one
    assert parse_json_list('{"pairs": [{"question": "a", "answer": "b"}]}') == [{"question": "a", "answer": "b"}]
    assert parse_json_list('Here: [1, 2] done') == [1, 2] and parse_json_list("no json") is None


def test_against_glmtune_serve_on_the_tiny_model(pages, tmp_path, trained_glm4_dir):
    """Plumbing: the tiny model cannot write JSON, so every chunk is asked twice and dropped as invalid_json.
    (`glmtune serve`'s command in this process, its app on a free port: tests/serve runs the server process.)"""
    from live_server import served

    one_page = tmp_path / "pages"
    one_page.mkdir()
    (one_page / "library.txt").write_text(next(p["text"] for p in read_pages(pages) if p["title"] == "Library"))

    with served("--model", trained_glm4_dir, "--max-tokens", "16") as server:
        s = synthesize_qa(one_page, tmp_path / "qa.jsonl", llm=f"{server.url}/v1", per_chunk=2,
                          lang="en", max_tokens=16)
    assert s.chunks == 1 and s.requests == 2 and dict(s.dropped) == {"invalid_json": 1} and s.pairs_kept == 0
    assert (tmp_path / "qa.jsonl").read_text() == ""
    log = [json.loads(x) for x in (tmp_path / "qa.progress.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(log) == 1 and all(len(r["replies"]) == 2 and r["model"] == trained_glm4_dir.name for r in log)


def test_local_model_folder_backend(pages, tmp_path, trained_glm4_dir):
    """--llm MODEL_DIR: Predictor, batched, and the model's own tokenizer for chunking (plumbing, like serve)."""
    from glmtune.infer.llm import LocalChatLLM, open_llm

    llm = open_llm(trained_glm4_dir, max_tokens=24, batch_size=4)
    assert isinstance(llm, LocalChatLLM) and llm.name == trained_glm4_dir.name
    replies = llm.batch([[{"role": "user", "content": "What is the capital of France?"}],
                         [{"role": "user", "content": "How many legs does a spider have?"}]])
    assert replies == ["The capital of France is Paris.", "A spider has eight legs."]   # greedy, left-padded batch
    s = synthesize_qa(pages, tmp_path / "qa.jsonl", llm=llm, per_chunk=2, lang="en", batch_size=4)
    assert s.chunks == 4 and s.requests == 8 and dict(s.dropped) == {"invalid_json": 4}
