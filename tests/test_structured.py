"""Structured output: the packed bitmask against a torch reference, the grammar cache, and
the engine generating under grammars with a tiny random-weight model (the output must
parse and validate however random the model is)."""

from __future__ import annotations

import json
import time
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch

from braze.ir.errors import BrazeError
from braze.runtime.sampler import SamplingParams, apply_token_bitmask
from braze.runtime.structured import GrammarCache, StructuredOutputsParams, pack_bits

xgr = pytest.importorskip("xgrammar")


# ---- the bitmask --------------------------------------------------------------------------

def reference_mask(logits, allowed):
    """Entry by entry: -inf where not allowed."""
    out = logits.clone()
    for s in range(logits.shape[0]):
        for v in range(logits.shape[1]):
            if not allowed[s][v]:
                out[s, v] = float("-inf")
    return out


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 100, 257])
def test_apply_token_bitmask_matches_reference(vocab):
    g = torch.Generator().manual_seed(vocab)
    rows = 5
    allowed = torch.rand(rows, vocab, generator=g) < 0.3
    allowed[1] = True                                   # a row without a grammar: all ones
    width = -(-vocab // 32)
    padded = torch.zeros(rows, width * 32, dtype=torch.bool)
    padded[:, :vocab] = allowed
    padded[:, vocab:] = True                            # bits past the vocab are ignored
    mask = pack_bits(padded.view(rows, width, 32))
    logits = torch.randn(rows, vocab, generator=g)
    want = reference_mask(logits, allowed.tolist())
    got = apply_token_bitmask(logits.clone(), mask)
    assert torch.equal(got, want)
    # xgrammar's own CPU kernel, which the runtime uses for float32 logits
    fast = logits.clone()
    xgr.apply_token_bitmask_inplace(fast, mask, vocab_size=vocab, backend="cpu")
    assert torch.equal(fast, want)
    from braze.runtime.structured import apply_bitmask_fast
    fast = logits.clone()
    apply_bitmask_fast(fast, mask)
    assert torch.equal(fast, want)
    # and in half precision (the plain torch path)
    assert torch.equal(apply_token_bitmask(logits.half(), mask), want.half())


def test_pack_bits_matches_xgrammar_layout():
    """pack_bits writes the layout xgrammar fills: bit v % 32 of word v // 32."""
    allowed = torch.zeros(64, dtype=torch.bool)
    allowed[[0, 5, 31, 32, 63]] = True
    words = pack_bits(allowed.view(2, 32))
    assert words.dtype == torch.int32
    assert words.tolist() == [1 | 1 << 5 | -(1 << 31), 1 | -(1 << 31)]


# ---- the cache ----------------------------------------------------------------------------

def test_grammar_cache_lru_shares_and_forgets_failures():
    calls = []
    gate = threading.Event()

    def compile_fn(kind, text):
        calls.append((kind, text))
        gate.wait(10)
        if text == "bad":
            raise BrazeError("bad grammar")
        return f"compiled {kind}:{text}"

    cache = GrammarCache(max_size=2, compile_fn=compile_fn)
    try:
        a1 = cache.compile_async(StructuredOutputsParams(regex="a+"))
        a2 = cache.compile_async(StructuredOutputsParams(regex="a+"))
        assert a1 is a2 and not a1.done()            # one compilation, shared while running
        gate.set()
        assert cache.compile(StructuredOutputsParams(regex="a+")) == "compiled regex:a+"
        # the schema's canonical form is the key: text and dict forms are one entry
        cache.compile(StructuredOutputsParams(json={"type": "object"}))
        cache.compile(StructuredOutputsParams(json='{"type":  "object"}'))
        assert cache.hits == 3 and cache.misses == 2 and len(cache) == 2
        cache.compile(StructuredOutputsParams(choice=["x", "y"]))      # evicts the regex
        assert len(cache) == 2
        cache.compile(StructuredOutputsParams(regex="a+"))
        assert calls.count(("regex", "a+")) == 2
        with pytest.raises(BrazeError, match="bad grammar"):
            cache.compile(StructuredOutputsParams(grammar="bad"))
        with pytest.raises(BrazeError, match="bad grammar"):
            cache.compile(StructuredOutputsParams(grammar="bad"))
        assert calls.count(("grammar", "bad")) == 2             # failures are not cached
    finally:
        gate.set()
        cache.close()


def test_params_validation():
    for bad in ({}, {"json": 1, "regex": "a"}, {"choice": []}, {"choice": [""]},
                {"regex": ""}, {"json": "{not json"}, {"nope": 1}):
        with pytest.raises(BrazeError):
            SamplingParams(structured_outputs=bad).validate()
    SamplingParams(structured_outputs={"choice": ["a"]}).validate()
    with pytest.raises(BrazeError):
        SamplingParams(skip_special_tokens="no").validate()


@pytest.mark.parametrize("field, value, says", [
    ("json", False, "schema false allows no value"), ("json", 0, "got int"),
    ("regex", False, "regex must be a non-empty string"),
    ("choice", 0, "choice must be a non-empty list")])
def test_a_falsy_constraint_is_named_not_missing(field, value, says):
    """A constraint set to false or 0 is the caller's mistake in that field: the error says
    what is wrong with it (it said "takes exactly one of ...; got none", as if it were
    absent, because 0 == False)."""
    with pytest.raises(BrazeError, match=says):
        SamplingParams(structured_outputs={field: value}).validate()


TAG_SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                    "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
LEGACY_TAG = {"structures": [{"begin": "<f=a>", "schema": TAG_SCHEMA, "end": "</f>"},
                             {"begin": "<f=b>", "end": "</f>"}],
              "triggers": ["<f="]}


def test_structural_tag_shapes():
    """vLLM's first shape (structures + triggers) becomes xgrammar's triggered tags, as an
    object or as JSON text alike; its format shape passes on; bad shapes name the field."""
    from braze.runtime.structured import structural_tag_format
    want = {"type": "structural_tag", "format": {
        "type": "triggered_tags", "triggers": ["<f="], "tags": [
            {"type": "tag", "begin": "<f=a>", "end": "</f>",
             "content": {"type": "json_schema", "json_schema": TAG_SCHEMA}},
            {"type": "tag", "begin": "<f=b>", "end": "</f>",
             "content": {"type": "json_schema", "json_schema": True}}]}}
    assert structural_tag_format(LEGACY_TAG) == want
    assert structural_tag_format(json.dumps({"type": "structural_tag", **LEGACY_TAG})) == want
    fmt = {"type": "const_string", "value": "ok"}
    assert structural_tag_format({"format": fmt}) == {"type": "structural_tag", "format": fmt}
    a = StructuredOutputsParams(structural_tag=LEGACY_TAG)
    assert a.key() == StructuredOutputsParams(structural_tag=json.dumps(LEGACY_TAG)).key()
    for bad, fragment in [("{oops", "not valid JSON"), (3, "must be an object"),
                          ({"structures": []}, "non-empty list"),
                          ({"structures": LEGACY_TAG["structures"]}, "triggers"),
                          ({**LEGACY_TAG, "triggers": ["<g"]}, "starts with none"),
                          ({"structures": [{"begin": "<f=a>"}], "triggers": ["<f"]},
                           r"structures\[0\]"),
                          ({**LEGACY_TAG, "extra": 1}, "unknown field"),
                          ({"format": "text"}, "format must be an object")]:
        with pytest.raises(BrazeError, match=fragment):
            SamplingParams(structured_outputs={"structural_tag": bad}).validate()


def test_a_legacy_structural_tag_accepts_what_xgrammars_legacy_api_accepts(llm):
    """The same text against our translation and against xgrammar's own (deprecated)
    tags-and-triggers compile of the same structures."""
    import warnings
    compiler = llm.engine.structured.cache.compiler
    ours = llm.engine.structured.cache.compile(StructuredOutputsParams(structural_tag=LEGACY_TAG))
    items = [xgr.StructuralTagItem(begin=st["begin"], end=st["end"],
                                   schema=json.dumps(st.get("schema", {})))
             for st in LEGACY_TAG["structures"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = compiler.compile_structural_tag(items, LEGACY_TAG["triggers"])
    texts = ["free text", 'a <f=a>{"n": 3}</f> b', '<f=a>{"n": 12}</f>', '<f=a>{"n": "x"}',
             '<f=b>[1, "two"]</f><f=a>{"n":0}</f>', '<f=c>', "x <f=b>{}</f", '<f=a>{"m": 1}']
    for text in texts:
        got = [xgr.GrammarMatcher(g).accept_string(text) for g in (ours, theirs)]
        assert got[0] == got[1], (text, got)
    assert xgr.GrammarMatcher(ours).accept_string('a <f=a>{"n": 3}</f> b')
    assert not xgr.GrammarMatcher(ours).accept_string('<f=a>{"n": "x"}')


def test_missing_xgrammar_is_named(monkeypatch):
    import builtins
    real = builtins.__import__

    def no_xgrammar(name, *a, **k):
        if name == "xgrammar":
            raise ImportError("no module named xgrammar")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_xgrammar)
    from braze.runtime.structured import xgrammar
    with pytest.raises(BrazeError, match="'xgrammar' package"):
        xgrammar()


# ---- the engine -----------------------------------------------------------------------------

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "kind": {"enum": ["cat", "dog", "fox"]},
                         "age": {"type": "integer", "minimum": 0, "maximum": 99},
                         "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}},
          "required": ["name", "kind", "age", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def llm(store):
    import braze
    return braze.LLM(store.artifact("llama"), backend="reference", num_kv_blocks=64)


def check_schema(text, schema=SCHEMA):
    value = json.loads(text)              # strict: no raw control characters in strings
    try:
        import jsonschema
    except ImportError:
        assert set(value) == set(schema["required"])
        return value
    jsonschema.validate(value, schema)
    return value


def test_json_schema_choice_regex_grammar(llm):
    params = [SamplingParams(max_tokens=120, temperature=t, seed=s,
                             structured_outputs={"json": SCHEMA})
              for t, s in [(0, None), (1.0, 1), (1.0, 2), (0.8, 3)]]
    outs = llm.generate(["Hello", "The quick brown fox", "Once", "A"], params)
    for o in outs:
        assert o.finish_reason == "stop", o.text
        check_schema(o.text)
    outs = llm.generate(["Pick:"] * 4, [SamplingParams(
        max_tokens=20, temperature=1.0, seed=i,
        structured_outputs={"choice": ["red", "green", "blue"]}) for i in range(4)])
    assert all(o.text in ("red", "green", "blue") and o.finish_reason == "stop" for o in outs)
    import re
    outs = llm.generate(["Code:"] * 3, SamplingParams(
        max_tokens=20, temperature=1.0, structured_outputs={"regex": r"[A-Z]{2}-[0-9]{3}"}))
    assert all(re.fullmatch(r"[A-Z]{2}-[0-9]{3}", o.text) for o in outs), [o.text for o in outs]
    (o,) = llm.generate(["Say:"], SamplingParams(
        max_tokens=20, temperature=1.0, seed=5,
        structured_outputs={"grammar": 'root ::= ("yes" | "no") " " [0-9]'}))
    assert re.fullmatch(r"(yes|no) [0-9]", o.text)


def test_a_structural_tag_holds_the_tagged_part_to_its_schema(llm):
    """xgrammar's format shape with at_least_one and stop_after_first: every finished
    output is the tag with a JSON object of the schema inside; a legacy shape runs too."""
    import re
    fmt = {"format": {"type": "triggered_tags", "triggers": ["<f"], "at_least_one": True,
                      "stop_after_first": True,
                      "tags": [{"type": "tag", "begin": "<f>", "end": "</f>",
                                "content": {"type": "json_schema", "json_schema": TAG_SCHEMA,
                                            "max_whitespace_cnt": 1}}]}}
    outs = llm.generate(["Hello", "Go", "A"], [SamplingParams(
        max_tokens=40, temperature=1.0, seed=s, structured_outputs={"structural_tag": fmt})
        for s in (1, 2, 3)])
    assert any(o.finish_reason == "stop" for o in outs)
    for o in outs:
        if o.finish_reason == "stop":
            m = re.fullmatch(r"<f>(.*)</f>", o.text, re.S)
            assert m, o.text
            check_schema(m.group(1), TAG_SCHEMA)    # (no strings here to hold control chars)
    (o,) = llm.generate(["Hello"], SamplingParams(
        max_tokens=12, temperature=1.0, seed=3, structured_outputs={"structural_tag": LEGACY_TAG}))
    assert o.finish_reason in ("stop", "length")


def test_json_object_is_an_object_or_a_valid_prefix(llm):
    outs = llm.generate(["{", "Data:"], SamplingParams(
        max_tokens=40, temperature=0.7, seed=3, structured_outputs={"json_object": True}))
    for o in outs:
        assert o.text.startswith("{")
        if o.finish_reason == "stop":
            assert isinstance(json.loads(o.text), dict)
        else:                            # cut by max_tokens: still a prefix xgrammar accepts
            m = xgr.GrammarMatcher(llm.engine.structured.cache.compile(
                StructuredOutputsParams(json_object=True)))
            assert m.accept_string(o.text)


def test_unconstrained_rows_in_the_same_batch_are_unchanged(llm):
    plain = SamplingParams(max_tokens=12, ignore_eos=True)
    alone = llm.generate(["The quick brown fox"], plain)[0].token_ids
    mixed = llm.generate(["Hello", "The quick brown fox"],
                         [SamplingParams(max_tokens=120, structured_outputs={"json": SCHEMA}),
                          plain])
    assert list(mixed[1].token_ids) == list(alone)
    check_schema(mixed[0].text)


def test_engine_keeps_running_while_a_grammar_compiles(store):
    """A request waits (outside the scheduler) until its grammar compiled; the others run."""
    from braze.runtime.engine import Engine
    eng = Engine(store.artifact("llama"), backend="reference", num_kv_blocks=64)
    gate = threading.Event()
    cache = eng.structured.cache
    real = cache._compile_fn

    def slow(kind, text):
        gate.wait(30)
        return real(kind, text)
    cache._compile_fn = slow
    eng.add_request("g", "Hi", SamplingParams(max_tokens=10, structured_outputs={
        "choice": ["alpha", "beta"]}))
    eng.add_request("p", "Hi", SamplingParams(max_tokens=5, ignore_eos=True))
    done = {}
    for _ in range(50):
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
        if "p" in done:
            break
    assert "p" in done and "g" not in done and eng.num_waiting() == 0
    gate.set()
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    assert done["g"].text in ("alpha", "beta") and done["g"].finish_reason == "stop"
    # a grammar that does not compile aborts its request with the reason
    eng.add_request("bad", "Hi", SamplingParams(structured_outputs={"regex": "(("}))
    outs = eng.run_to_completion(["bad"])
    assert outs["bad"].finish_reason == "abort" and "regex" in str(outs["bad"].stop_reason)
    eng.add_request("gone", "Hi", SamplingParams(structured_outputs={"regex": "[a-z]+x"}))
    eng.abort_request("gone")
    assert eng.run_to_completion(["gone"])["gone"].finish_reason == "abort"


def _mixed_requests(n_grammar: int, n_plain: int, max_tokens: list[int]):
    """Prompts and params: grammar requests (a JSON schema, and a short regex that ends
    its request early) and plain sampled ones reporting logprobs, in one batch."""
    prompts = ["Hello", "Fox", "Once upon a time", "A compiler", "Large language", "Hi"]
    grammars = [{"json": SCHEMA}, {"regex": r"(alpha|beta) [a-z]{1,3}\."}]
    params = []
    for i in range(n_grammar + n_plain):
        so = grammars[i % 2] if i < n_grammar else None
        params.append(SamplingParams(max_tokens=max_tokens[i % len(max_tokens)],
                                     temperature=1.0, seed=7 + i, ignore_eos=so is None,
                                     structured_outputs=so,
                                     # sampler options read each row's settings by its row
                                     logprobs=2 if so is None else None,
                                     repetition_penalty=1.2 if i == 1 else 1.0))
    return [prompts[i % len(prompts)] for i in range(len(params))], params


def test_async_scheduling_overlaps_grammar_steps_with_the_same_outputs(store):
    """With overlap on, grammar requests running beside plain ones still get every step
    launched before the tokens of the step before are read (the grammar's mask waits
    only for the sampling), and the outputs equal the synchronous engine's."""
    from braze.runtime.engine import Engine

    from conftest import run_all
    prompts, params = _mixed_requests(3, 2, [80, 9, 5])
    got, stats = [], []
    for overlap in (False, True):
        eng = Engine(store.artifact("llama"), backend="reference", num_kv_blocks=64,
                     async_scheduling=overlap)
        outs = run_all(eng, prompts, params)
        got.append([list(o.token_ids) for o in outs])
        stats.append(eng.stats())
        check_schema(outs[0].text)
        assert eng.runner.batch.num_free_rows == eng.runner.max_num_seqs
    assert got[0] == got[1]
    assert stats[0]["overlapped_steps"] == 0
    # every step but the first of each run of work overlaps its predecessor
    assert stats[1]["overlapped_steps"] >= stats[1]["steps"] - 2


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n_grammar=st.integers(1, 3), n_plain=st.integers(0, 2),
       max_tokens=st.lists(st.integers(1, 24), min_size=1, max_size=3),
       aborts=st.dictionaries(st.integers(0, 4), st.integers(1, 12), max_size=2))
def test_overlapped_grammar_steps_with_aborts_and_early_ends(store, n_grammar, n_plain,
                                                             max_tokens, aborts):
    """Grammar and plain requests, some ending by length, by their grammar or by abort
    while a later step is already launched: with overlap every output equals (or, when
    aborted, is a prefix of) the synchronous run, and no row or block is left behind."""
    from braze.runtime.engine import Engine

    from conftest import run_all, run_with_aborts
    art = store.artifact("llama")
    prompts, params = _mixed_requests(n_grammar, n_plain, max_tokens)
    plain = run_all(Engine(art, backend="reference", num_kv_blocks=64), prompts, params)
    eng = Engine(art, backend="reference", num_kv_blocks=64, async_scheduling=True)
    aborts = {i: a for i, a in aborts.items() if i < len(prompts)}
    run_with_aborts(eng, prompts, params, aborts, plain)
    assert eng.runner.batch.num_free_rows == eng.runner.max_num_seqs
    s = eng.stats()
    assert s["kv_blocks_free"] == s["kv_blocks_total"] and s["num_running"] == 0


def test_padded_vocab_masks_ids_past_the_tokenizer(store):
    """A logits row wider than the tokenizer (a padded LM head): ids the tokenizer does not
    have are never allowed."""
    from braze.runtime.structured import tokenizer_info
    art = store.artifact("llama")
    n_tok = json.loads((art / "tokenizer" / "tokenizer.json").read_text())
    n_tok = len(n_tok["model"]["vocab"])
    info = tokenizer_info(art / "tokenizer", n_tok + 40, [2])
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA))
    m = xgr.GrammarMatcher(compiled)
    mask = xgr.allocate_token_bitmask(1, n_tok + 40)
    m.fill_next_token_bitmask(mask)
    logits = torch.zeros(1, n_tok + 40)
    apply_token_bitmask(logits, mask)
    assert torch.isinf(logits[0, n_tok:]).all() and not torch.isinf(logits[0]).all()


