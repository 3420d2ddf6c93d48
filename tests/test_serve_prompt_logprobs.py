"""prompt_logprobs and echo with logprobs through `braze serve` on an -O2 artifact (its LM
head pruned to the logits rows; 4 rows a step here, so a prompt spreads over chunks),
with the real `openai` client, against the -O1 artifact run in-process."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")

from serve_helpers import MODEL, Server  # noqa: E402  (after the importorskip)

LIMITS = dict(max_num_seqs=4, max_num_tokens=64)


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    s = Server(store.artifact("llama", opt_level=2, **LIMITS),
               tmp_path_factory.mktemp("serve-plp-o2"))
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def run(store):
    from braze.runtime.engine import Engine
    from braze.runtime.sampler import SamplingParams

    from conftest import run_all
    eng = Engine(store.artifact("llama", opt_level=1, **LIMITS), backend="reference",
                 num_kv_blocks=64)

    def go(prompt, **kw):
        kw.setdefault("ignore_eos", True)
        (out,) = run_all(eng, [prompt], SamplingParams(**kw))
        return out
    go.engine = eng
    return go


IDS = [1, 40, 41, 42, 43, 44, 90, 17, 3, 120, 77]


def test_completions_echo_logprobs_and_prompt_logprobs_on_o2(server, run):
    want = run(IDS, max_tokens=3, logprobs=2, prompt_logprobs=2)
    r = server.client.completions.create(model=MODEL, prompt=IDS, max_tokens=3, temperature=0,
                                         logprobs=2, echo=True,
                                         extra_body={"ignore_eos": True, "prompt_logprobs": 2})
    c = r.model_dump()["choices"][0]
    lp = c["logprobs"]
    tok = run.engine.tokenizer
    assert lp["tokens"] == [tok.decode([t], skip_special_tokens=False)
                            for t in IDS + want.token_ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for pos in range(1, len(IDS)):
        assert abs(lp["token_logprobs"][pos] - want.prompt_logprobs[pos].logprob) < 1e-4
    for i, e in enumerate(want.logprobs):
        assert abs(lp["token_logprobs"][len(IDS) + i] - e.logprob) < 1e-4
    plp = c["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(IDS)
    for pos in range(1, len(IDS)):
        e = want.prompt_logprobs[pos]
        got = plp[pos]
        assert abs(got[str(IDS[pos])]["logprob"] - e.logprob) < 1e-4
        assert got[str(IDS[pos])]["rank"] == e.rank
        assert {int(t) for t in got} == {IDS[pos]} | {t for t, _ in e.top}
    # streamed: the echo chunk carries the prompt's logprobs, then the output's follow
    chunks = list(server.client.completions.create(
        model=MODEL, prompt=IDS, max_tokens=3, temperature=0, logprobs=2, echo=True,
        stream=True, extra_body={"ignore_eos": True}))
    streamed = [x for ch in chunks if ch.choices and ch.choices[0].logprobs
                for x in ch.choices[0].logprobs.token_logprobs]
    assert len(streamed) == len(IDS) + 3 and streamed[0] is None
    assert all(abs(a - b) < 1e-4 for a, b in zip(streamed[1:], lp["token_logprobs"][1:]))


def test_chat_prompt_logprobs_and_concurrent_plain_requests_on_o2(server, run):
    """A chat prompt's logprobs (its templated prompt spans several chunks of 4 rows)
    while plain requests run beside it: each gets what it gets alone."""
    from concurrent.futures import ThreadPoolExecutor
    msgs = [{"role": "user", "content": "Hi there, how are you today?"}]

    def chat():
        return server.client.chat.completions.create(
            model=MODEL, messages=msgs, max_tokens=2, temperature=0,
            extra_body={"prompt_logprobs": 1, "ignore_eos": True,
                        "return_token_ids": True}).model_dump()

    def plain(i):
        return server.client.completions.create(
            model=MODEL, prompt=IDS[:4 + i], max_tokens=4, temperature=0,
            extra_body={"ignore_eos": True}).choices[0].text

    with ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(chat)] + [pool.submit(plain, i) for i in range(3)]
        r, texts = futs[0].result(), [f.result() for f in futs[1:]]
    ids = r.get("prompt_token_ids") or r["choices"][0]["prompt_token_ids"]
    plp = r["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids) > 8
    want = run(ids, max_tokens=2, prompt_logprobs=1)
    for pos in range(1, len(ids)):
        assert abs(plp[pos][str(ids[pos])]["logprob"] - want.prompt_logprobs[pos].logprob) < 1e-4
    for i, t in enumerate(texts):
        assert t == run(IDS[:4 + i], max_tokens=4).text
