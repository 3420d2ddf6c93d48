"""A bound on request bodies: bigger than `--max-request-body-bytes` gets 413.

Without it a client can make the server parse and tokenise megabytes of JSON for a prompt
the model could never take (a 10 MB prompt tied up a core for 20 s). The check is made
before the application sees the body: on `Content-Length` when the client sends one, else
while the (chunked) body arrives. The refused body is read and dropped, up to
`DRAIN_LIMIT` bytes, before answering, so that a client still writing its body reads the
413 rather than a reset connection; the connection is then closed.
"""

from __future__ import annotations

import logging

from .protocol import send_error

log = logging.getLogger("braze.serving")

DRAIN_LIMIT = 64 * 1024 * 1024


class BodyTooLarge(Exception):
    pass


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v.decode("latin-1")
    return None


class BodyLimit:
    """Pure ASGI: 413 (OpenAI-shaped, `code: request_too_large`) for a body over `max_bytes`."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _message(self, size: str) -> str:
        return (f"the request body is {size} bytes; this server accepts at most "
                f"{self.max_bytes} (--max-request-body-bytes)")

    async def _refuse(self, send, scope, size: str) -> None:
        log.info("answered 413 to %s: a request body of %s bytes", _client(scope), size)
        await send_error(send, 413, self._message(size), "invalid_request_error",
                         "request_too_large", close=True)

    async def _drain(self, receive, got: int) -> None:
        while got <= DRAIN_LIMIT:
            message = await receive()
            if message["type"] != "http.request":
                return
            got += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = _header(scope, b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > self.max_bytes:
            # a client waiting for `100 Continue` has not sent the body: refuse at once
            if (_header(scope, b"expect") or "").lower() != "100-continue":
                await self._drain(receive, 0)
            await self._refuse(send, scope, length.strip())
            return
        state = {"got": 0, "refused": False}

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request" and not state["refused"]:
                state["got"] += len(message.get("body", b""))
                if state["got"] > self.max_bytes:
                    state["refused"] = True
                    if message.get("more_body", False):
                        await self._drain(receive, state["got"])
                    await self._refuse(send, scope, f"more than {self.max_bytes}")
                    raise BodyTooLarge()
            return message

        async def guarded_send(message):
            if not state["refused"]:      # what the app answers to the cut read is dropped
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not state["refused"]:
                raise


def _client(scope) -> str:
    addr = scope.get("client")
    return f"{addr[0]}:{addr[1]}" if addr else "an unknown client"
