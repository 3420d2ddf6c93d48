"""--limit-concurrency: past it, an OpenAI-shaped 503 that carries X-Request-Id.

uvicorn enforces the limit itself, but answers a bare text/plain "Service Unavailable"
before the application (and so its X-Request-Id middleware) sees the request: a gateway
cannot tie that 503 to its request, and an OpenAI client cannot read it. The protocol
class here takes the limit from uvicorn and applies it in front of the application, with
uvicorn's count: open connections, and requests in progress besides this one.
"""

from __future__ import annotations

import logging
import uuid

from .protocol import client_request_id, send_error

log = logging.getLogger("braze.serving")


def limited_protocol(base: type) -> type:
    """uvicorn's HTTP protocol class `base` answering requests past its
    `limit_concurrency` with the 503 of `_Limited`."""

    class LimitedProtocol(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            limit, self.limit_concurrency = self.limit_concurrency, None
            if limit is not None:
                self.app = _Limited(self.app, limit, self.connections, self.tasks)

    return LimitedProtocol


class _Limited:
    def __init__(self, app, limit: int, connections: set, tasks: set):
        self.app, self.limit = app, limit
        self.connections, self.tasks = connections, tasks

    async def __call__(self, scope, receive, send):
        # this request's own task is in `tasks` already (uvicorn counts before adding it)
        if scope["type"] != "http" or (len(self.connections) < self.limit
                                       and len(self.tasks) - 1 < self.limit):
            return await self.app(scope, receive, send)
        rid = client_request_id(scope) or uuid.uuid4().hex
        log.warning("request %s refused: %d connections and requests are open already "
                    "(--limit-concurrency)", rid, self.limit)
        await send_error(send, 503, f"the server is at its limit of {self.limit} open "
                         "connections and requests (--limit-concurrency); retry later",
                         "service_unavailable", "too_many_connections", close=True,
                         headers=[(b"x-request-id", rid.encode("latin-1"))])
