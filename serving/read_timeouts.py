"""Read timeouts: a client must send a request's headers, then its body, within `--read-timeout`.

uvicorn times out only idle keep-alive connections, so a client that trickles a header
line every few seconds (slowloris), or a body byte by byte, holds a connection, and with
it a slot of `--limit-concurrency`, for ever. Two guards:

- headers: the HTTP protocol class is wrapped so that a connection whose next request's
  headers are not complete `seconds` after it opened (or after the request's first byte,
  on a kept-alive connection) is closed;
- body: `BodyTimeout`, an ASGI middleware, answers 408 and closes the connection when
  the body is not complete `seconds` after the headers.
"""

from __future__ import annotations

import asyncio
import logging

from .protocol import send_error

log = logging.getLogger("braze.serving")


def header_timeout_protocol(base: type, seconds: float) -> type:
    """uvicorn's HTTP protocol class `base` (h11 or httptools: both keep the current request
    in `self.cycle`) with a deadline on request headers."""

    class HeaderTimeoutProtocol(base):
        _header_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def data_received(self, data):
            super().data_received(data)
            cycle = self.cycle
            if cycle is None or cycle.response_complete:      # still reading headers
                if self._header_timer is None:
                    self._arm()
            elif self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def connection_lost(self, exc):
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().connection_lost(exc)

        def _arm(self):
            self._header_timer = self.loop.call_later(seconds, self._headers_too_slow)

        def _headers_too_slow(self):
            self._header_timer = None
            if not self.transport.is_closing():
                log.info("closed the connection from %s: no complete request headers within "
                         "%.0f s (--read-timeout)", _client(self.client), seconds)
                self.transport.close()

    return HeaderTimeoutProtocol


def _client(addr) -> str:
    return f"{addr[0]}:{addr[1]}" if addr else "an unknown client"


class BodyTimedOut(Exception):
    pass


class BodyTimeout:
    """Pure ASGI: the request body must arrive whole within `seconds` of the headers, else
    408 with `Connection: close`. What the application does with the interrupted read (it
    sees BodyTimedOut raised from `receive`) is dropped: the 408 is the response."""

    def __init__(self, app, seconds: float):
        self.app, self.seconds = app, seconds

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.seconds
        state = {"body_done": False, "started": False, "timed_out": False}

        async def timed_receive():
            if state["body_done"]:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                state["timed_out"] = True
                if not state["started"]:
                    await send_error(send, 408, f"the request body did not arrive within "
                                     f"{self.seconds:.0f} s", "invalid_request_error",
                                     "request_timeout", close=True)
                log.info("answered 408 to %s: the request body did not arrive within %.0f s "
                         "(--read-timeout)", _client(scope.get("client")), self.seconds)
                raise BodyTimedOut() from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                state["body_done"] = True
            return message

        async def guarded_send(message):
            if state["timed_out"]:
                return
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, timed_receive, guarded_send)
        except Exception:
            if not state["timed_out"]:
                raise

