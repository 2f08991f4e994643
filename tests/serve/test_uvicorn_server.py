"""The slow-client guards on a model-free app, for both HTTP protocols uvicorn may pick: the header
timeout (glmtune.serve.uvicorn_server) and a 413 a client that sends its whole body first can read."""
from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request

import pytest

from conftest import LiveServer


async def echo_length(scope, receive, send):
    """Reads the whole body and answers with its length."""
    if scope["type"] != "http":
        return
    size, more = 0, True
    while more:
        message = await receive()
        size, more = size + len(message.get("body", b"")), message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(str(size)))]})
    await send({"type": "http.response.body", "body": str(size).encode()})


@pytest.fixture(params=["h11", "httptools"])
def guarded(request):
    from uvicorn.config import HTTP_PROTOCOLS
    from uvicorn.importer import import_from_string

    from glmtune.serve.app import BodyLimit
    from glmtune.serve.uvicorn_server import header_timeout_protocol

    server = LiveServer(BodyLimit(echo_length, max_body=1024))
    server.server.config.http = header_timeout_protocol(0.4, import_from_string(HTTP_PROTOCOLS[request.param]))
    with server:
        yield server


def status_of(url: str, body) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=20) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_413_after_a_whole_body_and_headers_that_never_finish(guarded):
    assert status_of(guarded.url, b"x" * 1000) == 200
    assert status_of(guarded.url, b"x" * (8 << 20)) == 413  # Content-Length over the limit
    assert status_of(guarded.url, iter([b"y" * 65536] * 128)) == 413  # chunked, counted as it comes
    for partial in (b"", b"GET / HT", b"POST / HTTP/1.1\r\nContent-Length: 5\r\n"):
        with socket.create_connection(("127.0.0.1", guarded.port), timeout=5) as sock:
            sock.sendall(partial)
            t0 = time.time()
            assert sock.recv(100) == b"" and 0.3 < time.time() - t0 < 2, partial
    # a slow body is not the header guard's business: headers done, the request runs
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=5) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nab")
        time.sleep(0.8)
        sock.sendall(b"cd")
        assert sock.recv(1000).startswith(b"HTTP/1.1 200")