def test_llm_raises_for_a_grammar_that_does_not_compile(llm):
    with pytest.raises(BrazeError, match="regex could not be compiled"):
        llm.generate(["Hi"], SamplingParams(structured_outputs={"regex": "(("}))
    # a Lark grammar (vLLM converts them): the error says what braze takes instead (it
    # said only "EBNF lexer error ... Unexpected character: ':'")
    with pytest.raises(BrazeError, match=r"Lark.*root ::="):
        llm.generate(["Hi"], SamplingParams(structured_outputs={
            "grammar": '?start: answer\nanswer: "yes" | "no"\n'}))
    out = llm.generate(["Hi"], SamplingParams(max_tokens=5, structured_outputs={
        "grammar": 'root ::= answer\nanswer ::= "yes" | "no"'}))[0].outputs[0]
    assert out.text in ("yes", "no")
    # choices with quotes and backslashes are matched literally
    choices = ['say "hi"', "back\\slash", "tab\there"]
    outs = llm.generate(["Pick:"] * 3, [SamplingParams(
        max_tokens=20, temperature=1.0, seed=i, structured_outputs={"choice": choices})
        for i in range(3)])
    assert all(o.text in choices for o in outs), [o.text for o in outs]


def test_runs_without_xgrammar_until_a_grammar_is_asked_for(store):
    """No xgrammar installed: generation without a grammar works, the server's modules
    import, and a grammar request gets an error naming the package."""
    import subprocess
    import sys
    code = f"""
import sys
sys.modules["xgrammar"] = None          # import xgrammar -> ImportError
import braze, braze.serving.app
from braze.ir.errors import BrazeError
from braze.runtime.sampler import SamplingParams
llm = braze.LLM({str(store.artifact("llama"))!r}, backend="reference", num_kv_blocks=16)
print(len(llm.generate(["Hi"], SamplingParams(max_tokens=3, ignore_eos=True))[0].token_ids))
try:
    llm.generate(["Hi"], SamplingParams(structured_outputs={{"regex": "a+"}}))
except BrazeError as e:
    print(e)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    assert lines[0] == "3" and "pip install xgrammar" in lines[1]


@pytest.mark.parametrize("lag", [False, True])
def test_preemption_keeps_grammar_outputs_unchanged(store, lag):
    """Preempted and recomputed, a request's matcher state is kept: the same tokens as
    with room to spare, and still valid."""
    from braze.runtime.engine import Engine

    from conftest import run_all
    art = store.artifact("llama")
    prompts = ["The quick brown fox jumps over", "Once upon a time there was",
               "Large language models predict", "A compiler turns a program", "Hello"]
    params = [SamplingParams(max_tokens=40, temperature=1.0, seed=i, ignore_eos=True,
                             structured_outputs={"regex": r"[a-z]+( [a-z]+)*\."}
                             if i % 2 else {"json": SCHEMA})
              for i in range(len(prompts))]
    roomy = [run_all(Engine(art, backend="reference", num_kv_blocks=64), [p], sp)[0]
             for p, sp in zip(prompts, params)]
    tight = Engine(art, backend="reference", num_kv_blocks=6, async_scheduling=lag)
    for i, (p, sp) in enumerate(zip(prompts, params)):
        tight.add_request(f"r{i}", p, sp)
    got = tight.run_to_completion()
    assert tight.stats()["preemptions"] > 0
    assert [list(got[f"r{i}"].token_ids) for i in range(len(prompts))] \
        == [list(o.token_ids) for o in roomy]


def test_a_step_interrupted_while_it_samples_leaks_no_batch_row(store):
    """With overlap on, a grammar step holds the rows of requests finishing meanwhile
    until its sampling is done. A step interrupted there (Ctrl-C in a notebook, an
    error) left the engine holding every later finished request's row for good, so
    after an interrupted LLM.generate the batch filled up. Now the rows are given back
    however the step ends: after the interruption and aborting what ran, every row is
    free and the engine gives a fresh engine's outputs."""
    from braze.runtime.engine import Engine

    from conftest import run_all
    # the plain request long enough to outlast the grammars' compiles on a loaded machine
    # (with 5 tokens it could finish first, and the wait below never ended)
    prompts, params = _mixed_requests(2, 1, [30, 9, 60])
    eng = Engine(store.artifact("llama"), backend="reference", num_kv_blocks=64,
                 async_scheduling=True)
    for i, (p, sp) in enumerate(zip(prompts, params)):
        eng.add_request(f"r{i}", p, sp)
    # every grammar compiled and every request running, a step in flight: the next step
    # samples after applying that one (runner.sample)
    while eng._grammar_wait or len(eng.scheduler.running) < len(prompts) or not eng._in_flight:
        assert len(eng.requests) == len(prompts), "one finished before all three ran together"
        if not eng.scheduler.running or eng._grammar_wait:
            time.sleep(0.001)           # the grammars compile on their thread
        eng.step()
    real = eng.runner.sample

    def interrupted(*a, **kw):
        raise KeyboardInterrupt
    eng.runner.sample = interrupted
    with pytest.raises(KeyboardInterrupt):
        eng.step()
    eng.runner.sample = real
    eng.abort_request([f"r{i}" for i in range(len(prompts))])
    while eng.has_unfinished():
        eng.step()
    assert eng.runner.batch.num_free_rows == eng.runner.max_num_seqs
    fresh = Engine(store.artifact("llama"), backend="reference", num_kv_blocks=64,
                   async_scheduling=True)
    want = [list(o.token_ids) for o in run_all(fresh, prompts, params)]
    assert [list(o.token_ids) for o in run_all(eng, prompts, params)] == want
    assert eng.runner.batch.num_free_rows == eng.runner.max_num_seqs


