"""vLLM's cache_salt: requests share prefix-cache blocks only with requests of the same
salt, on the device and in the lower KV tiers, so one tenant cannot tell from cache hits
(time to first token) what another sent. The outputs never change: the reference is the
same engine with no prefix cache at all."""

from __future__ import annotations

import pytest

from braze.ir.errors import BrazeError
from braze.runtime.engine import Engine
from braze.runtime.sampler import SamplingParams

from conftest import prompts_of

GREEDY = SamplingParams(max_tokens=4, ignore_eos=True)
SHARED = prompts_of([70], seed=3)[0]                 # 4 full blocks of 16
FIRST, SECOND = (SHARED + t for t in prompts_of([5, 9], seed=4))
BLOCK = 16


def _run(eng, rid, prompt, salt=None):
    eng.add_request(rid, prompt, GREEDY, cache_salt=salt)
    return eng.run_to_completion([rid])[rid]


@pytest.fixture(scope="module")
def art(store):
    return store.artifact("llama")


@pytest.fixture(scope="module")
def want(art):
    eng = Engine(art, backend="reference", num_kv_blocks=64, enable_prefix_caching=False)
    return _run(eng, "w", SECOND).token_ids


def test_prefix_hits_stay_within_a_salt(art, want):
    eng = Engine(art, backend="reference", num_kv_blocks=64)
    _run(eng, "a1", FIRST, "tenant-a")
    hits = {}
    for rid, salt in (("b", "tenant-b"), ("none", None), ("a2", "tenant-a")):
        out = _run(eng, rid, SECOND, salt)
        assert out.token_ids == want
        hits[rid] = out.metrics["num_cached_tokens"]
    # tenant b and the unsalted request computed the shared prefix (the unsalted one
    # after b had cached it under its own salt: still no hit); tenant a hit all 4 blocks
    assert hits == {"b": 0, "none": 0, "a2": len(SHARED) // BLOCK * BLOCK}


def test_the_disk_tier_keys_blocks_by_salt(art, want, tmp_path):
    kv = str(tmp_path / "kv")
    first = Engine(art, backend="reference", num_kv_blocks=16, kv_offload_dir=kv)
    _run(first, "a1", FIRST, "tenant-a")
    first.offload.drain()
    for salt, loaded in (("tenant-b", 0), (None, 0), ("tenant-a", 4)):
        fresh = Engine(art, backend="reference", num_kv_blocks=16, kv_offload_dir=kv)
        assert _run(fresh, "s", SECOND, salt).token_ids == want
        assert fresh.stats()["kv_offload_load_blocks_lower"] == loaded, salt


@pytest.mark.parametrize("salt", ["", 7])
def test_a_bad_salt_is_refused_by_name(art, salt):
    eng = Engine(art, backend="reference", num_kv_blocks=16)
    with pytest.raises(BrazeError, match="cache_salt must be a non-empty string"):
        eng.add_request("x", FIRST, GREEDY, cache_salt=salt)


def test_llm_takes_vllms_prompt_key(art, want):
    from braze import LLM
    with LLM(art, backend="reference", num_kv_blocks=64) as llm:
        llm.generate({"prompt_token_ids": FIRST, "cache_salt": "t"}, GREEDY)
        other = llm.generate({"prompt_token_ids": SECOND, "cache_salt": "u"}, GREEDY)[0]
        same = llm.generate({"prompt_token_ids": SECOND, "cache_salt": "t"}, GREEDY)[0]
    assert other.outputs[0].token_ids == same.outputs[0].token_ids == want
    assert (other.num_cached_tokens, same.num_cached_tokens) == (0, len(SHARED) // BLOCK * BLOCK)


def test_llm_beam_search_keeps_its_prompts_salt(art):
    """LLM.beam_search takes generate's prompt forms, "cache_salt" included: its steps
    cache the prompt under that salt (it was dropped: another tenant's unsalted request
    hit the blocks the salted search computed). The beams are those of an unsalted search."""
    from braze import LLM
    from braze.runtime.beam_search import BeamSearchParams
    bp = BeamSearchParams(beam_width=2, max_tokens=3, ignore_eos=True)
    with LLM(art, backend="reference", num_kv_blocks=64) as llm:
        want = [s.token_ids for s in llm.beam_search([SECOND], bp)[0].sequences]
    full = len(SHARED) // BLOCK * BLOCK
    with LLM(art, backend="reference", num_kv_blocks=64) as llm:
        got = llm.beam_search([{"prompt_token_ids": SECOND, "cache_salt": "t"}], bp)[0]
        assert [s.token_ids for s in got.sequences] == want
        other = llm.generate({"prompt_token_ids": SECOND}, GREEDY)[0]
        same = llm.generate({"prompt_token_ids": SECOND, "cache_salt": "t"}, GREEDY)[0]
    assert (other.num_cached_tokens, same.num_cached_tokens) == (0, full)
