"""Stored responses (`braze serve --enable-responses-store`): what OpenAI's Responses API
keeps so that a conversation can go on by id, and a long reply can run in the background.

With the store on, a response whose request leaves `store` true (OpenAI's default) is kept
once it ends, with the conversation it answered (earlier turns and its own input, not its
`instructions`: OpenAI does not carry those over). Then:

    POST   /v1/responses {"previous_response_id": ID, ...}  the conversation goes on
    POST   /v1/responses {"background": true, ...}          answers "queued" at once
    GET    /v1/responses/{id}                               the response as it stands
    GET    /v1/responses/{id}/input_items                   its input, as OpenAI lists it
    POST   /v1/responses/{id}/cancel                        stops a background response
    DELETE /v1/responses/{id}                               forgets it

vLLM keeps every response in memory for as long as the server runs (its
VLLM_ENABLE_RESPONSES_API_STORE); braze keeps the last `capacity`
(--responses-store-size): the oldest finished one goes first, a running background one never.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from .protocol import APIError, bad_request

log = logging.getLogger("braze.serving")

RUNNING = ("queued", "in_progress")


@dataclass
class Stored:
    response: dict                  # the response object as it stands
    context: list                   # the input items it answered: earlier turns, then its own
    input_items: list               # its own input items, each with an id
    task: asyncio.Task | None = field(default=None, repr=False)   # a background run
    abort: Callable[[str], None] | None = field(default=None, repr=False)  # its engine request

    async def cancel(self) -> None:
        """Stop a background response that is still running: its object then says
        cancelled (a finished one stays as it ended)."""
        if self.task is None or self.task.done():
            return
        self.task.cancel()
        await asyncio.wait([self.task])
        if self.running:            # cancelled before its run began
            self.abort("the response was cancelled")
            self.response = {**self.response, "status": "cancelled"}

    @property
    def running(self) -> bool:
        return self.response["status"] in RUNNING

    def conversation(self) -> list:
        """The items a response that follows this one continues: what this one answered,
        then its output."""
        return self.context + self.response["output"]


class ResponseStore:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._kept: OrderedDict[str, Stored] = OrderedDict()

    def __len__(self) -> int:
        return len(self._kept)

    def put(self, rid: str, stored: Stored) -> None:
        self._kept[rid] = stored
        self._kept.move_to_end(rid)
        over = len(self._kept) - self.capacity
        if over <= 0:
            return
        for old in [k for k, s in self._kept.items() if not s.running][:over]:
            del self._kept[old]
            log.debug("the responses store forgot %s (--responses-store-size %d)", old,
                      self.capacity)

    def check_free(self, rid: str) -> None:
        """409 when a stored response already has the id `rid` (built on a client's
        X-Request-Id, sent again): keeping a second would lose the first."""
        if rid in self._kept:
            raise APIError(409, f"a stored response already has the id {rid!r}, which this "
                           f"request's X-Request-Id makes: send another X-Request-Id, or "
                           f"DELETE /v1/responses/{rid} first", "invalid_request_error", None,
                           "conflict")

    def get(self, rid: str) -> Stored:
        """The stored response `rid`; 404 naming it otherwise."""
        s = self._kept.get(rid)
        if s is None:
            raise not_found(rid, self.capacity)
        return s

    def delete(self, rid: str) -> Stored:
        """Forget `rid` (the caller cancels it if it runs); 404 naming it if not kept."""
        s = self.get(rid)
        del self._kept[rid]
        return s


def not_found(rid: str, capacity: int | None, param: str | None = None) -> APIError:
    where = ("this server stores no responses (start it with --enable-responses-store)"
             if capacity is None else
             f"it was stored with store: false, deleted, never made, or forgotten (the "
             f"store keeps the last {capacity}: --responses-store-size)")
    return APIError(404, f"no response with id {rid!r}: {where}", "invalid_request_error",
                    param, "not_found")


def previous(store: ResponseStore | None, rid: str) -> list:
    """The conversation that `previous_response_id` continues; a 404 or 400 naming it when
    there is none to continue."""
    if store is None:
        raise bad_request("previous_response_id needs stored responses: start the server "
                          "with --enable-responses-store, or send the whole conversation as "
                          "input", "previous_response_id")
    try:
        s = store.get(rid)
    except APIError as e:
        e.param = "previous_response_id"
        raise
    if s.running:
        raise bad_request(f"the response {rid!r} is still {s.response['status']}: wait for "
                          f"it to end (GET /v1/responses/{rid})", "previous_response_id")
    return s.conversation()


def input_items(input_) -> list[dict]:
    """A request's `input` as the list of items OpenAI stores for it: a string is one user
    message; every item gets an id."""
    items = [{"type": "message", "role": "user", "content": input_}] \
        if isinstance(input_, str) else [dict(i) if isinstance(i, dict) else i for i in input_]
    for item in items:
        if isinstance(item, dict) and not item.get("id"):
            prefix = "rs_" if item.get("type") == "reasoning" else "msg_"
            item["id"] = prefix + uuid.uuid4().hex
    return items


def page(items: list[dict], limit: int, order: str, after: str | None) -> dict:
    """OpenAI's list object for GET /v1/responses/{id}/input_items: `order` asc (as sent) or
    desc (newest first, the default), `limit` items after the item `after`."""
    if not 1 <= limit <= 100:
        raise bad_request(f"limit must be from 1 to 100, got {limit}", "limit")
    if order not in ("asc", "desc"):
        raise bad_request(f"order must be 'asc' or 'desc', got {order!r}", "order")
    seq = list(items) if order == "asc" else list(reversed(items))
    if after is not None:
        ids = [i.get("id") for i in seq]
        if after not in ids:
            raise bad_request(f"after names no input item of this response: {after!r}",
                              "after")
        seq = seq[ids.index(after) + 1:]
    data = seq[:limit]
    return {"object": "list", "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": len(seq) > limit}


__all__ = ["ResponseStore", "Stored", "input_items", "not_found", "page", "previous"]
