"""vLLM's scheduling_policy "priority": waiting requests are admitted by (priority, arrival),
lower first, and a preemption takes the running request last in that order. The outputs
never change: the reference is each prompt run alone (the engine's greedy tokens there are
transformers', tests/test_engine.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from braze.ir.errors import BrazeError
from braze.runtime.engine import Engine
from braze.runtime.sampler import SamplingParams

from conftest import prompts_of

GREEDY = SamplingParams(max_tokens=3, ignore_eos=True)
PROMPTS = prompts_of([9, 12, 7, 10, 8], seed=11)


@pytest.fixture(scope="module")
def art(store):
    return store.artifact("llama")


def _each_alone(art, prompts, params) -> list:
    """The reference: each prompt's tokens run alone on a roomy engine."""
    out = []
    for i, p in enumerate(prompts):
        eng = Engine(art, backend="reference", num_kv_blocks=64)
        eng.add_request(f"a{i}", p, params)
        out.append(eng.run_to_completion([f"a{i}"])[f"a{i}"].token_ids)
    return out


@pytest.fixture(scope="module")
def alone(art):
    return _each_alone(art, PROMPTS, GREEDY)


def _start_order(eng, priorities) -> tuple[list[int], list]:
    """Queue every prompt at once with `priorities`; (the order they were first scheduled
    in, their token ids). One sequence at a time, so the order is the admission order."""
    for i, (p, pr) in enumerate(zip(PROMPTS, priorities)):
        eng.add_request(f"r{i}", p, GREEDY, priority=pr)
    final = eng.run_to_completion([f"r{i}" for i in range(len(PROMPTS))])
    outs = [final[f"r{i}"] for i in range(len(PROMPTS))]
    started = [o.metrics["arrival_time"] + o.metrics["queue_time"] for o in outs]
    order = sorted(range(len(outs)), key=started.__getitem__)
    return order, [o.token_ids for o in outs]


@settings(max_examples=8, deadline=None)
@given(priorities=st.lists(st.integers(-2, 2), min_size=len(PROMPTS), max_size=len(PROMPTS)))
def test_waiting_requests_start_by_priority_then_arrival(art, alone, priorities):
    eng = Engine(art, backend="reference", num_kv_blocks=64, max_num_seqs=1,
                 scheduling_policy="priority")
    order, outs = _start_order(eng, priorities)
    assert order == sorted(range(len(PROMPTS)), key=lambda i: (priorities[i], i))
    assert outs == alone


def test_fcfs_takes_zeros_only_and_keeps_arrival_order(art, alone):
    eng = Engine(art, backend="reference", num_kv_blocks=64, max_num_seqs=1)
    order, outs = _start_order(eng, [0] * len(PROMPTS))
    assert order == list(range(len(PROMPTS))) and outs == alone
    with pytest.raises(BrazeError, match="--scheduling-policy priority"):
        eng.add_request("x", PROMPTS[0], GREEDY, priority=1)
    with pytest.raises(BrazeError, match="priority must be an integer"):
        Engine(art, backend="reference", num_kv_blocks=16,
               scheduling_policy="priority").add_request("x", PROMPTS[0], GREEDY, priority=0.5)


def test_preemption_takes_the_lowest_priority_request(art):
    """Two requests that outgrow a small cache: FCFS preempts the one admitted last; the
    priority policy the one of lower priority, even though it was admitted first."""
    long = SamplingParams(max_tokens=40, ignore_eos=True)
    prompts = prompts_of([14, 14], seed=12)
    want = _each_alone(art, prompts, long)
    for policy, priorities, victim in (("fcfs", (0, 0), "hi"), ("priority", (5, 0), "lo")):
        eng = Engine(art, backend="reference", num_kv_blocks=6, scheduling_policy=policy)
        eng.add_request("lo", prompts[0], long, priority=priorities[0])
        eng.step()                     # "lo" is admitted first
        eng.add_request("hi", prompts[1], long, priority=priorities[1])
        final = eng.run_to_completion(["lo", "hi"])
        pre = {r: final[r].metrics["num_preemptions"] for r in ("lo", "hi")}
        assert pre[victim] > 0 and pre["lo" if victim == "hi" else "hi"] == 0, (policy, pre)
        assert [final["lo"].token_ids, final["hi"].token_ids] == want


def test_llm_and_the_server_take_priorities(art, alone, tmp_path):
    from braze import LLM
    with LLM(art, backend="reference", num_kv_blocks=64, max_num_seqs=1,
             scheduling_policy="priority") as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY,
                            priority=[3, 0, 2, -1, 1])
    assert [o.outputs[0].token_ids for o in outs] == alone
    from serve_helpers import MODEL, Server
    for policy, status in (("priority", 200), ("fcfs", 400)):
        (tmp_path / policy).mkdir()
        s = Server(art, tmp_path / policy, "--scheduling-policy", policy)
        try:
            r = s.http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPTS[0],
                                                     "max_tokens": 3, "priority": -3,
                                                     "ignore_eos": True, "temperature": 0})
            assert r.status_code == status, r.text
            if status == 400:
                assert r.json()["error"]["param"] == "priority"
            else:
                assert r.json()["choices"][0]["text"] is not None
        finally:
            s.stop()



def test_a_victim_scheduled_earlier_in_the_step_gives_its_chunk_back(art):
    """The priority policy's victim may come before the request that needs room in the
    running list, its chunk already scheduled this step: the chunk goes with it. (The step
    ran the freed request: 'unknown sequence'.) "hi", admitted after "lo", crosses a block
    boundary first with no block free; outputs equal each prompt run alone."""
    short = SamplingParams(max_tokens=20, ignore_eos=True)
    prompts = prompts_of([20, 14], seed=13)
    want = _each_alone(art, prompts, short)
    eng = Engine(art, backend="reference", num_kv_blocks=3, scheduling_policy="priority")
    eng.add_request("lo", prompts[0], short, priority=5)
    eng.step()                          # "lo" runs first: two blocks of the three
    eng.add_request("hi", prompts[1], short, priority=0)
    final = eng.run_to_completion(["lo", "hi"])
    assert final["lo"].metrics["num_preemptions"] > 0
    assert final["hi"].metrics["num_preemptions"] == 0
    assert [final["lo"].token_ids, final["hi"].token_ids] == want
