"""A streamed /v1/responses reply's output items as they open, grow and close
(serving/responses_route.py sends the events): the reasoning item, the message, and with
function tools each call's function_call item, as OpenAI streams them:

    response.output_item.added  ->  response.output_text.delta ...             (message)
                                    response.function_call_arguments.delta ... (a call)
                                ->  response.output_text.done / .function_call_arguments.done
    response.output_item.done
"""

from __future__ import annotations

import uuid

from . import responses_tools


class StreamItems:
    """A streamed response's output items as they open and close: the reasoning item (with
    --reasoning-parser, once the reply reasons), then the message (once it answers)."""

    def __init__(self, reply):
        self.reply = reply
        self.next_index = 0
        self.reasoning_at = self.message_at = None
        self.thought = ""               # the reasoning text streamed so far
        self.reasoning_closed = False
        self.msg_id = reply.item_id     # the open message's id

    def _where(self, at: int, item_id: str) -> dict:
        return {"item_id": item_id, "output_index": at, "content_index": 0}

    def open_message(self) -> list[bytes]:
        r = self.reply
        self.message_at, self.next_index = self.next_index, self.next_index + 1
        return [r.event("response.output_item.added", output_index=self.message_at,
                        item=r.message(None, "in_progress", self.msg_id)),
                r.event("response.content_part.added",
                        **self._where(self.message_at, self.msg_id), part=r.part(""))]

    def message_done(self, text: str, status: str, logprobs: list | None = None
                     ) -> tuple[dict, list[bytes]]:
        """The open message, finished with `text`, and its done events."""
        r, at, lp = self.reply, self.message_at, logprobs or []
        where = self._where(at, self.msg_id)
        item = r.message(text, status, self.msg_id, lp)
        return item, [r.event("response.output_text.done", **where, text=text, logprobs=lp),
                      r.event("response.content_part.done", **where, part=r.part(text, lp)),
                      r.event("response.output_item.done", output_index=at, item=item)]

    def deltas(self, think: str, said: str, answering: bool = False,
               final: bool = False, logprobs: list | None = None) -> list[bytes]:
        """Events for new reasoning text `think` and answer text `said` (`answering`: the
        reply has reached its answer, even with no text of it yet; `final`: the text has
        ended; `logprobs`: the answer tokens' not sent yet, which go with `said`)."""
        r, ev = self.reply, []
        if think:
            if self.reasoning_at is None:
                self.reasoning_at, self.next_index = self.next_index, self.next_index + 1
                ev.append(r.event("response.output_item.added", output_index=self.reasoning_at,
                                  item=r.reasoning_item(None, "in_progress")))
            ev.append(r.event("response.reasoning_text.delta",
                              **self._where(self.reasoning_at, r.reasoning_id), delta=think))
            self.thought += think
        if (said or answering) and self.message_at is None:
            ev += self.close_reasoning("completed") + self.open_message()
        if said:
            ev.append(r.event("response.output_text.delta",
                              **self._where(self.message_at, self.msg_id), delta=said,
                              logprobs=logprobs or []))
        return ev

    def close_reasoning(self, status: str) -> list[bytes]:
        """The reasoning item's done events (once, and only if it opened): before the
        message opens, or at the end."""
        r = self.reply
        if self.reasoning_at is None or self.reasoning_closed:
            return []
        self.reasoning_closed = True
        return [r.event("response.reasoning_text.done",
                        **self._where(self.reasoning_at, r.reasoning_id), text=self.thought),
                r.event("response.output_item.done", output_index=self.reasoning_at,
                        item=r.reasoning_item(self.thought, status))]

    def close(self, text: str, status: str, logprobs: list | None = None) -> list[bytes]:
        """The done events of the items still open, with the whole text of each (and the
        message's `logprobs`)."""
        _, answer = self.reply.split(text)
        ev = self.close_reasoning(status)
        if self.message_at is not None:
            ev += self.message_done(answer or "", status, logprobs)[1]
        return ev

    def output(self) -> list[dict] | None:
        """The output items as streamed, for the final response object; None: read them off
        the whole text, as a non-streamed reply does (the same items)."""
        return None


