"""The continuous-batching scheduler (runtime/scheduler.py) against a fake model.

A hypothesis state machine makes random arrivals, prompt lengths, aborts, budgets
and KV sizes, steps the scheduler with a model that 'samples' a deterministic
token, and checks: no block leaks, no request lost or duplicated, the token
budget and the sequence limit never exceeded, every request's output equal to
what it would produce alone (preemption by recompute loses nothing).
"""

from __future__ import annotations

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from braze.runtime.block_manager import BlockManager
from braze.runtime.request import Request, Status
from braze.runtime.sampler import SamplingParams
from braze.runtime.scheduler import Scheduler

BS = 4


STOP = 0       # the fake model's end-of-sequence token


def fake_token(seq: list[int]) -> int:
    """The 'model': the next token depends on the whole sequence, like a real one."""
    return (sum(seq) * 31 + len(seq)) % 50


def alone(prompt: list[int], max_tokens: int, max_len: int) -> list[int]:
    seq, out = list(prompt), []
    while len(out) < max_tokens and len(seq) < max_len:
        t = fake_token(seq)
        out.append(t)
        seq.append(t)
        if t == STOP:
            break
    return out


class Driver:
    """What the engine does around the scheduler, minus the model. With `lag`, a step's
    tokens are read back only after the next step is scheduled (the engine's overlap of
    host scheduling with device execution)."""

    def __init__(self, num_blocks, max_num_seqs, max_num_tokens, lag=False):
        self.bm = BlockManager(num_blocks, BS)
        self.sched = Scheduler(self.bm, max_num_seqs, max_num_tokens)
        self.max_len = num_blocks * BS
        self.live: dict[str, Request] = {}
        self.done: dict[str, list[int]] = {}
        self.aborted: set[str] = set()
        self.lag = lag
        self.in_flight: list = []

    def add(self, rid, prompt, max_tokens):
        req = Request(rid, prompt, SamplingParams(max_tokens=max_tokens),
                      max_len=min(self.max_len, len(prompt) + max_tokens))
        self.live[rid] = req
        self.sched.add(req)

    def abort(self, rid):
        req = self.live.pop(rid)
        self.sched.remove(req)
        self.aborted.add(rid)

    def busy(self) -> bool:
        return self.sched.has_work() or bool(self.in_flight)

    def step(self):
        out = self.sched.schedule()
        assert out.num_tokens <= self.sched.max_num_tokens
        assert len(out.chunks) <= self.sched.max_num_seqs
        assert len(self.sched.running) <= self.sched.max_num_seqs
        ids = [c.request.request_id for c in out.chunks]
        assert len(ids) == len(set(ids)), "a request scheduled twice in one step"
        for c in out.chunks:
            req = c.request
            assert req.status is Status.RUNNING and c.num_new >= 1
            assert c.start + c.num_new == req.num_computed <= req.num_tokens
            assert len(self.bm.block_table(req.request_id)) * BS >= req.num_computed
            if c.samples:
                req.num_pending += 1
        if out.chunks:
            self.in_flight.append(out)
        if self.in_flight and (len(self.in_flight) > int(self.lag) or not out.chunks):
            self.resolve(self.in_flight.pop(0))
        return out

    def resolve(self, out):
        self.sched.commit(out)
        for c in out.chunks:
            req = c.request
            if not c.samples:
                continue
            req.num_pending -= 1
            if req.finished:
                continue                      # stopped meanwhile: the extra token is dropped
            assert len(req.all_token_ids) == c.start + c.num_new
            t = fake_token(req.all_token_ids)
            req.output_token_ids.append(t)
            req.all_token_ids.append(t)
            if (t == STOP or len(req.output_token_ids) >= req.params.max_tokens
                    or len(req.all_token_ids) >= req.max_len):
                self.sched.remove(req)
                self.done[req.request_id] = req.output_token_ids
                del self.live[req.request_id]


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(num_blocks=st.integers(3, 12), max_num_seqs=st.integers(1, 6),
                max_num_tokens=st.integers(1, 24), lag=st.booleans())
    def setup(self, num_blocks, max_num_seqs, max_num_tokens, lag):
        self.d = Driver(num_blocks, max_num_seqs, max_num_tokens, lag)
        self.n = 0
        self.prompts: dict[str, tuple[list[int], int]] = {}

    @rule(prefix=st.sampled_from([[], [7, 7, 7, 7], [7, 7, 7, 7, 8, 8, 8, 8]]),
          tail=st.lists(st.integers(0, 9), min_size=1, max_size=14),
          max_tokens=st.integers(1, 12))
    def arrive(self, prefix, tail, max_tokens):
        prompt = prefix + tail
        if len(prompt) >= self.d.max_len:
            return
        rid = f"r{self.n}"
        self.n += 1
        self.prompts[rid] = (prompt, max_tokens)
        self.d.add(rid, prompt, max_tokens)

    @precondition(lambda self: self.d.live)
    @rule(data=st.data())
    def abort(self, data):
        self.d.abort(data.draw(st.sampled_from(sorted(self.d.live))))

    @rule(steps=st.integers(1, 6))
    def step(self, steps):
        for _ in range(steps):
            if not self.d.busy():
                break
            self.d.step()

    @invariant()
    def nothing_lost_or_leaked(self):
        d = self.d
        if not hasattr(self, "d"):
            return
        queued = [r.request_id for r in d.sched.waiting] + [r.request_id for r in d.sched.running]
        assert len(queued) == len(set(queued)), "a request queued twice"
        assert set(queued) == set(d.live), "a live request is neither waiting nor running"
        assert not (set(d.done) & d.aborted)
        assert set(d.done) | d.aborted | set(d.live) == set(self.prompts)
        held = {r.request_id for r in d.sched.running}
        assert set(d.bm.seq_ids()) == held, "blocks held by a request that is not running"
        if not d.live:
            assert d.bm.num_free_blocks == d.bm.num_blocks

    def teardown(self):
        if not hasattr(self, "d"):
            return
        d = self.d
        for _ in range(2000):                 # bounded: every request finishes
            if not d.busy():
                break
            d.step()
        assert not d.live
        assert d.bm.num_free_blocks == d.bm.num_blocks
        for rid, out in d.done.items():
            prompt, max_tokens = self.prompts[rid]
            assert out == alone(prompt, max_tokens, min(d.max_len, len(prompt) + max_tokens)), rid


