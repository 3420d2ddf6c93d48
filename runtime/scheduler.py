"""Continuous batching: which requests run in the next step, and how many tokens each.

Each step has a token budget (`max_num_tokens`) and a sequence limit (`max_num_seqs`).
Running requests go first, in admission order: a decoding request takes one token,
a request part-way through its prompt takes as much of the rest as the budget allows
(chunked prefill). Then waiting requests are admitted first-come first-served while
the budget, the sequence limit and the KV cache allow; admission needs blocks for
the whole prompt (less what the prefix cache already holds). Under vLLM's "priority"
policy the waiting queue is ordered by (priority, arrival) instead, lower first, and a
preemption takes the running request last in that order, not the last admitted.

Parallel samples of one prompt (n, best_of: requests with the same `group`) share its
KV blocks through the prefix cache: a sibling waits while another one is still
prefilling the prompt, then is admitted with the prompt's full blocks as cache hits.

When a running request needs a new block and none is free, the most recently
admitted running request is preempted by recompute: its blocks are freed, it goes
back to the front of the waiting queue with its output so far, and on readmission
the prompt and that output are prefilled again (often from the prefix cache).
Nothing is lost: the tokens it already produced stay in the request. A step that
preempts admits no new requests.

A request admitted with blocks loaded from a lower KV tier (runtime/kv_offload.py) holds
its blocks but is not scheduled while their copy runs (`Request.kv_loading`; other requests
run meanwhile); once it has landed the blocks enter the prefix cache and the request runs.

Scheduling a chunk advances the request's `num_computed` at once: the device runs
steps in order, so the next step may be scheduled while this one still runs
(tokens being sampled count through `Request.num_pending`). `commit` later puts
the blocks a finished step wrote into the prefix cache.

Pure Python over runtime.block_manager; no torch.
"""

from __future__ import annotations

import numbers
from collections import deque
from dataclasses import dataclass, field

from braze.ir.errors import BrazeError

from .block_manager import BlockManager
from .prompt_logprobs import limit_rows
from .request import Request, Status


def check_priority(priority, policy: str = "fcfs") -> int:
    """vLLM's request `priority` as an int (None: 0). Under scheduling_policy "priority"
    any integer (lower runs first); under "fcfs" (the default), as vLLM's, any priority
    but 0 is refused rather than ignored."""
    if priority is None:
        return 0
    if not isinstance(priority, numbers.Integral) or isinstance(priority, bool):
        raise BrazeError(f"priority must be an integer, got {priority!r}", param="priority")
    if policy == "priority" or priority == 0:      # (numpy's integers included)
        return int(priority)
    raise BrazeError(f"priority={priority!r}: this engine schedules requests first-come "
                     f"first-served (scheduling_policy 'fcfs', vLLM's default) and takes no "
                     f"priorities; leave priority out or give 0, or start it with "
                     f"scheduling_policy='priority' (--scheduling-policy priority)",
                     param="priority")


def _rank(req: Request) -> tuple:
    return req.priority, req.metrics.arrival_time


