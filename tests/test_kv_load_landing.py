"""Loads from the host KV tier that land late (runtime/kv_offload.py, runtime/scheduler.py).

On a GPU a load's copy runs on the offload's own stream while other requests' steps go on;
the request waits in the scheduler until it has landed. Here the copy is made to land only
after a number of engine steps (`_late_loads`), writing the blocks then, as a copy still in
flight would: a request scheduled early, another prompt hitting the blocks early, or blocks
reused before an abandoned copy has ended, all read or keep the wrong KV, and the outputs
differ from the reference engine's.
"""

from __future__ import annotations

import pytest
from braze.runtime.engine import Engine
from hypothesis import given, settings, strategies as st
from braze.runtime.scheduler import SchedulerOutput

from conftest import prompts_of, run_all
from test_kv_offload import DEVICE_BLOCKS, FILLERS, FIRST, GREEDY, SHARED, _host_gb

THIRD = SHARED + prompts_of([7], seed=8)[0]
SECOND = SHARED + prompts_of([9], seed=4)[0]
OTHER = prompts_of([20], seed=9)[0]
FRESH = prompts_of([60, 61], seed=11)       # no tier holds their blocks: they compute them
# prompts for the random traffic: four sharing SHARED's 4 loadable blocks, two fresh, one short
POOL = [SECOND, THIRD, SHARED + prompts_of([12], seed=12)[0], SHARED[:40] + [7, 7, 7]] \
    + FRESH + [OTHER]


class _LateCopy:
    """A host-to-device copy that lands `steps` engine steps after it was started (or when
    the compute stream is made to wait for it: `order`, `synchronize`)."""

    def __init__(self, work, steps):
        self.work, self.steps = work, steps

    def tick(self) -> None:
        self.steps -= 1
        if self.steps <= 0:
            self._land()

    def _land(self) -> None:
        work, self.work = self.work, None
        if work is not None:
            work()

    def query(self) -> bool:
        return self.work is None

    def synchronize(self) -> None:
        self._land()

    order = synchronize


def _late_loads(eng, steps) -> list:
    """Make `eng`'s loads land `steps` engine steps late (an int, or a function giving
    each copy's); the copies made."""
    off, copies = eng.offload, []
    copy_in, poll = off._copy_in, off.poll

    def late(blocks, ids):
        copies.append(_LateCopy(lambda: copy_in(blocks, ids),
                                steps() if callable(steps) else steps))
        return copies[-1]

    def ticking():      # the engine polls the offload once per step
        for c in copies:
            c.tick()
        poll()

    off._copy_in, off.poll = late, ticking
    return copies


@pytest.fixture(scope="module")
def art(store):
    return store.artifact("llama")


@pytest.fixture(scope="module")
def solo(art):
    """Each prompt's output alone, with everything on the device."""
    eng = Engine(art, backend="reference", num_kv_blocks=256)
    return {tuple(p): run_all(eng, [p], GREEDY)[0].token_ids
            for p in POOL}


def _warm(art, steps):
    """An engine whose device cache has lost SHARED's blocks and whose host tier holds
    them, with loads landing `steps` steps late."""
    eng = Engine(art, backend="reference", num_kv_blocks=DEVICE_BLOCKS,
                 kv_offload_cpu_gb=_host_gb(art, 64))
    run_all(eng, [FIRST] + FILLERS, GREEDY)
    eng.offload.drain()
    return eng, _late_loads(eng, steps)


def _loaded(eng) -> int:
    return eng.stats()["kv_offload_load_blocks_host"]


def test_a_request_waits_in_the_scheduler_while_its_load_lands(art, solo):
    eng, copies = _warm(art, steps=3)
    before = _loaded(eng)
    seen, schedule = [], eng.scheduler.schedule

    def watch():
        out = schedule()
        seen.append((out.loading, [c.request.request_id for c in out.chunks],
                     [c.query() for c in copies]))
        return out

    eng.scheduler.schedule = watch
    ids = ["second", "third", "other"]
    for rid, p in zip(ids, [SECOND, THIRD, OTHER]):
        eng.add_request(rid, p, GREEDY)
    got = eng.run_to_completion(ids)
    assert [got[r].token_ids for r in ids] == [solo[tuple(p)] for p in (SECOND, THIRD, OTHER)]
    assert len(copies) == 1 and _loaded(eng) - before == 4
    # THIRD waited for SECOND's blocks to land and hit them on the device: loaded once
    assert got["third"].metrics["num_cached_tokens"] == 4 * 16
    # OTHER ran while SECOND's copy was in flight; SECOND ran only once it had landed
    assert any(loading and "other" in run for loading, run, _ in seen)
    assert all(landed[0] for _, run, landed in seen if "second" in run)