SchedulerMachine.TestCase.settings = settings(max_examples=120, stateful_step_count=30,
                                              deadline=None)
TestSchedulerMachine = SchedulerMachine.TestCase


def test_chunked_prefill_respects_the_budget():
    d = Driver(num_blocks=16, max_num_seqs=4, max_num_tokens=5)
    d.add("a", list(range(12)), 2)
    d.add("b", [1, 2, 3], 2)
    first = d.step()
    assert [(c.request.request_id, c.num_new) for c in first.chunks] == [("a", 5)]
    second = d.step()
    assert [(c.request.request_id, c.num_new) for c in second.chunks] == [("a", 5)]
    third = d.step()       # a's last 2 prompt tokens, then b's prompt in the same step
    assert [(c.request.request_id, c.num_new) for c in third.chunks] == [("a", 2), ("b", 3)]
    assert all(c.samples for c in third.chunks)


def test_preemption_recomputes_and_counts():
    d = Driver(num_blocks=4, max_num_seqs=4, max_num_tokens=64)
    d.add("a", list(range(1, 7)), 6)      # 6 + 6 tokens: 3 blocks at the end
    d.add("b", list(range(10, 16)), 6)
    for _ in range(200):
        if not d.busy():
            break
        d.step()
    assert d.sched.num_preemptions >= 1
    assert d.done["a"] == alone(list(range(1, 7)), 6, 16)
    assert d.done["b"] == alone(list(range(10, 16)), 6, 16)
    assert d.bm.num_free_blocks == 4
