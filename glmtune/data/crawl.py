"""`glmtune data crawl`: fetch a site's pages (breadth first), keep each page's main text as a file.

Politeness and safety come first: robots.txt is obeyed (urllib.robotparser) for every URL, including
each redirect hop; one request at a time with ``delay`` seconds between them (or the site's
Crawl-delay, if larger); a user agent that names glmtune. Pages are streamed and cut off at
``max_bytes``, so a huge page never fills memory. Main text comes from trafilatura, which drops
navigation, footers and cookie banners; links come from lxml.

The manifest (``OUT/manifest.jsonl``) has one row per URL decided: ``status`` "ok" (``file``, ``title``,
``sha256``, ``links``), "skipped" (permanent: ``reason``) or "error" (transient: timeouts, 5xx,
connection errors). A rerun skips every "ok"/"skipped" URL and re-expands saved pages from their
stored links, so it fetches only what is new or failed before.
"""
from __future__ import annotations

import hashlib
import re
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable
from urllib.parse import urldefrag, urljoin, urlsplit

from glmtune.errors import InputError
from glmtune.io import iter_jsonl, write_jsonl_atomic, write_text_atomic

def _package_version() -> str:
    # From the installed metadata: importing the package root from a stage would point upwards.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("glmtune")
    except PackageNotFoundError:
        return "0"


USER_AGENT = f"glmtune-crawler/{_package_version()} (+https://github.com/glmtune/glmtune; data for fine-tuning)"
MANIFEST = "manifest.jsonl"
HTML_TYPES = ("text/html", "application/xhtml+xml")
MAX_REDIRECTS = 5


@dataclass
class CrawlSummary:
    out_dir: Path
    saved: list[str] = field(default_factory=list)          # URLs saved in this run
    already_done: int = 0                                    # URLs the manifest had decided before this run
    skipped: dict[str, list[str]] = field(default_factory=dict)   # reason -> URLs (robots, 404, not HTML, ...)
    off_domain: list[str] = field(default_factory=list)     # links not followed because of same_domain
    requests: int = 0                                        # HTTP requests made (robots.txt included)
    stopped_at_max_pages: bool = False

    def as_dict(self) -> dict:
        return {"out_dir": str(self.out_dir), "saved": len(self.saved), "already_done": self.already_done,
                "skipped": {k: len(v) for k, v in self.skipped.items()}, "off_domain": len(self.off_domain),
                "requests": self.requests}


class _Skip(Exception):
    """A URL that will not be saved: ``permanent`` ones are not retried on a rerun."""

    def __init__(self, reason: str, permanent: bool = True):
        super().__init__(reason)
        self.reason, self.permanent = reason, permanent


def crawl_site(url: str, out_dir: str | Path, *, depth: int = 1, max_pages: int = 100, delay: float = 1.0,
               same_domain: bool = True, max_bytes: int = 5_000_000, timeout: float = 15.0,
               user_agent: str = USER_AGENT, progress: Callable[[str, str], None] | None = None) -> CrawlSummary:
    """Crawl from ``url`` to ``depth`` link levels (0 = only that page) and save up to ``max_pages`` pages.

    ``same_domain``: follow only links on the start URL's host. ``progress(url, outcome)`` is called per URL.
    Returns what was saved and skipped (with reasons); errors on single URLs are never fatal.
    """
    import httpx

    start = _normalise(url)
    if start is None:
        raise InputError(f"{url!r} is not an http(s) URL", field="url", fix="e.g. https://www.example.edu/")
    if depth < 0 or max_pages < 1 or delay < 0 or max_bytes < 1:
        raise InputError("depth, delay must be >= 0 and max_pages, max_bytes >= 1", field="depth/max_pages")
    out = Path(out_dir)
    manifest = _load_manifest(out / MANIFEST)
    summary = CrawlSummary(out)
    host = urlsplit(start).hostname
    fetcher = _Fetcher(httpx.Client(timeout=timeout, headers={"User-Agent": user_agent}, follow_redirects=False),
                       user_agent, delay, max_bytes, summary)
    saved_total = sum(1 for row in manifest.values() if row["status"] == "ok")
    queue: deque[tuple[str, int]] = deque([(start, 0)])
    seen = {start}
    try:
        while queue:
            page, level = queue.popleft()
            row = manifest.get(page)
            if row is not None and row["status"] != "error":
                summary.already_done += 1
            elif saved_total >= max_pages:
                summary.stopped_at_max_pages = True
                continue
            else:
                row = _visit(fetcher, page, host if same_domain else None, out, manifest, level)
                manifest[page] = row
                write_jsonl_atomic(out / MANIFEST, manifest.values())
                if row["status"] == "ok":
                    saved_total += 1
                    summary.saved.append(page)
                else:
                    summary.skipped.setdefault(row["reason"], []).append(page)
                if progress:
                    progress(page, row.get("reason", "saved"))
            if row["status"] == "ok" and level < depth:
                for link in row.get("links", []):
                    if link in seen:
                        continue
                    seen.add(link)
                    if same_domain and urlsplit(link).hostname != host:
                        summary.off_domain.append(link)
                    else:
                        queue.append((link, level + 1))
    finally:
        fetcher.client.close()
    return summary


