"""A small web site served on 127.0.0.1 for crawler tests, with every trap the crawler must survive.

Pages carry nav/header/footer/cookie boilerplate around an <article>; robots.txt disallows /private/;
the home page links off-domain, into a redirect loop, to a 404, a binary file and a 20 MB page that is
streamed (chunked, no Content-Length) so the crawler's size cap is what stops it. Every request is
logged, and the bytes sent for the huge page are counted, so tests can assert what was fetched.
"""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NAV = "Home | Admissions | Research | Library | Contact us"
FOOTER = "Copyright 2026 Example University. All rights reserved. Privacy policy."
COOKIE = "We use cookies to improve your experience. Accept all cookies."
HUGE_BYTES = 20 * 1024 * 1024


def page(title: str, paragraphs: list[str], links: list[str]) -> str:
    body = "".join(f"<p>{p}</p>" for p in paragraphs)
    anchors = "".join(f'<li><a href="{href}">{href}</a></li>' for href in links)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head><body>"
            f"<header><nav><a href='/'>Home</a> {NAV}</nav></header>"
            f"<div class='cookie-banner'>{COOKIE}</div>"
            f"<main><article><h1>{title}</h1>{body}</article><aside><ul>{anchors}</ul></aside></main>"
            f"<footer>{FOOTER}</footer></body></html>")


LIBRARY = ["The university library opens at eight in the morning and closes at ten in the evening on weekdays.",
           "Students can borrow up to twenty books at a time with their campus card, for a loan period of thirty "
           "days.", "The reading room on the third floor is reserved for quiet study and requires a booking made "
           "through the library website one day in advance."]
DORMS = ["First-year students live in the east dormitories, which are a ten minute walk from the main teaching "
         "building.", "Each dormitory room has four beds, four desks and a shared bathroom; hot water is "
         "available all day.", "Visitors must register at the front desk and leave the building before eleven "
         "at night."]
# Served as GBK with the charset only in <meta>, as many Chinese campus sites do.
NOTICE = ["新生报到时间为九月一日上午八点至下午五点，地点在学校体育馆一楼大厅。",
          "报到时请携带录取通知书、身份证原件和四张一寸照片，缺少材料的同学需要到学生处补办手续。",
          "宿舍钥匙在报到当天由各学院辅导员统一发放，校园卡可以在体育馆门口的服务台领取。"]
CANTEEN = ["The north canteen serves breakfast from half past six and is known for its noodles and dumplings.",
           "Meals are paid with the campus card; a typical lunch costs between eight and fifteen yuan.",
           "The canteen on the second floor offers halal food and a vegetarian counter every day of the week."]


def site_pages() -> dict[str, tuple[str, str]]:
    """path -> (content type, body) for the ordinary pages."""
    return {
        "/": ("text/html; charset=utf-8", page("Campus guide", [
            "This guide answers the questions new students ask most often about life on campus, from the "
            "library to the dormitories and the canteens.",
            "Read each section carefully before the start of term, and ask the student office if anything is "
            "unclear."], ["/library.html", "/dorms.html#rooms", "/private/salaries.html", "http://other.invalid/x",
                          "/loop-a", "/missing.html", "/brochure.bin", "/huge.html", "mailto:office@example.edu",
                          "/library.html", "/notice.html"])),
        "/library.html": ("text/html; charset=utf-8", page("Library", LIBRARY, ["/canteen.html", "/"])),
        "/dorms.html": ("text/html; charset=utf-8", page("Dormitories", DORMS, ["/"])),
        "/canteen.html": ("text/html; charset=utf-8", page("Canteens", CANTEEN, ["/"])),
        "/notice.html": ("text/html", page("新生报到须知", NOTICE, ["/"])),
        "/private/salaries.html": ("text/html; charset=utf-8", page("Salaries", ["Secret salary table."], [])),
        "/robots.txt": ("text/plain", "User-agent: *\nDisallow: /private/\n"),
        "/brochure.bin": ("application/octet-stream", "\x00\x01binary" * 100),
    }


class LocalServer:
    """A ThreadingHTTPServer on 127.0.0.1 at a free port, served from a daemon thread while in a ``with``."""

    def _start(self, handler) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)  # port 0: the OS picks a free port
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


class LocalSite(LocalServer):
    """``with LocalSite() as site: site.url, site.requests (paths in order), site.huge_bytes_sent``."""

    def __init__(self):
        self.requests: list[str] = []
        self.huge_bytes_sent = 0
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                site.requests.append(self.path)
                pages = site_pages()
                if self.path in pages:
                    ctype, body = pages[self.path]
                    data = body.encode("utf-8")
                    if self.path == "/notice.html":
                        ctype, data = "text/html", body.replace("charset='utf-8'", "charset='gbk'").encode("gbk")
                    self.send_response(200)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                elif self.path in ("/loop-a", "/loop-b"):
                    self.send_response(302)
                    self.send_header("Location", "/loop-b" if self.path == "/loop-a" else "/loop-a")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif self.path == "/huge.html":
                    self._send_huge()
                else:
                    self.send_error(404)

            def _send_huge(self):
                # Chunked with no Content-Length: only the crawler's byte cap can stop the download.
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                chunk = b"<p>" + b"x" * 65_530 + b"</p>"
                try:
                    while site.huge_bytes_sent < HUGE_BYTES:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        site.huge_bytes_sent += len(chunk)
                    self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self._start(Handler)
        self.url = f"http://127.0.0.1:{self.port}/"
