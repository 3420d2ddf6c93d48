"""Tensor parallelism when rank 0 needs more than one logits row per sequence: the
verification steps of speculative decoding (k + 1 rows per sequence) and prompt logprobs
on a pruned (-O2) LM head (a row per prompt position, in the wide bucket variants). The
other ranks must gather the same rows as rank 0, or the LM head's all_gather meets tensors
of another shape. Checked on CPUs (gloo, two ranks) against one rank and transformers.
"""

from __future__ import annotations

import pytest
import torch

from braze.runtime import LLM, SamplingParams

from conftest import hf_model, prompts_of
from test_prompt_logprobs_pruned import same_outputs
from test_speculative import NGRAM, mixed_prompts

# 4 sequences, 16 logits rows: k + 1 = 4 rows per sequence when speculating, and wide
# variants of 16 rows for prompt logprobs (4 rows a plain step)
LIMITS = dict(opt_level=2, max_num_seqs=4, max_num_tokens=64, max_logits_rows=16)
OPTS = dict(backend="reference", num_kv_blocks=64, max_num_tokens=16, buckets=[4, 8, 16])


def _recording(llm) -> list[torch.Tensor]:
    """Every step's logits rows, as the model runner reads them (copies)."""
    seen, graphs = [], llm.engine.runner.graphs
    inner = graphs.run

    def run(*args, **kw):
        out = inner(*args, **kw)
        seen.append(out.clone())
        return out
    graphs.run = run
    return seen


def test_ngram_speculation_at_two_ranks(store):
    """Greedy tokens of ngram speculation (k=3) at two ranks equal plain decoding at one;
    each verification step's logits rows equal one speculating rank's (1e-4)."""
    prompts = mixed_prompts()[:3]
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    one = store.artifact("llama", **LIMITS)
    plain = LLM(one, **OPTS).generate(prompts, params)
    spec_one = LLM(one, speculative=NGRAM, **OPTS)
    want_rows = _recording(spec_one)
    spec_one.generate(prompts, params)
    with LLM(store.artifact("llama", tensor_parallel_size=2, **LIMITS), speculative=NGRAM,
             **OPTS) as llm:
        rows = _recording(llm)
        got = llm.generate(prompts, params)
        s = llm.stats()
    assert [o.token_ids for o in got] == [o.token_ids for o in plain]
    assert s["spec_decode_num_draft_tokens"] > 0
    assert len(rows) == len(want_rows)
    assert any(r.shape[0] > 4 for r in rows)            # more rows than sequences did run
    for g, w in zip(rows, want_rows):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


# the interpret backend replays the bound launch plans (the wide variants' too), where the
# all_gather's shapes are frozen per bucket
@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_prompt_logprobs_at_two_ranks(store, backend):
    """Prompt logprobs at two ranks (-O2, wide steps) equal one -O1 rank's and transformers'
    log-softmax of the same random-weight model."""
    prompts = prompts_of([23, 5, 11], seed=7)
    params = [SamplingParams(max_tokens=3, ignore_eos=True, prompt_logprobs=2),
              SamplingParams(max_tokens=3, ignore_eos=True),
              SamplingParams(max_tokens=2, ignore_eos=True, prompt_logprobs=0)]
    o1 = dict(LIMITS, opt_level=1)
    o1.pop("max_logits_rows")          # -O1 has a logits row at every token: nothing to size
    want = LLM(store.artifact("llama", **o1), **OPTS).generate(prompts, params)
    with LLM(store.artifact("llama", tensor_parallel_size=2, **LIMITS),
             **dict(OPTS, backend=backend)) as llm:
        got = llm.generate(prompts, params)
        wide = llm.engine.runner.graphs.stats.get("wide_steps", 0)
    assert wide > 0                     # steps with more rows than sequences did run
    same_outputs(got, want)
    model = hf_model(store.checkpoint("llama"))
    for g, sp, p in zip(got, params, prompts):
        if sp.prompt_logprobs is None:
            continue
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([p])).logits[0].double(), dim=-1)
        assert len(g.prompt_logprobs) == len(p) and g.prompt_logprobs[0] is None
        for pos in range(1, len(p)):
            e = g.prompt_logprobs[pos]
            assert e.token_id == p[pos]
            assert abs(e.logprob - ref[pos - 1, p[pos]].item()) < 1e-4


def test_draft_speculation_at_two_ranks(store):
    """A one-rank draft artifact proposes on rank 0 for a two-rank target: the plain
    tokens. A tensor-parallel draft is refused, naming it, and the ranks the refused
    engine had started are stopped."""
    import multiprocessing
    from braze.ir.errors import BrazeError
    from braze.runtime import parallel
    prompts = mixed_prompts()[:2]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    target = store.artifact("llama", tensor_parallel_size=2, **LIMITS)
    plain = LLM(store.artifact("llama", **LIMITS), **OPTS).generate(prompts, params)
    spec = {"method": "draft", "model": str(store.artifact("llama", max_num_tokens=16)),
            "num_speculative_tokens": 3}
    with LLM(target, speculative=spec, **OPTS) as llm:
        got = llm.generate(prompts, params)
        s = llm.stats()
    assert [o.token_ids for o in got] == [o.token_ids for o in plain]
    assert s["spec_decode_num_accepted_tokens"] == s["spec_decode_num_draft_tokens"] > 0
    spec["model"] = str(target)
    with pytest.raises(BrazeError, match="draft model .* tensor-parallel") as e:
        LLM(target, speculative=spec, **OPTS)
    assert e.value.param == "speculative"
    # the target's ranks, started before the draft was read, are stopped with the refusal
    assert parallel.current_group() is None
    assert not [p for p in multiprocessing.active_children() if p.is_alive()]