def _visit(fetcher: "_Fetcher", url: str, host: str | None, out: Path, manifest: dict, level: int) -> dict:
    """Fetch, extract and save one URL; the manifest row for it (never raises for the URL's own problems)."""
    row = {"url": url, "fetched_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "depth": level}
    try:
        final_url, status, html = fetcher.fetch(url, host)
        text, title = _main_text(html, final_url)
        links = _links(html, final_url)
    except _Skip as e:
        return {**row, "status": "skipped" if e.permanent else "error", "reason": e.reason}
    except Exception as e:  # a page the HTML parsers choke on costs only itself
        return {**row, "status": "skipped", "reason": f"unreadable page ({type(e).__name__})"}
    sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    twin = next((r["url"] for r in manifest.values() if r.get("sha256") == sha), None)
    if twin is not None:
        return {**row, "status": "skipped", "reason": "same text as an earlier page", "same_as": twin}
    name = _file_name(url)
    write_text_atomic(out / name, text + "\n")
    return {**row, "status": "ok", "http_status": status, "final_url": final_url, "title": title, "file": name,
            "sha256": sha, "chars": len(text), "links": links}


class _Fetcher:
    """One polite HTTP client: robots.txt per host (cached), a delay between requests, streamed bodies."""

    def __init__(self, client, user_agent: str, delay: float, max_bytes: int, summary: CrawlSummary):
        self.client, self.user_agent, self.delay, self.max_bytes = client, user_agent, delay, max_bytes
        self.summary = summary
        self.robots: dict[str, object] = {}
        self.last_request = 0.0

    def fetch(self, url: str, host: str | None) -> tuple[str, int, str | bytes]:
        """(final URL, HTTP status, HTML) after following redirects by hand (each hop checked).

        The HTML is text when the server names a charset, else bytes: trafilatura and lxml then read
        the page's own <meta charset> (GBK campus pages often declare it only there)."""
        import httpx

        chain = [url]
        for _ in range(MAX_REDIRECTS + 1):
            self._check_allowed(chain[-1], host)
            try:
                with self._stream(chain[-1]) as resp:
                    if resp.is_redirect:
                        nxt = _normalise(urljoin(chain[-1], resp.headers.get("location", "")))
                        if nxt is None:
                            raise _Skip("redirect to a non-http(s) URL")
                        if nxt in chain:
                            raise _Skip("redirect loop")
                        chain.append(nxt)
                        continue
                    return chain[-1], resp.status_code, self._read_html(resp)
            except httpx.TimeoutException:
                raise _Skip("timeout", permanent=False) from None
            except httpx.HTTPError as e:  # connection refused/reset, protocol and decoding errors
                raise _Skip(f"connection error ({type(e).__name__})", permanent=False) from None
        raise _Skip(f"more than {MAX_REDIRECTS} redirects")

    def _check_allowed(self, url: str, host: str | None) -> None:
        if host is not None and urlsplit(url).hostname != host:
            raise _Skip("redirect off the start domain")
        if not self._robots_for(url).can_fetch(self.user_agent, url):
            raise _Skip("disallowed by robots.txt")

    def _robots_for(self, url: str):
        from urllib.robotparser import RobotFileParser

        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        if origin not in self.robots:
            rp = RobotFileParser(origin + "/robots.txt")
            try:
                with self._stream(origin + "/robots.txt") as resp:
                    body = self._read_capped(resp).decode("utf-8", errors="replace")
                    status = resp.status_code
            except Exception:  # unreachable robots.txt: treat like a missing one (RFC 9309: 4xx = allow all)
                body, status = "", 404
            if status >= 500:  # the site is failing; RFC 9309 says assume complete disallow
                rp.disallow_all = True
            else:
                rp.parse(body.splitlines() if status < 400 else [])
            self.robots[origin] = rp
            delay = rp.crawl_delay(self.user_agent)
            if delay:
                self.delay = max(self.delay, float(delay))
        return self.robots[origin]

    def _stream(self, url: str):
        wait = self.last_request + self.delay - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self.last_request = time.monotonic()
        self.summary.requests += 1
        return self.client.stream("GET", url)

    def _read_html(self, resp) -> str | bytes:
        if resp.status_code >= 400:
            raise _Skip(f"HTTP {resp.status_code}", permanent=resp.status_code < 500)
        ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in HTML_TYPES:
            raise _Skip(f"not HTML ({ctype or 'no content-type'})")
        body = self._read_capped(resp)
        return body.decode(resp.charset_encoding, errors="replace") if resp.charset_encoding else body

    def _read_capped(self, resp) -> bytes:
        """The body, or _Skip as soon as it passes max_bytes (the rest is never downloaded)."""
        declared = resp.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise _Skip(f"larger than {self.max_bytes} bytes")
        chunks, size = [], 0
        for chunk in resp.iter_bytes():
            size += len(chunk)
            if size > self.max_bytes:
                raise _Skip(f"larger than {self.max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)


def _main_text(html: str | bytes, url: str) -> tuple[str, str | None]:
    import trafilatura

    doc = trafilatura.bare_extraction(html, url=url, with_metadata=True, include_comments=False)
    text = (doc.text if doc is not None else "") or ""
    if not text.strip():
        raise _Skip("no main text found")
    return text.strip(), doc.title


def _links(html: str | bytes, base: str) -> list[str]:
    """Absolute http(s) links of <a href>, fragments removed, in page order, without repeats."""
    import lxml.html

    try:
        tree = lxml.html.fromstring(html)
    except Exception:  # an empty or unparsable page simply has no links
        return []
    links: list[str] = []
    for href in tree.xpath("//a/@href"):
        link = _normalise(urljoin(base, href.strip()))
        if link is not None and link not in links:
            links.append(link)
    return links


def _normalise(url: str) -> str | None:
    url = urldefrag(url).url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return url if parts.path else url + "/"


def _file_name(url: str) -> str:
    """A readable, unique file name: the URL path as a slug plus a short hash of the full URL."""
    parts = urlsplit(url)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", (parts.hostname or "") + parts.path).strip("_.")[:80]
    return f"{slug}-{hashlib.sha1(url.encode('utf-8')).hexdigest()[:8]}.txt"


def _load_manifest(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    rows = {}
    for line, row in iter_jsonl(path):
        if not isinstance(row, dict) or "url" not in row or "status" not in row:
            raise InputError("manifest row without url/status", file=path, line=line,
                             fix="delete the manifest (and the page files) to start over")
        rows[row["url"]] = row
    return rows


def read_pages(pages_dir: str | Path) -> list[dict]:
    """Pages of a crawl folder: ``{"url", "title", "file", "text"}`` from the manifest's "ok" rows, or
    every ``*.txt`` file (url = file name) when there is no manifest (hand-made page folders)."""
    from glmtune.io import read_text_utf8

    folder = Path(pages_dir)
    if not folder.is_dir():
        raise InputError("pages folder not found", file=folder, fix="run `glmtune data crawl URL --out FOLDER` first")
    manifest = folder / MANIFEST
    if manifest.exists():
        rows = [r for r in _load_manifest(manifest).values() if r["status"] == "ok"]
        return [{"url": r["url"], "title": r.get("title"), "file": r["file"],
                 "text": read_text_utf8(folder / r["file"])} for r in rows]
    return [{"url": p.name, "title": p.stem, "file": p.name, "text": read_text_utf8(p)}
            for p in sorted(folder.glob("*.txt"))]