class ToolStreamItems(StreamItems):
    """With function tools: the answer goes through the tool-call parser's streamer
    (serving/tool_parsers/base.ToolStreamer), its text into the message and each call into
    a function_call item of its own. The items are kept as they close, for the final
    response object (their ids are the streamed ones)."""

    def __init__(self, reply):
        super().__init__(reply)
        self.streamer = reply.tools.streamer()
        self.answer = ""                # the answer so far: what the parser reads
        self.said = ""                  # the open message's text
        self.call = None                # the open call: [at, item_id, call_id, name, arguments]
        self.calls_made = False
        self.done_items: dict[int, dict] = {}     # output_index -> its item, once closed

    def deltas(self, think: str, said: str, answering: bool = False,
               final: bool = False, logprobs: list | None = None) -> list[bytes]:
        ev = super().deltas(think, "")            # the reasoning; the answer goes below
        self.answer += said
        for d in self.streamer.feed(self.answer, final):
            ev += self._content(d["content"]) if "content" in d else self._calls(d["tool_calls"])
        if final and answering and self.message_at is None and not self.calls_made:
            ev += self.close_reasoning("completed") + self.open_message()   # an empty answer
        return ev

    def _content(self, text: str) -> list[bytes]:
        r, ev = self.reply, self._close_call("completed")
        if self.message_at is None or self.message_at in self.done_items:
            if self.message_at is not None:       # text after a call: a message of its own
                self.msg_id, self.said = "msg_" + uuid.uuid4().hex, ""
            ev += self.close_reasoning("completed") + self.open_message()
        self.said += text
        return ev + [r.event("response.output_text.delta",
                             **self._where(self.message_at, self.msg_id), delta=text,
                             logprobs=[])]

    def _calls(self, calls: list[dict]) -> list[bytes]:
        r, ev = self.reply, []
        for c in calls:
            f = c.get("function") or {}
            if "id" in c:                           # a new call: its name, no arguments yet
                ev += self.close_reasoning("completed") + self._close_message("completed")
                ev += self._close_call("completed")
                at, self.next_index = self.next_index, self.next_index + 1
                item = responses_tools.call_item(c["id"], f["name"], "", "in_progress")
                self.call = [at, item["id"], c["id"], f["name"], ""]
                self.calls_made = True
                ev.append(r.event("response.output_item.added", output_index=at, item=item))
            if f.get("arguments"):
                self.call[4] += f["arguments"]
                ev.append(r.event("response.function_call_arguments.delta",
                                  item_id=self.call[1], output_index=self.call[0],
                                  delta=f["arguments"]))
        return ev

    def close_reasoning(self, status: str) -> list[bytes]:
        ev = super().close_reasoning(status)
        if ev:
            self.done_items[self.reasoning_at] = self.reply.reasoning_item(self.thought, status)
        return ev

    def _close_message(self, status: str) -> list[bytes]:
        if self.message_at is None or self.message_at in self.done_items:
            return []
        self.done_items[self.message_at], ev = self.message_done(self.said, status)
        return ev

    def _close_call(self, status: str) -> list[bytes]:
        if self.call is None:
            return []
        r, (at, item_id, call_id, name, arguments) = self.reply, self.call
        self.call = None
        self.done_items[at] = responses_tools.call_item(call_id, name, arguments, status,
                                                        item_id)
        return [r.event("response.function_call_arguments.done", item_id=item_id,
                        output_index=at, arguments=arguments),
                r.event("response.output_item.done", output_index=at, item=self.done_items[at])]

    def close(self, text: str, status: str, logprobs: list | None = None) -> list[bytes]:
        return self.close_reasoning(status) + self._close_message(status) + \
            self._close_call(status)

    def output(self) -> list[dict]:
        return [self.done_items[at] for at in sorted(self.done_items)]
