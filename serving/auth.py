"""`--api-key`: requests must carry `Authorization: Bearer KEY`.

Every route needs the key except the probes a load balancer or Prometheus calls without
one: /health, /ping, /load, /version and /metrics (vLLM leaves those open too; unlike vLLM, braze
also guards /tokenize, /detokenize and /server_info, which show the tokenizer and the
deployment). A missing or wrong key gets an OpenAI-shaped 401 (`code: invalid_api_key`),
the same for every path, so the routes cannot be probed without the key. Keys are compared
in constant time. CORS preflights (OPTIONS) are answered by the CORS middleware, outside.
"""

from __future__ import annotations

import hmac

from .protocol import send_error

OPEN_PATHS = frozenset({"/health", "/ping", "/load", "/version", "/metrics"})


class APIKeyCheck:
    """Pure ASGI: 401 unless the Authorization header holds one of `keys` as a bearer token."""

    def __init__(self, app, keys: list[str]):
        self.app = app
        self.keys = [k.encode() for k in keys]

    def _allowed(self, scope) -> bool:
        header = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        token = token.strip()
        ok = False
        for key in self.keys:        # no early exit: the time taken says nothing
            ok |= hmac.compare_digest(token, key)
        return ok

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path") not in OPEN_PATHS \
                and not self._allowed(scope):
            await send_error(send, 401, "a valid API key is needed: send the header "
                             "'Authorization: Bearer KEY' with the key the server was started "
                             "with (--api-key or $BRAZE_API_KEY)", "invalid_request_error",
                             "invalid_api_key")
            return
        await self.app(scope, receive, send)