def test_close_stops_the_grammar_thread(store):
    """LLM.close() (and so `with braze.LLM(...)`) stops the worker thread that compiles
    grammars, as it stops the engine's other work: it outlived the LLM, one per LLM made."""
    import braze
    with braze.LLM(store.artifact("llama"), backend="reference", num_kv_blocks=16) as llm:
        out = llm.generate(["Hi"], SamplingParams(max_tokens=4, structured_outputs={
            "regex": "[a-z]{2}"}), use_tqdm=False)[0].outputs[0]
        assert len(out.text) == 2 and out.text.isalpha()
        threads = list(llm.engine.structured.cache._pool._threads)
        assert threads and all(t.is_alive() for t in threads)
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)


def test_vllms_whitespace_pattern_is_refused_not_dropped(llm):
    """vLLM's structured_outputs {"json": ..., "whitespace_pattern": ...} was taken and the
    pattern silently dropped; braze's JSON grammars allow no free whitespace, so the field
    is refused naming it. The switches that match what braze does are still taken."""
    with pytest.raises(BrazeError, match="whitespace_pattern.*leave it out"):
        SamplingParams(structured_outputs={"json": SCHEMA, "whitespace_pattern": r"[ ]?"})
    kept = SamplingParams(max_tokens=60, structured_outputs={
        "json": SCHEMA, "whitespace_pattern": None, "disable_any_whitespace": True,
        "disable_fallback": True})
    plain = SamplingParams(max_tokens=60, structured_outputs={"json": SCHEMA})
    a, b = llm.generate(["Hello", "Hello"], [kept, plain])
    assert a.token_ids == b.token_ids       # (plain's output is held to SCHEMA above)
