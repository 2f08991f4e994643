"""`glmtune data crawl` against a local site with robots.txt, boilerplate, loops, 404s, binaries and a 20 MB page."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_site import COOKIE, FOOTER, HUGE_BYTES, NAV, LocalSite  # noqa: E402

from glmtune.data.crawl import crawl_site, read_pages  # noqa: E402
from glmtune.errors import InputError  # noqa: E402

CAP = 300_000   # bytes: the huge page must be cut off here, not downloaded


@pytest.fixture
def site():
    with LocalSite() as s:
        yield s


def test_crawl_saves_exactly_the_allowed_pages_and_reports_the_rest(site, tmp_path):
    s = crawl_site(site.url, tmp_path, depth=1, delay=0, max_bytes=CAP)
    base = site.url.rstrip("/")
    assert sorted(s.saved) == [site.url, f"{base}/dorms.html", f"{base}/library.html", f"{base}/notice.html"]
    assert s.skipped == {"disallowed by robots.txt": [f"{base}/private/salaries.html"],
                         "redirect loop": [f"{base}/loop-a"], "HTTP 404": [f"{base}/missing.html"],
                         "not HTML (application/octet-stream)": [f"{base}/brochure.bin"],
                         f"larger than {CAP} bytes": [f"{base}/huge.html"]}
    assert s.off_domain == ["http://other.invalid/x"]
    # robots.txt is read before anything else, the disallowed page is never requested, depth 2 is not reached
    assert site.requests[0] == "/robots.txt"
    assert "/private/salaries.html" not in site.requests and "/canteen.html" not in site.requests
    assert site.requests.count("/library.html") == 1          # the repeated link and the #fragment are one page
    assert site.huge_bytes_sent < HUGE_BYTES / 4              # streamed and cut off, not downloaded

    pages = {p["url"]: p for p in read_pages(tmp_path)}
    assert set(pages) == set(s.saved)
    library = pages[f"{base}/library.html"]
    assert library["title"] == "Library" and "borrow up to twenty books" in library["text"]
    notice = pages[f"{base}/notice.html"]   # GBK, charset only in <meta>
    assert notice["title"] == "新生报到须知" and "宿舍钥匙在报到当天由各学院辅导员统一发放" in notice["text"]
    for p in pages.values():
        for noise in (NAV, FOOTER, COOKIE, "Admissions", "All rights reserved"):
            assert noise not in p["text"]
    rows = [json.loads(x) for x in (tmp_path / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 9 and {r["status"] for r in rows} == {"ok", "skipped"}
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(len(r["sha256"]) == 64 and r["fetched_at"] and r["title"] for r in ok)


def test_rerun_fetches_nothing_new_and_deeper_rerun_fetches_only_new(site, tmp_path):
    crawl_site(site.url, tmp_path, depth=1, delay=0, max_bytes=CAP)
    before = list(site.requests)
    again = crawl_site(site.url, tmp_path, depth=1, delay=0, max_bytes=CAP)
    assert site.requests == before and again.requests == 0
    assert again.saved == [] and again.already_done == 9
    deeper = crawl_site(site.url, tmp_path, depth=2, delay=0, max_bytes=CAP)
    assert site.requests[len(before):] == ["/robots.txt", "/canteen.html"]
    assert [u.rsplit("/", 1)[1] for u in deeper.saved] == ["canteen.html"]


def test_max_pages_and_bad_url(site, tmp_path):
    s = crawl_site(site.url, tmp_path, depth=1, delay=0, max_pages=2, max_bytes=CAP)
    assert len(s.saved) == 2 and s.stopped_at_max_pages
    with pytest.raises(InputError, match="not an http"):
        crawl_site("ftp://example.org/", tmp_path)


def test_cli_crawl(site, tmp_path):
    from typer.testing import CliRunner

    import glmtune.cli.data  # noqa: F401
    from glmtune.cli.main import app

    res = CliRunner().invoke(app, ["data", "crawl", site.url, "--out", str(tmp_path / "pages"), "--depth", "1",
                                   "--delay", "0", "--max-bytes", str(CAP)])
    assert res.exit_code == 0, res.output
    assert "saved 4" in res.output and "disallowed by robots.txt" in res.output and "/private/salaries.html" in res.output
    assert len(list((tmp_path / "pages").glob("*.txt"))) == 4