class ScheduledChunk:
    """`num_new` tokens of `request` run this step, from position `start` (its tokens
    already in the cache). `samples`: the chunk reaches the request's last token, so the
    step samples for it. `epoch`: the request's preemption count when scheduled.
    `num_draft`: how many of the new tokens are speculative proposals after the request's
    last token (runtime/speculative.py); the step scores each of them too."""

    __slots__ = ("request", "num_new", "start", "samples", "epoch", "num_draft")

    def __init__(self, request: Request, num_new: int, start: int, samples: bool | None = None):
        self.request = request
        self.num_new = num_new
        self.start = start
        self.samples = start + num_new == request.num_tokens if samples is None else samples
        self.epoch = request.metrics.num_preemptions
        self.num_draft = 0


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # the chunks that complete at least one KV block, the only ones `commit` has work for
    # (a decode step of 256 requests in blocks of 16 has about 16)
    fills: list[ScheduledChunk] = field(default_factory=list)
    # waiting requests passed over because their KV is being staged from a lower tier
    staging: int = 0
    # running requests not scheduled because their loaded KV blocks are still being copied in
    loading: int = 0
    # speculative tokens scheduled for verification (ScheduledChunk.num_draft, summed)
    num_draft: int = 0
    # indices of the chunks that score prompt tokens (prompt_logprobs; runtime/prompt_logprobs.py)
    prompt_chunks: list[int] | tuple = ()      # (no list made for steps without them)
    # waiting requests that cannot run (their LoRA adapter could not be read again): the
    # engine ends each with its error as the stop_reason
    failed: list[tuple[Request, str]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_new for c in self.chunks)

    @property
    def decode_only(self) -> bool:
        return all(c.num_new == 1 for c in self.chunks)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_tokens: int,
                 watermark_blocks: int = 0, policy: str = "fcfs"):
        if max_num_seqs < 1 or max_num_tokens < 1:
            raise BrazeError(f"max_num_seqs ({max_num_seqs}) and max_num_tokens "
                             f"({max_num_tokens}) must be positive")
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_tokens = max_num_tokens
        self.watermark = watermark_blocks
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # "priority": the waiting queue in (priority, arrival) order, and preemption takes
        # the running request last in that order (vLLM's policy of that name)
        self.by_priority = policy == "priority"
        self.num_preemptions = 0
        # runtime/kv_offload.py's KVOffload when KV blocks have lower tiers: asked whether a
        # waiting request's blocks are staged (`ready`), and to fill them on admission (`load`)
        self.kv_loader = None
        # runtime/lora.py's LoRAManager when the artifact serves adapters: a request's
        # adapter is pinned in a device slot while it runs
        self.lora = None
        # prompt_logprobs (runtime/prompt_logprobs.py): running requests that asked for them,
        # and, for an artifact whose logits are pruned, the most logits rows a step computes
        self.num_prompt_logprobs = 0
        self.logits_row_cap: int | None = None

    # ------------------------------------------------------------------ queue

    def add(self, req: Request) -> None:
        req.status = Status.WAITING
        if self.by_priority:
            self._queue(req)
        else:
            self.waiting.append(req)

    def _queue(self, req: Request) -> None:
        """Into the waiting queue at its (priority, arrival) place, after its equals."""
        key, w = _rank(req), self.waiting
        i = len(w)
        while i and _rank(w[i - 1]) > key:
            i -= 1
        w.insert(i, req)

    def remove(self, req: Request) -> None:
        """Take a request out (finished or aborted), freeing its blocks."""
        if req.status is Status.RUNNING:
            self.running.remove(req)
            self._abandon_load(req)
            self.bm.free(req.request_id)
            self._release_lora(req)
            self.num_prompt_logprobs -= req.params.prompt_logprobs is not None
        elif req.status is Status.WAITING:
            self.waiting.remove(req)
        req.status = Status.FINISHED

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # --------------------------------------------------------------- schedule

    def schedule(self) -> SchedulerOutput:
        out = self._schedule()
        if self.num_prompt_logprobs:    # fit prompt-logprobs chunks into the logits rows
            limit_rows(out, self.logits_row_cap, self.bm.block_size)
        return out

    def _schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_tokens
        i = 0
        running, reserve, chunks, fills = self.running, self.bm.reserve, out.chunks, out.fills
        bs = self.bm.block_size
        # a hybrid cache (runtime/hybrid_cache.py) releases window blocks behind each chunk
        slide = getattr(self.bm, "slide", None)
        while i < len(running) and budget > 0:      # the decode hot path: keep it lean
            req = running[i]
            if req.kv_loading and not self._landed(req):
                i += 1
                out.loading += 1
                continue
            start = req.num_computed
            real = len(req.all_token_ids) + req.num_pending      # req.num_tokens, inlined
            total = real + len(req.draft_token_ids)      # speculative proposals after it
            num_new = total - start if total - start < budget else budget
            if num_new <= 0 or (req.num_pending and req.reaches_limit):
                i += 1                  # waiting for its last token to come back
                continue
            end = start + num_new
            if slide is not None:
                slide(req.request_id, start)
            if end > real and not reserve(req.request_id, end):
                end = real                  # no room for its guesses: drop them, preempt no one
                num_new = end - start
            if not reserve(req.request_id, end):
                before = running[:i]
                grown = self._grow(req, num_new, out)
                # the priority policy may take a victim scheduled earlier in this step: its
                # chunk goes too, and requests before req may have left the running list
                budget += self._unschedule(out)
                i = sum(r.status is Status.RUNNING for r in before)
                if not grown:
                    continue            # req itself was preempted; running[i] is the next one
            c = ScheduledChunk(req, num_new, start, end >= real)
            if end > real:
                c.num_draft = end - real
                out.num_draft += end - real
            chunks.append(c)
            if end // bs != start // bs:
                fills.append(c)
            req.num_computed = end
            budget -= num_new
            i += 1
        if out.preempted:
            return out
        loader, w = self.kv_loader, 0
        while w < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[w]
            if req.num_pending:         # preempted while a token was in flight: wait for it
                break
            # prompt logprobs need the logits of every prompt position: no cache hits, and
            # no blocks loaded from lower KV tiers either
            use_cache = req.params.prompt_logprobs is None
            if use_cache and loader is not None and not loader.ready(req, self.bm):
                w += 1                  # its KV is on its way from a lower tier: admit others
                out.staging += 1
                continue
            if req.group is not None and self._sibling_prefilling(req):
                break                   # share the sibling's prompt blocks once they are cached
            tokens = req.all_token_ids
            salt = req.kv_salt
            if not self.bm.can_allocate(tokens, self.watermark if self.running else 0, use_cache,
                                        salt):
                break
            if req.lora is not None:
                try:
                    req.lora_slot = self.lora.acquire(req.lora)
                except BrazeError as e:     # its adapter's files are gone: it alone ends
                    del self.waiting[w]
                    req.status = Status.FINISHED
                    out.failed.append((req, str(e)))
                    continue
                if req.lora_slot is None:   # every adapter slot is pinned by running
                    w += 1                  # requests: admit others (vLLM does the same)
                    continue
            cached = self.bm.allocate(req.request_id, tokens, use_cache, salt)
            del self.waiting[w]
            if use_cache and loader is not None:
                loaded = loader.load(req, self.bm, cached)
                cached += loaded
                req.kv_loading = loaded > 0
            req.num_computed = cached
            req.status = Status.RUNNING
            self.num_prompt_logprobs += not use_cache
            if req.metrics.first_scheduled_time is None:
                req.metrics.num_cached_tokens = cached
            self.running.append(req)
            if req.kv_loading and not self._landed(req):
                out.loading += 1        # holds its blocks; runs once they have landed
                continue
            num_new = min(req.num_tokens - cached, budget)
            if slide is not None and not self.bm.reserve(req.request_id, cached + num_new):
                raise BrazeError(f"request {req.request_id!r}: no KV blocks for its first "
                                 f"chunk although can_allocate said so (a bug)")
            c = ScheduledChunk(req, num_new, cached)
            out.chunks.append(c)
            if (cached + num_new) // bs != cached // bs:
                out.fills.append(c)
            req.num_computed = cached + num_new
            budget -= num_new
        return out

    def _landed(self, req: Request) -> bool:
        """Whether the blocks `req` loaded from a lower KV tier have been copied in; then
        they enter the prefix cache as computed, and the request may run."""
        if not self.kv_loader.settled(req):
            return False
        req.kv_loading = False
        self.bm.commit(req.request_id, req.num_computed, req.all_token_ids)
        return True

    def _abandon_load(self, req: Request) -> None:
        """Before freeing the blocks of a request whose load may still be copying in."""
        if req.kv_loading:
            self.kv_loader.abandon(req)
            req.kv_loading = False

    def _sibling_prefilling(self, req: Request) -> bool:
        """A parallel sample (same `group`, same prompt) is running but its prompt's full
        blocks are not in the prefix cache yet: admitting `req` now would compute the
        prompt again instead of sharing those blocks."""
        full = len(req.prompt_token_ids) // self.bm.block_size
        if full == 0 or not self.bm.enable_prefix_caching or req.params.prompt_logprobs is not None:
            return False                # (prompt logprobs: it computes its prompt anyway)
        return any(r.group == req.group and self.bm.num_registered(r.request_id) < full
                   for r in self.running)

    def _grow(self, req: Request, num_new: int, out: SchedulerOutput) -> bool:
        """Make room in the cache for `num_new` more tokens of `req`, preempting the most
        recently admitted requests (the priority policy: the last in (priority, arrival)
        order, which may be scheduled already; `_unschedule`) if needed. False if `req`
        itself had to go."""
        total = req.num_computed + num_new
        while not self.bm.reserve(req.request_id, total):
            victim = max(self.running, key=_rank) if self.by_priority else self.running[-1]
            self._preempt(victim, out)
            if victim is req:
                return False
        return True

    @staticmethod
    def _unschedule(out: SchedulerOutput) -> int:
        """Drop the chunks of requests preempted after they were scheduled this step (the
        priority policy's victim may come before the request that needed room); the tokens
        they held go back to the step's budget."""
        gone = [c for c in out.chunks if c.request.status is not Status.RUNNING]
        if not gone:
            return 0
        out.chunks[:] = [c for c in out.chunks if c.request.status is Status.RUNNING]
        out.fills[:] = [c for c in out.fills if c.request.status is Status.RUNNING]
        out.num_draft -= sum(c.num_draft for c in gone)
        return sum(c.num_new for c in gone)

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        self._abandon_load(req)
        self.bm.free(req.request_id)
        self._release_lora(req)
        self.num_prompt_logprobs -= req.params.prompt_logprobs is not None
        req.status = Status.WAITING
        req.num_computed = 0
        req.metrics.num_preemptions += 1
        self.num_preemptions += 1
        if self.by_priority:
            self._queue(req)
        else:
            self.waiting.appendleft(req)
        out.preempted.append(req)

    def _release_lora(self, req: Request) -> None:
        if req.lora_slot is not None:
            self.lora.release(req.lora_slot)
            req.lora_slot = None

    # ------------------------------------------------------------------ after

    def commit(self, out: SchedulerOutput) -> None:
        """A step has run (its results are read back): the blocks it filled hold their KV,
        so they may serve other prompts. Chunks of requests finished or preempted since
        they were scheduled are skipped (their blocks are gone)."""
        for c in out.fills:             # the chunks that completed a block
            req = c.request
            end = c.start + c.num_new
            if req.status is Status.RUNNING and c.epoch == req.metrics.num_preemptions:
                self.bm.commit(req.request_id, end, req.all_token_ids)