def test_an_abandoned_load_ends_before_its_blocks_are_reused(art, solo):
    eng, copies = _warm(art, steps=3)
    eng.add_request("other", OTHER, GREEDY)     # (a step with nothing to run would wait
    eng.add_request("second", SECOND, GREEDY)   # for the copy)
    eng.step()                          # admitted: its blocks are being copied in
    assert eng.requests["second"].kv_loading and not copies[0].query()
    eng.abort_request("second")
    assert copies[0].query()            # the compute stream waits for it: nothing reuses
    fresh = run_all(eng, FRESH, GREEDY)     # its blocks before the copy has ended
    assert [o.token_ids for o in fresh] == [solo[tuple(p)] for p in FRESH]
    assert len(copies) == 1
    assert eng.block_manager.num_free_blocks == DEVICE_BLOCKS


def test_a_request_preempted_while_loading_is_loaded_again(art, solo):
    eng, copies = _warm(art, steps=4)
    eng.add_request("other", OTHER, GREEDY)
    eng.add_request("second", SECOND, GREEDY)
    eng.step()
    req = eng.requests["second"]
    assert req.kv_loading
    eng.scheduler._preempt(req, SchedulerOutput())
    assert copies[0].query() and not req.kv_loading
    got = eng.run_to_completion(["other", "second"])
    assert [got[r].token_ids for r in ("other", "second")] == [solo[tuple(OTHER)],
                                                               solo[tuple(SECOND)]]
    assert len(copies) == 2             # readmitted, it loaded its blocks once more


def test_other_ranks_order_their_next_step_after_their_own_copy(art):
    """At tensor parallelism each rank copies its slice on its own load stream; rank 0's
    `settle` makes a rank's compute stream wait for its copy before the next step."""
    eng, copies = _warm(art, steps=100)
    off = eng.offload
    keys = list(off.host._blocks)[:2]       # two blocks the host tier holds
    assert off.apply("hold", "r", keys) == 2.0
    off.apply("copy", "r", [0, 1])
    assert len(copies) == 1 and not copies[0].query()
    off.apply("settle", "r")
    assert copies[0].query()


def test_a_long_load_is_copied_a_few_chunks_at_a_time(art, solo, monkeypatch):
    """A load is queued in chunks, a bounded number at once (its pinned staging and device
    temporaries stay small whatever the prefix length); the request runs once every chunk
    has landed."""
    from braze.runtime import kv_offload
    eng, copies = _warm(art, steps=2)
    monkeypatch.setattr(kv_offload, "LOAD_CHUNK_BYTES", eng.offload.block_bytes)
    monkeypatch.setattr(kv_offload, "LOAD_INFLIGHT_CHUNKS", 2)
    most, schedule = [], eng.scheduler.schedule

    def watch():
        out = schedule()
        most.append(sum(not c.query() for c in copies))
        if any(c.request.request_id == "second" for c in out.chunks):
            assert len(copies) == 4 and all(c.query() for c in copies)
        return out

    eng.scheduler.schedule = watch
    eng.add_request("other", OTHER, GREEDY)
    eng.add_request("second", SECOND, GREEDY)
    got = eng.run_to_completion(["other", "second"])
    assert [got[r].token_ids for r in ("other", "second")] == [solo[tuple(OTHER)],
                                                               solo[tuple(SECOND)]]
    assert len(copies) == 4 and max(most) == 2      # one block each, two queued at a time


@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_random_traffic_with_late_loads_aborts_and_preemption(art, solo, data):
    """Requests from POOL arrive at random steps (several at once load SHARED's blocks,
    the tiny cache preempts), copies land 0-5 steps late, some requests are aborted at a
    random step: every finished output equals its prompt's alone, an aborted one is a
    prefix of it, and at the end no block, load or pinned copy is left."""
    eng, copies = _warm(art, steps=lambda: data.draw(st.integers(0, 5), label="late"))
    arrivals = data.draw(st.lists(st.tuples(st.integers(0, 6), st.sampled_from(range(len(POOL))),
                                            st.none() | st.integers(1, 8)),
                                  min_size=1, max_size=6), label="arrivals")
    pending = sorted((at, i, p, abort) for i, (at, p, abort) in enumerate(arrivals))
    final, aborts, step = {}, {}, 0
    while pending or eng.has_unfinished():
        while pending and pending[0][0] <= step:
            _, i, p, abort = pending.pop(0)
            eng.add_request(f"r{i}", POOL[p], GREEDY)
            if abort is not None:
                aborts[f"r{i}"] = step + abort
        for rid, at in aborts.items():
            if at == step:
                eng.abort_request(rid)
        for out in eng.step():
            if out.finished:
                final[out.request_id] = out
        step += 1
        assert step < 500, "the engine stopped making progress"
    for i, (_, p, _) in enumerate(arrivals):
        got, want = final[f"r{i}"], solo[tuple(POOL[p])]
        if got.finish_reason == "abort":
            assert got.token_ids == want[:len(got.token_ids)]
        else:
            assert got.token_ids == want
    eng.offload.drain()
    assert eng.block_manager.num_free_blocks == DEVICE_BLOCKS
    assert not eng.offload._loading and all(c.query() for c in copies)
