"""Beam search (runtime/beam_search.py, braze.LLM.beam_search): against transformers'
`generate(num_beams=...)` with the same random weights, and the search's own rules (EOS,
length penalty, ties) on made-up candidates."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from braze.ir.errors import BrazeError
from braze.runtime.beam_search import BeamSearch, BeamSearchParams, advance_all, step_prompts

from conftest import PROMPT


@pytest.fixture(scope="module")
def llm(store):
    import braze
    return braze.LLM(store.artifact("llama"), backend="reference", num_kv_blocks=128)


def _hf_beams(store, prompt, width, steps):
    from transformers import AutoModelForCausalLM
    with contextlib.redirect_stderr(io.StringIO()):
        m = AutoModelForCausalLM.from_pretrained(store.checkpoint("llama"),
                                                 dtype=torch.float32).eval()
    m.generation_config.eos_token_id = None      # no EOS: every beam runs `steps` tokens
    m.generation_config.pad_token_id = 0
    with torch.no_grad():
        g = m.generate(torch.tensor([prompt]), num_beams=width, num_return_sequences=width,
                       do_sample=False, max_new_tokens=steps, early_stopping=False,
                       output_scores=True, return_dict_in_generate=True)
    # transformers' score: the sum of logprobs over the generated length (length_penalty 1)
    return [(s[len(prompt):].tolist(), float(sc) * steps)
            for s, sc in zip(g.sequences, g.sequences_scores)]


@pytest.mark.parametrize("width", [2, 4])      # (1 is greedy: the test below)
def test_beams_equal_transformers_beam_search(llm, store, width):
    prompts = [PROMPT[:7], PROMPT[4:15]]
    steps = 5
    got = llm.beam_search(prompts, BeamSearchParams(beam_width=width, max_tokens=steps,
                                                    ignore_eos=True))
    for prompt, out in zip(prompts, got):
        want = _hf_beams(store, prompt, width, steps)
        assert [s.token_ids for s in out.sequences] == [w[0] for w in want]
        for s, (_, cum) in zip(out.sequences, want):
            assert s.cumulative_logprob == pytest.approx(cum, abs=1e-3)
            assert s.finish_reason == "length" and s.text is not None
        assert out.prompt_token_ids == prompt


def test_width_one_is_greedy_decoding(llm):
    from braze.runtime import SamplingParams
    greedy = llm.generate([PROMPT[:9]], SamplingParams(max_tokens=6, ignore_eos=True))[0]
    (out,) = llm.beam_search(PROMPT[:9], BeamSearchParams(beam_width=1, max_tokens=6,
                                                          ignore_eos=True))
    assert out.sequences[0].token_ids == list(greedy.token_ids)
    # vLLM's LLM.beam_search takes use_tqdm= (a progress bar braze does not draw)
    (quiet,) = llm.beam_search(PROMPT[:9], BeamSearchParams(beam_width=1, max_tokens=6,
                                                            ignore_eos=True), use_tqdm=False)
    assert quiet.sequences[0].token_ids == out.sequences[0].token_ids


def _step(search: BeamSearch, tops):
    advance_all([search], [tops[tuple(p)] for p in step_prompts([search])])


def test_an_eos_finishes_a_beam_and_the_length_penalty_ranks_the_results():
    """Made-up candidates: EOS (9) ends a beam (not in its tokens); the live beams are the
    best non-EOS extensions; results rank finished and live beams by cum / L ** penalty."""
    p = BeamSearchParams(beam_width=2, max_tokens=2, length_penalty=1.0)
    s = BeamSearch([1, 2], p, eos_ids=[9])
    _step(s, {(1, 2): [(9, -0.1), (5, -0.5), (6, -0.7), (7, -0.9)]})
    assert s.beams == [([5], -0.5), ([6], -0.7)] and s.finished == [([], -0.1)]
    _step(s, {(1, 2, 5): [(3, -1.0), (9, -2.0)], (1, 2, 6): [(4, -0.2), (3, -3.0)]})
    assert s.done and [b[0] for b in s.beams] == [[6, 4], [5, 3]]
    assert [b[1] for b in s.beams] == pytest.approx([-0.9, -1.5])
    out = s.result()
    # scores: [] -0.1 / 2 = -0.05; [6, 4] -0.9 / 4; [5, 3] -1.5 / 4; [5] (EOS) -2.5 / 3
    assert [(q.token_ids, q.finish_reason) for q in out.sequences] == [([], "stop"),
                                                                      ([6, 4], "length")]
    # a strong length penalty favours the longer beams
    s = BeamSearch([1, 2], BeamSearchParams(beam_width=2, max_tokens=2, length_penalty=4.0),
                   eos_ids=[9])
    _step(s, {(1, 2): [(9, -0.1), (5, -0.5), (6, -0.7)]})
    _step(s, {(1, 2, 5): [(3, -1.0)], (1, 2, 6): [(4, -0.2)]})
    assert [q.token_ids for q in s.result().sequences] == [[6, 4], [5, 3]]


def test_ties_keep_beam_order_and_ignore_eos_keeps_eos_tokens():
    s = BeamSearch([1], BeamSearchParams(beam_width=2, max_tokens=1, ignore_eos=True),
                   eos_ids=[9])
    _step(s, {(1,): [(9, -1.0), (4, -1.0), (5, -1.0)]})
    assert [b[0] for b in s.beams] == [[9], [4]]


def test_bad_params_name_the_field(llm):
    for kw, field in [(dict(beam_width=0, max_tokens=4), "beam_width"),
                      (dict(beam_width=11, max_tokens=4), "beam_width"),
                      (dict(beam_width=2, max_tokens=0), "max_tokens"),
                      (dict(beam_width=2, max_tokens=2, length_penalty=float("inf")),
                       "length_penalty")]:
        with pytest.raises(BrazeError, match=field):
            llm.beam_search(PROMPT[:5], BeamSearchParams(**kw))


def test_a_search_stops_at_the_context_length(llm):
    """max_tokens past the context: the beams grow until prompt + beam fills max_model_len
    and end there ("length"), as generate's samples do, rather than a late error about a
    prompt too long (each step's prompt is the prompt and the beam)."""
    room = 3
    prompt = (PROMPT * 20)[:llm.engine.max_model_len - room]
    (capped,) = llm.beam_search([prompt], BeamSearchParams(beam_width=2, max_tokens=room + 40,
                                                           ignore_eos=True))
    (exact,) = llm.beam_search([prompt], BeamSearchParams(beam_width=2, max_tokens=room,
                                                          ignore_eos=True))
    assert [s.token_ids for s in capped.sequences] == [s.token_ids for s in exact.sequences]
    assert {len(s.token_ids) for s in capped.sequences} == {room}
    assert {s.finish_reason for s in capped.sequences} == {"length"}
    # a prompt that fills the context is still refused, naming the limit
    with pytest.raises(BrazeError, match="max_model_len"):
        llm.beam_search([(PROMPT * 20)[:llm.engine.max_model_len]],
                        BeamSearchParams(beam_width=2, max_tokens=2))


def test_vllms_temperature_and_include_stop_str_in_output_fields(llm):
    """vLLM's BeamSearchParams has temperature and include_stop_str_in_output: code written
    for it runs (it was a TypeError). The search ranks raw logprobs, so temperature leaves
    the beams as they are; include_stop_str_in_output keeps the EOS that ended a beam in
    its token ids (vLLM's rule), scored as without it."""
    kw = dict(beam_width=2, max_tokens=4, ignore_eos=True)
    (plain,) = llm.beam_search(PROMPT[:6], BeamSearchParams(**kw))
    (vllm_style,) = llm.beam_search(PROMPT[:6], BeamSearchParams(
        **kw, temperature=0.7, include_stop_str_in_output=False))
    assert [s.token_ids for s in vllm_style.sequences] == [s.token_ids for s in plain.sequences]
    # and vLLM's name for a sequence's cumulative logprob reads the same value
    assert [s.cum_logprob for s in plain.sequences] == \
        [s.cumulative_logprob for s in plain.sequences]
    with pytest.raises(BrazeError, match="temperature"):
        llm.beam_search(PROMPT[:6], BeamSearchParams(**kw, temperature=-1.0))
    tops = {(1, 2): [(9, -0.1), (5, -0.5), (6, -0.7)],
            (1, 2, 5): [(3, -1.0)], (1, 2, 6): [(4, -0.2)]}
    results = []
    for keep in (False, True):
        s = BeamSearch([1, 2], BeamSearchParams(beam_width=2, max_tokens=2,
                                                include_stop_str_in_output=keep), eos_ids=[9])
        _step(s, tops)
        _step(s, tops)
        results.append(s.result().sequences)
    without, kept = results
    assert [q.token_ids for q in without] == [[], [6, 4]]
    assert [q.token_ids for q in kept] == [[9], [6, 4]]
    assert [q.score for q in kept] == [q.score for q in without]


def test_concurrency_limit_is_vllms_and_changes_no_result(llm):
    """vLLM's LLM.beam_search(prompts, params, lora_request, use_tqdm, concurrency_limit):
    code passing concurrency_limit ran into a TypeError. It bounds how many prompts are
    searched at once (vLLM's batches of prompts); the results are those of one batch."""
    prompts = [PROMPT[:5], PROMPT[3:9], PROMPT[7:10]]
    params = BeamSearchParams(beam_width=2, max_tokens=3, ignore_eos=True)
    whole = llm.beam_search(prompts, params)
    for limit in (1, 2, None):
        got = llm.beam_search(prompts, params, None, False, concurrency_limit=limit)
        assert [[s.token_ids for s in o.sequences] for o in got] == \
            [[s.token_ids for s in o.sequences] for o in whole]
        assert [o.prompt_token_ids for o in got] == prompts
    for bad in (0, -1, 1.5, True):
        with pytest.raises(BrazeError, match="concurrency_limit"):
            llm.beam_search(prompts, params, concurrency_limit=bad)


def test_params_of_another_type_are_named_not_an_attribute_error(llm):
    """A vLLM script of before BeamSearchParams passes SamplingParams (use_beam_search was
    one of its fields), or a dict: that was an AttributeError from inside the search."""
    from braze import SamplingParams
    for params in (SamplingParams(max_tokens=3), {"beam_width": 2, "max_tokens": 3}, None):
        with pytest.raises(BrazeError, match=r"BeamSearchParams\(beam_width=.*max_tokens="):
            llm.beam_search(PROMPT[:5], params)
    assert not llm.engine.has_unfinished()


def test_sequences_read_as_vllms_beam_search_sequence(llm):
    """vLLM's BeamSearchSequence.tokens is the prompt and the beam's tokens (its main
    field, read by vLLM beam-search scripts); braze's had only token_ids (the beam's)."""
    prompt = PROMPT[:5]
    out = llm.beam_search([prompt], BeamSearchParams(beam_width=2, max_tokens=3,
                                                     ignore_eos=True))[0]
    for s in out.sequences:
        assert s.tokens == prompt + s.token_ids and len(s.token_ids) == 3
        assert s.cum_logprob == s.cumulative_logprob
