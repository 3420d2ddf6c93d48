"""Sampling options through `braze serve` with the real `openai` client: logprobs (chat
and completions, streamed too), n and best_of, several prompts and token-id prompts,
echo, return_token_ids, penalties, logit_bias, min_tokens, bad_words, min_p, beam search,
and the 400s of
what braze cannot do (prompt_logprobs). Results are checked against the engine run
in-process one request at a time."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")

from serve_helpers import MODEL, Server  # noqa: E402  (after the importorskip)


@pytest.fixture(scope="module")
def artifact(store):
    return store.artifact("llama")


@pytest.fixture(scope="module")
def server(artifact, tmp_path_factory):
    s = Server(artifact, tmp_path_factory.mktemp("serve-sampling"))
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def run(artifact):
    """One prompt on the engine in-process (the server must give the same)."""
    from braze.runtime.engine import Engine
    from braze.runtime.sampler import SamplingParams

    from conftest import run_all
    eng = Engine(artifact, backend="reference", num_kv_blocks=64)

    def go(prompt, **kw):
        kw.setdefault("ignore_eos", True)
        (out,) = run_all(eng, [prompt], SamplingParams(**kw))
        return out
    go.engine = eng
    return go


IDS = [1, 40, 41, 42, 43, 44]


def _tok(run, tid):
    return run.engine.tokenizer.decode([tid], skip_special_tokens=False)


def test_completion_logprobs_plain_and_streamed(server, run):
    want = run(IDS, max_tokens=6, logprobs=3)
    kw = dict(model=MODEL, prompt=IDS, max_tokens=6, temperature=0, logprobs=3,
              extra_body={"ignore_eos": True})
    r = server.client.completions.create(**kw)
    lp = r.choices[0].logprobs
    assert lp.tokens == [_tok(run, t) for t in want.token_ids]
    assert all(abs(a - b.logprob) < 1e-5 for a, b in zip(lp.token_logprobs, want.logprobs))
    for top, e in zip(lp.top_logprobs, want.logprobs):
        assert len(top) == 3                     # the sampled token is the top one here
        assert {_tok(run, i): v for i, v in e.top}.keys() == top.keys()
    assert lp.text_offset[0] == 0
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    chunks = list(server.client.completions.create(**kw, stream=True))
    streamed = [x for c in chunks if c.choices and c.choices[0].logprobs
                for x in c.choices[0].logprobs.token_logprobs]
    assert len(streamed) == 6
    assert all(abs(a - b) < 1e-5 for a, b in zip(streamed, lp.token_logprobs))
    offsets = [x for c in chunks if c.choices and c.choices[0].logprobs
               for x in c.choices[0].logprobs.text_offset]
    assert offsets == lp.text_offset
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text == want.text


def test_chat_logprobs_plain_and_streamed(server):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Hi there"}], max_tokens=5,
              temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    r = server.client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for item in content:
        assert item.bytes == list(item.token.encode()) and len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert abs(item.top_logprobs[0].logprob - item.logprob) < 1e-6   # greedy
    chunks = list(server.client.chat.completions.create(**kw, stream=True))
    streamed = [x for c in chunks if c.choices and c.choices[0].logprobs
                for x in c.choices[0].logprobs.content]
    # (equal up to float noise: the second run reads the prompt from the prefix cache)
    assert [x.token for x in streamed] == [x.token for x in content]
    assert all(abs(a.logprob - b.logprob) < 1e-5 for a, b in zip(streamed, content))
    # no logprobs asked: none sent
    r = server.client.chat.completions.create(**{**kw, "logprobs": False, "top_logprobs": None})
    assert r.choices[0].logprobs is None


def test_n_and_several_prompts(server, run):
    prompts = [IDS, [1, 50, 60, 70]]
    r = server.client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, n=2,
                                         temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c in r.choices:
        want = run(prompts[c.index // 2], max_tokens=5, temperature=1.0, seed=7 + c.index % 2)
        assert c.text == want.text
    assert r.usage.prompt_tokens == 10 and r.usage.completion_tokens == 20
    # streamed: every choice's chunks carry its index and together give the same texts
    chunks = list(server.client.completions.create(
        model=MODEL, prompt=prompts, max_tokens=5, n=2, temperature=1.0, seed=7, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    texts = {}
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {c.index: c.text for c in r.choices}
    assert chunks[-1].usage.completion_tokens == 20
    # chat with n
    r = server.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, n=3,
        temperature=1.0, seed=1, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1


def test_best_of_picks_the_highest_cumulative_logprob(server, run):
    r = server.client.completions.create(model=MODEL, prompt=IDS, max_tokens=5, n=1, best_of=4,
                                         temperature=1.0, seed=3, extra_body={"ignore_eos": True})
    samples = [run(IDS, max_tokens=5, temperature=1.0, seed=3 + i, logprobs=0) for i in range(4)]
    best = max(samples, key=lambda o: o.cumulative_logprob)
    assert r.choices[0].text == best.text and r.choices[0].logprobs is None
    assert r.usage.completion_tokens == 20           # every sample was generated
    with pytest.raises(openai.BadRequestError, match="best_of"):
        server.client.completions.create(model=MODEL, prompt=IDS, best_of=3, stream=True)


def test_token_prompts_echo_and_return_token_ids(server, run):
    want = run(IDS, max_tokens=4)
    r = server.client.completions.create(model=MODEL, prompt=[IDS, IDS[:3]], max_tokens=4,
                                         temperature=0, echo=True,
                                         extra_body={"ignore_eos": True, "return_token_ids": True})
    c = r.model_dump()["choices"][0]
    # token ids echo as vLLM echoes them: decoded as transformers' decode(ids) does, the
    # special tokens kept (so the logprobs' text_offset index the echoed text)
    from transformers import AutoTokenizer
    prompt_text = AutoTokenizer.from_pretrained(run.engine.artifact.tokenizer_dir).decode(IDS)
    assert prompt_text.startswith("<s>")
    assert c["text"] == prompt_text + want.text
    assert c["prompt_token_ids"] == IDS and c["token_ids"] == want.token_ids
    assert r.model_dump()["choices"][1]["prompt_token_ids"] == IDS[:3]
    # text prompt echoed as sent; streamed: the prompt comes first
    chunks = list(server.client.completions.create(model=MODEL, prompt="Once upon", max_tokens=3,
                                                   temperature=0, echo=True, stream=True,
                                                   extra_body={"return_token_ids": True}))
    assert chunks[0].choices[0].text == "Once upon"
    ids = [t for ch in chunks for t in (ch.model_dump()["choices"][0].get("token_ids") or [])]
    assert len(ids) == 3
    # chat: the prompt ids on the response, the output ids on the choice
    r = server.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0,
        extra_body={"return_token_ids": True, "ignore_eos": True}).model_dump()
    assert len(r["choices"][0]["token_ids"]) == 3 and r["prompt_token_ids"][0] == 1


def test_penalties_bias_min_tokens_and_bad_words(server, run):
    opts = dict(presence_penalty=1.0, frequency_penalty=0.5)
    extra = dict(repetition_penalty=1.3, min_tokens=2)
    want = run(IDS, max_tokens=8, temperature=0, logit_bias={7: 2.0}, **opts, **extra)
    r = server.client.completions.create(model=MODEL, prompt=IDS, max_tokens=8, temperature=0,
                                         logit_bias={"7": 2.0}, **opts,
                                         extra_body={"ignore_eos": True, **extra})
    assert r.choices[0].text == want.text
    r = server.client.completions.create(model=MODEL, prompt=IDS, max_tokens=3, temperature=0,
                                         logit_bias={"42": 100}, extra_body={"ignore_eos": True,
                                                                              "return_token_ids": True})
    assert r.model_dump()["choices"][0]["token_ids"] == [42, 42, 42]
    # bad words: the greedy text's first word never appears
    plain = run(IDS, max_tokens=8)
    word = plain.text.split()[0] if plain.text.split() else None
    if word:
        r = server.client.completions.create(model=MODEL, prompt=IDS, max_tokens=8, temperature=0,
                                             extra_body={"ignore_eos": True, "bad_words": [word],
                                                         "return_token_ids": True})
        want = run(IDS, max_tokens=8, bad_words=[word])
        assert r.choices[0].text == want.text != plain.text


def test_allowed_token_ids(server, run):
    """vLLM's allowed_token_ids: the same tokens as the engine, all from the set, in
    completions and chat; an id outside the vocabulary is a 400 naming the field."""
    allowed = [7, 30, 31, 99, 150]
    want = run(IDS, max_tokens=6, allowed_token_ids=allowed)
    r = server.client.completions.create(
        model=MODEL, prompt=IDS, max_tokens=6, temperature=0,
        extra_body={"ignore_eos": True, "allowed_token_ids": allowed, "return_token_ids": True})
    assert r.model_dump()["choices"][0]["token_ids"] == want.token_ids
    assert set(want.token_ids) <= set(allowed)
    r = server.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=1,
        extra_body={"allowed_token_ids": allowed, "return_token_ids": True, "ignore_eos": True})
    assert set(r.model_dump()["choices"][0]["token_ids"]) <= set(allowed)
    with pytest.raises(openai.BadRequestError) as e:
        server.client.completions.create(model=MODEL, prompt=IDS, max_tokens=2,
                                         extra_body={"allowed_token_ids": [5, 10 ** 6]})
    assert e.value.body["param"] == "allowed_token_ids"


def test_min_p(server, run):
    """min_p through the server equals the engine's draw; min_p = 1 keeps only the likeliest
    token, so a hot temperature still decodes greedily."""
    r = server.client.completions.create(model=MODEL, prompt=IDS, max_tokens=8, temperature=1.5,
                                         seed=3, extra_body={"ignore_eos": True, "min_p": 0.2})
    assert r.choices[0].text == run(IDS, max_tokens=8, temperature=1.5, seed=3, min_p=0.2).text
    r = server.client.completions.create(model=MODEL, prompt=IDS, max_tokens=8, temperature=1.5,
                                         seed=3, extra_body={"ignore_eos": True, "min_p": 1.0})
    assert r.choices[0].text == run(IDS, max_tokens=8).text
    bad = server.http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi",
                                                    "max_tokens": 2, "min_p": 1.5})
    assert bad.status_code == 400


def test_stop_string_kept_special_tokens_and_token_id_names(server, run):
    """include_stop_str_in_output keeps the stop string; skip_special_tokens false keeps
    special tokens in the text; return_tokens_as_token_ids names logprob tokens by id."""
    plain = run(IDS, max_tokens=8).text
    stop = plain[2:4] if len(plain) >= 4 else None
    if stop and stop.strip():
        kw = dict(model=MODEL, prompt=IDS, max_tokens=8, temperature=0, stop=[stop])
        cut = server.client.completions.create(**kw, extra_body={"ignore_eos": True})
        kept = server.client.completions.create(**kw, extra_body={
            "ignore_eos": True, "include_stop_str_in_output": True})
        assert kept.choices[0].text == cut.choices[0].text + stop
        assert kept.choices[0].text == run(IDS, max_tokens=8, stop=[stop],
                                           include_stop_str_in_output=True).text
    bos = dict(model=MODEL, prompt=IDS, max_tokens=2, temperature=0, logit_bias={"1": 100})
    r = server.client.completions.create(**bos, extra_body={"ignore_eos": True})
    assert r.choices[0].text == ""                              # <s> skipped, by default
    r = server.client.completions.create(**bos, extra_body={"ignore_eos": True,
                                                            "skip_special_tokens": False})
    assert r.choices[0].text == run.engine.tokenizer.decode([1, 1], skip_special_tokens=False)
    r = server.client.completions.create(model=MODEL, prompt=IDS, max_tokens=2, temperature=0,
                                         logprobs=2, extra_body={
                                             "ignore_eos": True,
                                             "return_tokens_as_token_ids": True})
    want = run(IDS, max_tokens=2, logprobs=2)
    assert r.choices[0].logprobs.tokens == [f"token_id:{t}" for t in want.token_ids]


def test_add_special_tokens(server, run):
    """vLLM's add_special_tokens: a completion's text prompt without the tokenizer's BOS, a
    chat's rendered prompt with it on top of the template's; prompt_tokens counts what the
    model got, as /tokenize counts it."""
    def count(**kw):
        return server.http.post("/tokenize", json={"model": MODEL, **kw}).json()["count"]
    for flag in (True, False):
        r = server.client.completions.create(model=MODEL, prompt="Hello there", max_tokens=1,
                                             extra_body={"add_special_tokens": flag})
        assert r.usage.prompt_tokens == count(prompt="Hello there", add_special_tokens=flag)
    assert count(prompt="Hello there", add_special_tokens=True) == \
        count(prompt="Hello there", add_special_tokens=False) + 1
    msgs = [{"role": "user", "content": "Hi"}]
    plain = server.client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=1)
    both = server.client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=1,
                                                 extra_body={"add_special_tokens": True})
    assert plain.usage.prompt_tokens == count(messages=msgs)
    assert both.usage.prompt_tokens == count(messages=msgs, add_special_tokens=True)


def test_beam_search(server, run, store):
    """use_beam_search (vLLM's): n beams, best first, the same as transformers' beam search;
    chat too; streaming, logprobs and more than 10 beams are 400s naming the field."""
    from test_beam_search import _hf_beams
    r = server.client.completions.create(model=MODEL, prompt=IDS, max_tokens=4, n=3,
                                         extra_body={"use_beam_search": True,
                                                     "ignore_eos": True})
    want = _hf_beams(store, IDS, 3, 4)
    tok = run.engine.tokenizer
    assert [c.text for c in r.choices] == [tok.decode(w[0]) for w in want]
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert {c.finish_reason for c in r.choices} == {"length"}
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(IDS), 12)
    r = server.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, n=2,
        extra_body={"use_beam_search": True, "ignore_eos": True, "length_penalty": 0.5})
    assert len(r.choices) == 2 and all(c.message.content is not None for c in r.choices)
    for extra, field in [({"stream": True}, "stream"), ({"logprobs": 2}, "logprobs"),
                         ({"logprobs": 0}, "logprobs"), ({"n": 11}, "n"),
                         ({"stop": ["x"]}, "stop")]:
        bad = server.http.post("/v1/completions", json={
            "model": MODEL, "prompt": "Hi", "max_tokens": 2, "use_beam_search": True, **extra})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == field, bad.text


def test_prompt_logprobs_and_echo_with_logprobs(server, run):
    """The test artifact is -O0 (logits at every position), so the prompt's logprobs exist."""
    want = run(IDS, max_tokens=3, logprobs=2, prompt_logprobs=2)
    r = server.client.completions.create(model=MODEL, prompt=IDS, max_tokens=3, temperature=0,
                                         logprobs=2, echo=True,
                                         extra_body={"ignore_eos": True, "prompt_logprobs": 1})
    c = r.model_dump()["choices"][0]
    lp = c["logprobs"]
    assert lp["tokens"] == [_tok(run, t) for t in IDS + want.token_ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for pos in range(1, len(IDS)):
        assert abs(lp["token_logprobs"][pos] - want.prompt_logprobs[pos].logprob) < 1e-4
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    assert all(c["text"][o:o + len(t)] == t for o, t in zip(lp["text_offset"], lp["tokens"]))
    plp = c["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(IDS)
    for pos in range(1, len(IDS)):
        e = want.prompt_logprobs[pos]
        assert abs(plp[pos][str(IDS[pos])]["logprob"] - e.logprob) < 1e-4
        assert plp[pos][str(IDS[pos])]["rank"] == e.rank
    # streamed: the echo chunk carries the prompt's logprobs, then the output's follow
    chunks = list(server.client.completions.create(
        model=MODEL, prompt=IDS, max_tokens=3, temperature=0, logprobs=2, echo=True,
        stream=True, extra_body={"ignore_eos": True}))
    streamed = [x for ch in chunks if ch.choices and ch.choices[0].logprobs
                for x in ch.choices[0].logprobs.token_logprobs]
    assert len(streamed) == len(IDS) + 3 and streamed[0] is None
    assert all(abs(a - b) < 1e-4 for a, b in zip(streamed[1:], lp["token_logprobs"][1:]))
    # chat: on the response
    r = server.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
        extra_body={"prompt_logprobs": 0}).model_dump()
    assert r["prompt_logprobs"][0] is None and len(r["prompt_logprobs"]) > 3
    chunks = list(server.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, stream=True,
        extra_body={"prompt_logprobs": 0}))
    with_plp = [c.model_dump().get("prompt_logprobs") for c in chunks]
    with_plp = [x for x in with_plp if x is not None]
    assert len(with_plp) == 1                       # once, with the first tokens
    assert [d and sorted(d) for d in with_plp[0]] == [d and sorted(d) for d in r["prompt_logprobs"]]


def test_echo_with_max_tokens_0_scores_the_prompt(server, run):
    """vLLM's prompt scoring: echo with max_tokens 0 returns the prompt's text and its
    logprobs and generates nothing (plain and streamed); max_tokens 0 without echo is a
    400 naming max_tokens."""
    want = run(IDS, max_tokens=1, prompt_logprobs=2)
    text = run.engine.tokenizer.decode(IDS, skip_special_tokens=False)   # echo keeps them
    r = server.client.completions.create(model=MODEL, prompt=IDS, max_tokens=0, echo=True,
                                         logprobs=1)
    c = r.choices[0]
    assert c.text == text and c.finish_reason == "length"
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(IDS)
    lp = c.logprobs
    assert len(lp.tokens) == len(IDS) and lp.token_logprobs[0] is None
    for pos in range(1, len(IDS)):
        assert abs(lp.token_logprobs[pos] - want.prompt_logprobs[pos].logprob) < 1e-4
    chunks = list(server.client.completions.create(
        model=MODEL, prompt=IDS, max_tokens=0, echo=True, stream=True,
        stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 0
    with pytest.raises(openai.BadRequestError) as e:
        server.client.completions.create(model=MODEL, prompt=IDS, max_tokens=0)
    assert e.value.body["param"] == "max_tokens" and "echo" in e.value.body["message"]


def test_what_cannot_be_done_is_a_clear_400(server):
    post = server.http.post
    cases = [
        ({"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs"),
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"99999": 1}}, "99999"),
        ({"prompt": "x", "n": 2, "best_of": 1}, "best_of"),
        ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "min_tokens": 20, "max_tokens": 5}, "min_tokens"),
        ({"prompt": "x", "bad_words": ["an entirely long phrase " * 8]}, "bad_words"),
        ({"prompt": ["x", ""]}, "prompt"),
    ]
    for body, word in cases:
        r = post("/v1/completions", json=body)
        assert r.status_code == 400, (body, r.text)
        assert word in r.json()["error"]["message"] or r.json()["error"]["param"] == word, r.text
    r = post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                           "top_logprobs": 2})
    assert r.status_code == 400 and "top_logprobs" in r.text
    assert server.http.get("/health").status_code == 200


