"""How `glmtune serve` runs uvicorn: a request-header timeout and a clean Ctrl-C.

Header timeout (the slowloris guard uvicorn lacks): uvicorn times out an idle keep-alive connection
(``timeout_keep_alive``) but not one whose request headers never finish: a client that opens sockets
and sends a partial request line, a byte now and then, holds them (and the server's file
descriptors) for ever. :func:`header_timeout_protocol` wraps the protocol uvicorn would pick
(httptools when installed, else h11): a connection whose request headers are not complete
``seconds`` after it opened (or after the first byte of its next request) is closed. Both uvicorn
protocols start a request cycle (``self.cycle``) exactly when its headers are complete, so that is
what the guard watches; a request in progress (a slow body, a long answer) is never cut by it.

Ctrl-C: :class:`Server` shuts down like uvicorn (first Ctrl-C graceful, the next ones stop waiting for
open connections) but records the interrupt instead of re-raising every captured signal inside the
event loop after shutdown, which turned three quick Ctrl-Cs into a KeyboardInterrupt traceback in
the middle of the lifespan shutdown, and it runs the lifespan shutdown even when forced; the caller
raises one KeyboardInterrupt when ``interrupted``.
"""
from __future__ import annotations

import asyncio
import signal

import uvicorn


def header_timeout_protocol(seconds: float, base: type[asyncio.Protocol] | None = None) -> type[asyncio.Protocol]:
    """A subclass of ``base`` (default: uvicorn's ``auto`` choice) for ``uvicorn.Config(http=...)``."""
    if base is None:
        from uvicorn.protocols.http.auto import AutoHTTPProtocol as base

    class HeaderTimeoutProtocol(base):  # type: ignore[valid-type, misc]
        header_timeout = seconds
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and self._between_requests():
                self._arm_header_timer()  # the first byte of the next request on a kept-alive connection
            super().data_received(data)
            if not self._between_requests():
                self._cancel_header_timer()

        def connection_lost(self, exc) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def _between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm_header_timer(self) -> None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._on_header_timeout)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _on_header_timeout(self) -> None:
            self._header_timer = None
            if self._between_requests() and not self.transport.is_closing():
                self.transport.close()

    HeaderTimeoutProtocol.__qualname__ = f"HeaderTimeout{base.__name__}"
    return HeaderTimeoutProtocol


class Server(uvicorn.Server):
    """uvicorn's server whose signal handler records a Ctrl-C (``interrupted``) instead of having
    uvicorn re-raise it after shutdown, and whose forced shutdown (a second Ctrl-C) still runs the
    app's lifespan shutdown (the engine stops its generation threads), bounded by what that does."""

    interrupted = False

    async def shutdown(self, sockets=None) -> None:
        await super().shutdown(sockets)
        if self.force_exit:
            # uvicorn skips it when forced, and the event loop then cancels the waiting lifespan
            # task, which starlette reports as a CancelledError traceback
            await self.lifespan.shutdown()

    def handle_exit(self, sig: int, frame) -> None:
        # uvicorn.Server.handle_exit, minus the list of signals it re-raises once it has shut down
        self.interrupted = self.interrupted or sig == signal.SIGINT
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True
