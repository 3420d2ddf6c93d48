"""The Engine in one background thread, and an asyncio stream of outputs per request.

The runtime Engine is not thread-safe, so exactly one thread (started here) calls
`add_request`, `abort_request` and `step`. The event loop talks to it through a command
list under a condition variable; the thread sleeps on that condition when it has no work
(no busy spin), and hands each step's outputs back to the loop in one
`call_soon_threadsafe`, where they are routed to the `RequestStream` of their request.

Admission control happens on the loop: a request is refused (`QueueFull`, HTTP 503) when
`max_queue` accepted requests are already waiting for a place in the running batch, and
(`Unavailable`, 503) while draining, after the engine thread died, or while it is stalled.

Stalls: the engine thread stamps when a step starts; a step that has not returned after
`iteration_timeout` seconds (a hung kernel, a deadlocked collective) makes the engine
"stalled": /health and /ping answer 503 saying so, `braze_engine_stalled` reads 1, and the
log says when it began and when (if ever) the step returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time

from braze.ir.errors import BrazeError

log = logging.getLogger("braze.serving")


class QueueFull(Exception):
    pass


class Unavailable(Exception):
    pass


class Rejected(Exception):
    """The engine accepted the request but cannot run it (the client's fault: HTTP 400)."""


class Aborted(Exception):
    """The request was aborted: by its client, or by the server shutting down."""


class RequestStream:
    """`async for out in stream` yields the request's RequestOutputs until the finished one."""

    def __init__(self, owner: AsyncEngine, request_id: str, num_prompt_tokens: int):
        self.owner = owner
        self.request_id = request_id
        self.num_prompt_tokens = num_prompt_tokens
        self.arrival = time.monotonic()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False
        self.ack: asyncio.Future | None = None      # set once the engine took the request

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.finished:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def abort(self, reason: str = "aborted by the client") -> None:
        """Stop generating (frees the KV blocks); a reader still waiting gets `Aborted`."""
        if not self.finished:
            self.owner.abort(self.request_id)
            self.queue.put_nowait(Aborted(reason))


class AsyncEngine:
    def __init__(self, engine, max_queue: int = 256, metrics=None,
                 iteration_timeout: float = 60.0):
        self.engine = engine
        self.max_queue = max_queue
        self.metrics = metrics
        self.iteration_timeout = iteration_timeout
        self._step_started: float | None = None      # monotonic; set by the engine thread
        self._stall_logged = False
        self._watchdog: asyncio.Task | None = None
        self.draining = False
        self._streams: dict[str, RequestStream] = {}
        self._held = 0            # client requests in flight between engine requests
        self._cond = threading.Condition()
        self._commands: list[tuple] = []
        self._stop = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._snap: dict = {"running": 0, "waiting": 0, "kv_blocks_used": 0,
                            "kv_blocks_total": 0, "preemptions": 0}
        self.error: BaseException | None = None

    # ---- lifecycle (event-loop thread) -------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._snap = self._read_stats()
        self._thread = threading.Thread(target=self._run, name="braze-engine", daemon=True)
        self._thread.start()
        self._watchdog = self._loop.create_task(self._watch_steps())

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    @property
    def num_inflight(self) -> int:
        return len(self._streams)

    def snapshot(self) -> dict:
        """Engine gauges as of its last step, with requests not yet running as waiting."""
        snap = dict(self._snap)
        snap["waiting"] = max(0, len(self._streams) - snap.get("running", 0))
        snap["engine_stalled"] = int(self.stalled_for() is not None)
        return snap

    def stalled_for(self) -> float | None:
        """Seconds the step in progress has run, when that is more than
        `iteration_timeout` (the engine is stalled); else None."""
        started = self._step_started
        if started is None:
            return None
        took = time.monotonic() - started
        return took if took > self.iteration_timeout else None

    async def _watch_steps(self) -> None:
        """Log a stall once when it is seen, and the step's return after one."""
        period = min(1.0, self.iteration_timeout / 4)
        while True:
            await asyncio.sleep(period)
            stalled = self.stalled_for()
            if stalled is not None and not self._stall_logged:
                self._stall_logged = True
                log.error("the engine is stalled: its step has not returned for %.0f s "
                          "(--engine-iteration-timeout %g); /health answers 503", stalled,
                          self.iteration_timeout)
            elif stalled is None and self._stall_logged:
                self._stall_logged = False
                log.warning("the engine's stalled step returned; /health answers 200 again")

    def begin_drain(self) -> None:
        self.draining = True

    async def wait_idle(self, timeout: float, give_up=lambda: False) -> bool:
        """Wait (bounded, and until `give_up()`) until no request is in flight; True when
        that happened."""
        deadline = time.monotonic() + timeout
        while self._busy() and time.monotonic() < deadline and self.alive and not give_up():
            await asyncio.sleep(0.05)
        return not self._busy()

    def _busy(self) -> bool:
        return bool(self._streams or self._held)

    @contextlib.contextmanager
    def holding(self):
        """A client request of many engine requests one after another (a beam search's
        steps) is in flight for the drain also between them."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1

    def abort_all(self, reason: str) -> None:
        for s in list(self._streams.values()):
            s.abort(reason)

    async def stop(self, timeout: float = 10.0) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        self.abort_all("the server is shutting down")
        with self._cond:
            self._stop = True
            self._cond.notify()
        loop = asyncio.get_running_loop()
        if self._thread is not None:
            await loop.run_in_executor(None, self._thread.join, timeout)
        self._fail_pending("the server is shutting down")
        if self._thread is None or not self._thread.is_alive():
            # the KV tiers' writes in flight land before the process exits (it skips the
            # interpreter's teardown), so a restarted server finds them
            try:
                await loop.run_in_executor(None, self.engine.close)
            except Exception:
                log.exception("closing the engine failed")

    # ---- requests (event-loop thread) -------------------------------------------------
    def unavailable_reason(self, part: bool = False) -> str | None:
        """Why no new request can be served now (draining, engine thread gone or stalled),
        or None. `part`: of a client request admitted already (a beam search's next step),
        which a drain lets finish."""
        if self.draining and not part:
            return "the server is shutting down; not accepting new requests"
        if not self.alive:
            return "the engine is not running (see the server log)"
        stalled = self.stalled_for()
        if stalled is not None:
            return (f"the engine is stalled: its current step has not returned for "
                    f"{stalled:.0f} s (more than --engine-iteration-timeout "
                    f"{self.iteration_timeout:g} s); see the server log")
        return None

    def check_admission(self, bounded: bool = True) -> None:
        """Raise Unavailable (draining, engine gone) or, when `bounded`, QueueFull
        (`max_queue` requests already waiting) when a new request cannot be taken now.
        Not `bounded`: a part of an admitted request, refused only when the engine is gone
        or stalled (a drain lets it finish)."""
        reason = self.unavailable_reason(part=not bounded)
        if reason is not None:
            raise Unavailable(reason)
        if bounded and self.snapshot()["waiting"] >= self.max_queue:
            raise QueueFull(f"the server is overloaded: {self.max_queue} requests are already "
                            "waiting (--max-queue); retry later")

    async def add(self, request_id: str, prompt, params, num_prompt_tokens: int,
                  group: str | None = None, kv_transfer_params: dict | None = None,
                  lora: str | None = None, bounded: bool = True,
                  cache_salt: str | None = None, priority: int | None = None) -> RequestStream:
        """Admit a request; returns once the engine accepted it (its errors raise here).
        `bounded=False`: a part (a prompt, sample or beam) of a client request admitted
        already, which neither the queue bound nor a drain refuses (it still may not join
        a server whose engine is gone or stalled)."""
        self.check_admission(bounded)
        stream = RequestStream(self, request_id, num_prompt_tokens)
        ack = stream.ack = self._loop.create_future()
        self._streams[request_id] = stream
        self._send(("add", request_id, prompt, params, ack, group, kv_transfer_params, lora,
                    cache_salt, priority))
        try:
            await ack
        except asyncio.CancelledError:
            stream.abort()
            raise
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        if self.metrics is not None:
            self.metrics.on_admitted(num_prompt_tokens)
        return stream

    async def call(self, fn):
        """Run `fn(engine)` on the engine thread (between steps); its result or error."""
        reason = self.unavailable_reason()
        if reason is not None:
            raise Unavailable(reason)
        fut = self._loop.create_future()
        self._send(("call", fn, fut))
        return await fut

    def abort(self, request_id: str) -> None:
        s = self._streams.pop(request_id, None)
        if s is None:
            return
        if self.metrics is not None:
            self.metrics.on_finished("abort", {}, time.monotonic() - s.arrival)
        self._send(("abort", request_id))

    def _send(self, cmd: tuple) -> None:
        with self._cond:
            self._commands.append(cmd)
            self._cond.notify()

    # ---- delivery (event-loop thread, scheduled by the engine thread) ------------------
    def _deliver(self, acks, outputs, snap) -> None:
        self._snap = snap
        for fut, err in acks:
            if fut.done():         # its client went away while it was being added
                continue
            if err is not None:
                fut.set_exception(err)
            else:
                fut.set_result(None)
        for out in outputs:
            s = self._streams.get(out.request_id)
            if s is None:          # aborted on our side already
                continue
            if self.metrics is not None and out.new_token_ids:
                self.metrics.on_tokens(len(out.new_token_ids))
            if out.finished:
                del self._streams[out.request_id]
                if self.metrics is not None:
                    self.metrics.on_finished(out.finish_reason, out.metrics or {},
                                             time.monotonic() - s.arrival)
            s.queue.put_nowait(out)

    def _reject(self, ids: list[str], message: str) -> None:
        for rid in ids:
            s = self._streams.pop(rid, None)
            if s is not None:
                if self.metrics is not None:
                    self.metrics.on_finished("error", {}, time.monotonic() - s.arrival)
                s.queue.put_nowait(Rejected(message))

    def _fail_pending(self, message: str) -> None:
        with self._cond:
            cmds, self._commands = self._commands, []
        for cmd in cmds:
            if cmd[0] == "add" and not cmd[4].done():
                cmd[4].set_exception(Unavailable(message))
            elif cmd[0] == "call" and not cmd[2].done():
                cmd[2].set_exception(Unavailable(message))

    def _fail_all(self, err: BaseException) -> None:
        self.error = err
        message = f"the engine failed: {type(err).__name__}: {err}"
        streams, self._streams = list(self._streams.values()), {}
        for s in streams:
            if s.ack is not None and not s.ack.done():
                # taken by the engine in the step that failed, never acknowledged: its
                # `add` raises (a 503, counted as refused), else it would wait for ever
                s.ack.set_exception(Unavailable(message))
                continue
            if self.metrics is not None:
                self.metrics.on_finished("error", {}, time.monotonic() - s.arrival)
            s.queue.put_nowait(Unavailable(message))
        self._fail_pending(message)
        # nothing runs or holds KV blocks any more: the last step's gauges would say so
        # for ever
        self._snap = {**self._snap, "running": 0, "engine_waiting": 0, "kv_blocks_used": 0}
        if self._snap.get("kv_groups"):
            self._snap["kv_groups"] = [{**g, "blocks_used": 0} for g in self._snap["kv_groups"]]

    def _post(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:       # the loop is closed: the server is gone
            pass

    # ---- the engine thread -------------------------------------------------------------
    def _read_stats(self) -> dict:
        eng = self.engine
        st = dict(eng.stats())
        st["running"] = eng.num_running()
        st["engine_waiting"] = eng.num_waiting()
        return st

    def _drop_waiting(self, err: BrazeError) -> list:
        waiting = getattr(getattr(self.engine, "scheduler", None), "waiting", None)
        ids = [r.request_id for r in waiting or ()]
        if not ids:
            raise err
        log.error("%s; failing %d waiting request(s)", err, len(ids))
        for rid in ids:
            self.engine.abort_request(rid)
        self._post(self._reject, ids, str(err))
        return []

    def _run(self) -> None:
        eng = self.engine
        busy = False
        try:
            while True:
                with self._cond:
                    while not self._commands and not self._stop and not busy:
                        self._cond.wait()
                    if self._stop:
                        return
                    cmds, self._commands = self._commands, []
                acks, must_step = [], False
                for cmd in cmds:
                    if cmd[0] == "add":
                        _, rid, prompt, params, fut, group, kv_params, lora, salt, pr = cmd
                        try:
                            eng.add_request(rid, prompt, params, group=group,
                                            kv_transfer_params=kv_params, lora_request=lora,
                                            cache_salt=salt, priority=pr)
                            acks.append((fut, None))
                        except Exception as e:      # BrazeError: the client's fault → 400
                            acks.append((fut, e))
                    elif cmd[0] == "call":
                        _, fn, fut = cmd
                        try:
                            self._post(_settle, fut, fn(eng), None)
                        except Exception as e:      # handed to the caller
                            self._post(_settle, fut, None, e)
                    else:
                        eng.abort_request(cmd[1])
                        must_step = True            # the step reports (and frees) aborted ones
                try:
                    if eng.has_unfinished() or must_step:
                        self._step_started = time.monotonic()
                        outputs = eng.step()
                    else:
                        outputs = []
                except BrazeError as e:
                    # a waiting request can never run (say, its prompt needs more KV blocks
                    # than the cache has): fail the waiting ones, keep serving the rest
                    outputs = self._drop_waiting(e)
                finally:
                    self._step_started = None
                busy = eng.has_unfinished()
                self._post(self._deliver, acks, outputs, self._read_stats())
        except BaseException as e:
            log.exception("the engine thread failed; /health now reports 503")
            self._post(self._fail_all, e)


def _settle(fut, result, err) -> None:
    if fut.done():
        return
    if err is not None:
        fut.set_exception(err)
    else:
        fut.set_result(result)