def test_beam_search_returns_token_ids_and_refuses_stop_token_ids(server, store):
    """return_token_ids (vLLM's) gives each beam's token ids and the prompt's, as a sampled
    request's; stop_token_ids, which the search does not stop at, is a 400 naming it."""
    from test_beam_search import _hf_beams
    want = [w[0] for w in _hf_beams(store, IDS, 2, 3)]
    r = server.http.post("/v1/completions", json={
        "model": MODEL, "prompt": IDS, "max_tokens": 3, "n": 2, "use_beam_search": True,
        "ignore_eos": True, "return_token_ids": True}).json()
    assert [c["token_ids"] for c in r["choices"]] == want
    assert [c["prompt_token_ids"] for c in r["choices"]] == [IDS, IDS]
    msgs = [{"role": "user", "content": "Hi"}]
    plain = server.http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": msgs, "max_tokens": 1, "return_token_ids": True}).json()
    r = server.http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": msgs, "max_tokens": 3, "n": 2, "use_beam_search": True,
        "ignore_eos": True, "return_token_ids": True}).json()
    prompt = plain["prompt_token_ids"]
    assert r["prompt_token_ids"] == prompt
    assert [c["token_ids"] for c in r["choices"]] == \
        [w[0] for w in _hf_beams(store, prompt, 2, 3)]
    bad = server.http.post("/v1/completions", json={
        "model": MODEL, "prompt": "Hi", "max_tokens": 2, "use_beam_search": True,
        "stop_token_ids": [5]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "stop_token_ids", bad.text


def test_chat_best_of_picks_the_highest_cumulative_logprob(server, run):
    """best_of on chat (vLLM's, as on completions) was read by nothing: the reply was one
    plain sample. It is the sample of highest cumulative logprob among best_of, all of
    them counted in usage; streamed, best_of > n is a 400 as on completions."""
    msgs = [{"role": "user", "content": "Hi"}]
    kw = dict(model=MODEL, messages=msgs, max_tokens=4, temperature=1.0, seed=3)
    r = server.client.chat.completions.create(
        **kw, n=1, extra_body={"best_of": 4, "ignore_eos": True, "return_token_ids": True})
    prompt = r.model_dump()["prompt_token_ids"]
    samples = [run(prompt, max_tokens=4, temperature=1.0, seed=3 + i, logprobs=0)
               for i in range(4)]
    best = max(samples, key=lambda o: o.cumulative_logprob)
    assert len({tuple(o.token_ids) for o in samples}) > 1       # a choice to make
    assert r.choices[0].message.content == best.text and r.choices[0].logprobs is None
    assert r.usage.completion_tokens == 16
    bad = server.http.post("/v1/chat/completions", json={**kw, "best_of": 2, "stream": True})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "best_of", bad.text
    bad = server.http.post("/v1/chat/completions", json={**kw, "n": 3, "best_of": 2})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "best_of", bad.text
