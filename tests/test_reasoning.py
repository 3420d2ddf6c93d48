"""Reasoning output (runtime/reasoning.py, `--reasoning-parser`): chat replies split into
`reasoning` and `content` at the model's markers, where the prompt says the reply starts,
and a structured output's grammar held back until the reasoning has ended.

The model: a tiny Qwen3 whose tokenizer has `<think>` and `</think>` (ids 256, 257), with
two rows of its (tied) embedding swapped with theirs, so that its greedy reply to the test
prompt opens with `<think>` and closes it a few tokens later: the vocabulary permuted, the
model otherwise the random one. The references are transformers' greedy tokens on that
checkpoint and the text split with str.partition.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from braze.ir.errors import BrazeError
from braze.runtime.reasoning import (
    ANSWER,
    FORMATS,
    REASONING,
    UNDECIDED,
    ReplySplitter,
    split_reply,
)

from conftest import hf_model

START, END = "<think>", "</think>"
START_ID, END_ID = 256, 257
USER = "What is a compiler?"
# the tiny chat template, with Qwen3's enable_thinking: unset, the reply decides; true, the
# prompt opens <think>; false, the prompt closes it (so the reply is all answer)
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}assistant:"
    "{% if enable_thinking is defined %}{{ '<think>' if enable_thinking else "
    "'<think></think>' }}{% endif %}{% endif %}")
N = 12                       # reply tokens
DIGITS = "[0-9]{3}"          # the structured-output test's answer format


# ---- the split, against str.partition ---------------------------------------------------

_TEXT = st.text(alphabet="ab<>/thinkTHINKZ[]|\n ", max_size=30)


def _reference(text: str, state: str, fmt) -> tuple:
    if state == ANSWER:
        return None, text
    if state == UNDECIDED:
        if not text.startswith(fmt.start):
            return None, text
        text = text[len(fmt.start):]
    think, found, answer = text.partition(fmt.end)
    if fmt.calls and fmt.calls in think:    # a tool call first: it ends it, and is answer
        think, call, rest = text.partition(fmt.calls)
        found, answer = call, call + rest
    if fmt.label and think.startswith(fmt.label):
        think = think[len(fmt.label):]
    return think, (answer if found else None)


@settings(max_examples=300, deadline=None)
@given(text=_TEXT, cuts=st.lists(st.integers(0, 30), max_size=6),
       state=st.sampled_from([REASONING, ANSWER, UNDECIDED]),
       name=st.sampled_from(sorted(FORMATS)))
def test_streamed_split_adds_up_to_the_whole_split(text, cuts, state, name):
    fmt = FORMATS[name]
    # markers the strategy's alphabet can spell, in every family's format
    text = text.replace("THINK", fmt.start).replace("think", fmt.end).replace(
        "Z", fmt.calls or "Z")
    assert split_reply(text, fmt, state) == _reference(text, state, fmt)
    s = ReplySplitter(fmt, state)
    got_r = got_c = ""
    for cut in sorted(c for c in cuts if c < len(text)):
        r, c = s.feed(text[:cut], False)
        got_r, got_c = got_r + r, got_c + c
    r, c = s.feed(text, True)
    want_r, want_c = _reference(text, state, fmt)
    assert (got_r + r, got_c + c) == (want_r or "", want_c or "")


def test_gemma4_label_is_not_reasoning():
    fmt = FORMATS["gemma4"]
    assert split_reply("<|channel>thought\nhmm<channel|>Paris", fmt, UNDECIDED) == ("hmm", "Paris")
    assert split_reply("<|channel>thou", fmt, UNDECIDED, final=False) == ("", None)


# ---- the model ---------------------------------------------------------------------------

def _prompt_ids(tok, enable_thinking=None) -> list[int]:
    kw = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    return tok.apply_chat_template([{"role": "user", "content": USER}], tokenize=True,
                                   add_generation_prompt=True, chat_template=TEMPLATE,
                                   return_dict=False, **kw)


def _greedy(model, ids, n=N) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def thinker(tmp_path_factory):
    """(checkpoint, artifact, reasoning token ids before </think>) of the thinking Qwen3."""
    import braze
    from tokenizers import AddedToken, Tokenizer
    from transformers import AutoTokenizer

    from braze.tiny import make_checkpoint, make_tokenizer
    d = tmp_path_factory.mktemp("thinker")
    for seed in range(1, 20):       # a random model whose reply fits the plan below
        ckpt = make_checkpoint("qwen3", d / f"model{seed}", seed=seed, with_tokenizer=False,
                               vocab_size=258)
        make_tokenizer(ckpt, vocab_size=256)
        tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in (START, END)])
        assert [tok.token_to_id(t) for t in (START, END)] == [START_ID, END_ID]
        tok.save(str(ckpt / "tokenizer.json"))
        cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
        (ckpt / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": TEMPLATE}))
        prompt = _prompt_ids(AutoTokenizer.from_pretrained(ckpt))
        model = hf_model(ckpt)
        out = _greedy(model, prompt)
        # the reply's first token becomes <think>, and one of the next few, new to the
        # reply, </think>; neither may be in the prompt (their rows change)
        b = out[0]
        k = next((i for i in range(2, 7) if out[i] not in prompt + out[:i] + [b]), None)
        if b not in prompt and k is not None:
            break
    a = out[k]
    emb = model.get_input_embeddings().weight.data        # tied: the LM head too
    for old, new in ((b, START_ID), (a, END_ID)):
        emb[[old, new]] = emb[[new, old]]
    model.save_pretrained(ckpt)
    art = d / "a.braze"
    braze.compile(ckpt, art, opt_level=0, targets="")
    return ckpt, art, out[1:k]


def _reference_reply(ckpt, enable_thinking=None) -> str:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = _greedy(hf_model(ckpt), _prompt_ids(tok, enable_thinking))
    return tok.decode(ids, skip_special_tokens=True)


def test_the_permuted_model_reasons_first(thinker):
    ckpt, _, thought = thinker
    text = _reference_reply(ckpt)
    assert text.startswith(START) and END in text       # the fixture did what it says


def test_a_parser_whose_markers_the_tokenizer_lacks_is_refused(store):
    from braze import LLM
    with pytest.raises(BrazeError, match=r"no token <\|channel> or <channel\|>"):
        LLM(store.artifact("llama"), backend="reference", num_kv_blocks=16,
            reasoning_parser="gemma4")
    with pytest.raises(BrazeError, match="choose one of deepseek_r1"):
        LLM(store.artifact("llama"), backend="reference", reasoning_parser="o1")


# ---- structured output waits for the reasoning to end -------------------------------------

@pytest.mark.parametrize("enable_thinking", [None, True, False])
def test_the_grammar_holds_the_answer_not_the_reasoning(thinker, enable_thinking):
    from transformers import AutoTokenizer

    from braze import LLM
    from braze.runtime.sampler import SamplingParams
    from braze.runtime.structured import StructuredOutputsParams
    ckpt, art, thought = thinker
    prompt = _prompt_ids(AutoTokenizer.from_pretrained(ckpt), enable_thinking)
    sp = SamplingParams(max_tokens=N + 8, temperature=0, ignore_eos=True,
                        structured_outputs=StructuredOutputsParams(regex=DIGITS))
    with LLM(art, backend="reference", num_kv_blocks=32, reasoning_parser="qwen3") as llm:
        out = llm.generate({"prompt_token_ids": prompt}, sp)[0].outputs[0]
    if enable_thinking is False:             # the prompt closed the reasoning: all answer
        assert re.fullmatch(DIGITS, out.text), out.text
        return
    lead = [START_ID] if enable_thinking is None else []
    want = lead + thought + [END_ID]
    assert out.token_ids[:len(want)] == want        # the model's own greedy reasoning
    think, answer = split_reply(out.text, FORMATS["qwen3"],
                                UNDECIDED if enable_thinking is None else REASONING)
    assert re.fullmatch(DIGITS, answer), out.text
    assert out.finish_reason == "stop"


# ---- the server's chat replies -------------------------------------------------------------

def _streamed(s, body) -> tuple[str, str, list]:
    think, said, reasons = "", "", []
    with s.http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for ch in json.loads(line[6:])["choices"]:
                d = ch["delta"]
                think += d.get("reasoning") or ""
                said += d.get("content") or ""
                reasons.append(ch["finish_reason"])
    return think, said, reasons


def test_the_server_splits_chat_replies_into_reasoning_and_content(thinker, tmp_path):
    from serve_helpers import MODEL, Server
    ckpt, art, _ = thinker
    s = Server(art, tmp_path, "--reasoning-parser", "qwen3", "--tool-call-parser", "hermes")
    try:
        assert "reasoning and content" in s.stderr()
        for enable_thinking in (None, True, False):
            text = _reference_reply(ckpt, enable_thinking)
            state = {None: UNDECIDED, True: REASONING, False: ANSWER}[enable_thinking]
            want = _reference(text, state, FORMATS["qwen3"])
            body = {"model": MODEL, "messages": [{"role": "user", "content": USER}],
                    "max_tokens": N, "temperature": 0, "ignore_eos": True}
            if enable_thinking is not None:
                body["chat_template_kwargs"] = {"enable_thinking": enable_thinking}
            r = s.http.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            msg = r.json()["choices"][0]["message"]
            assert (msg["reasoning"], msg["content"]) == want
            think, said, reasons = _streamed(s, body)
            assert (think, said) == (want[0] or "", want[1] or "")
            assert reasons[-1] == "length"
        # include_reasoning false (vLLM's): the answer alone
        body = {"model": MODEL, "messages": [{"role": "user", "content": USER}],
                "max_tokens": N, "temperature": 0, "ignore_eos": True,
                "include_reasoning": False}
        want = _reference(_reference_reply(ckpt), UNDECIDED, FORMATS["qwen3"])
        msg = s.http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
        assert (msg["reasoning"], msg["content"]) == (None, want[1])
        assert _streamed(s, body)[:2] == ("", want[1])
        # tool_choice required: the model reasons freely, then calls a tool, and the
        # tool-call reader reads the answer alone
        tools = [{"type": "function", "function": {"name": "add", "parameters": {
            "type": "object", "properties": {"x": {"enum": ["a", "b"]}}, "required": ["x"],
            "additionalProperties": False}}}]
        body = {"model": MODEL, "messages": [{"role": "user", "content": USER}],
                "max_tokens": 60, "temperature": 0, "tools": tools, "tool_choice": "required",
                "parallel_tool_calls": False}
        r = s.http.post("/v1/chat/completions", json=body)
        ch = r.json()["choices"][0]
        want = _reference(_reference_reply(ckpt), UNDECIDED, FORMATS["qwen3"])[0]
        assert ch["message"]["reasoning"] == want
        assert ch["finish_reason"] == "tool_calls"
        assert [c["function"]["name"] for c in ch["message"]["tool_calls"]] == ["add"]
        assert json.loads(ch["message"]["tool_calls"][0]["function"]["arguments"])["x"] in "ab"
        think, said, reasons = _streamed(s, body)
        assert think == want and reasons[-1] == "tool_calls"
        # a reply cut inside its reasoning: all reasoning, no content
        r = s.http.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": USER}],
            "max_tokens": 2, "temperature": 0})
        msg = r.json()["choices"][0]["message"]
        assert msg["content"] is None and msg["reasoning"]
        # with tools offered (tool_choice auto) too: no answer is content null, not ""
        r = s.http.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": USER}],
            "max_tokens": 2, "temperature": 0, "tools": tools})
        msg = r.json()["choices"][0]["message"]
        assert msg["content"] is None and msg["reasoning"] and not msg.get("tool_calls")
        # completions are text, as in vLLM: the markers stay in it
        r = s.http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert "reasoning" not in r.json()["choices"][0]
    finally:
        s.stop()


def test_serve_refuses_an_unknown_parser(thinker, tmp_path):
    import subprocess
    import sys
    _, art, _ = thinker
    r = subprocess.run([sys.executable, "-m", "braze", "serve", str(art), "--port", "0",
                        "--backend", "reference", "--reasoning-parser", "qwen4"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "reasoning parser 'qwen4'" in r.stderr and "Traceback" not in r.stderr


def test_a_reply_sent_back_with_its_reasoning_reaches_the_template():
    """Clients send an earlier reply back with its `reasoning` (vLLM's name) or
    `reasoning_content` (the older one); chat templates read `reasoning_content`."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from braze.serving.chat import ChatTemplate
    from braze.serving.protocol import ChatMessage
    source = ("{% for m in messages %}{{ m.role }}:{% if m.reasoning_content is defined %}"
              "<think>{{ m.reasoning_content }}</think>{% endif %}{{ m.content }}|"
              "{% endfor %}")
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": "4", "reasoning": "2+2"},
            {"role": "assistant", "content": "5", "reasoning_content": "2+3"}]
    want = ImmutableSandboxedEnvironment().from_string(source).render(
        messages=[{**m, "reasoning_content": m.get("reasoning", m.get("reasoning_content"))}
                  if m["role"] == "assistant" else m for m in msgs])
    got = ChatTemplate(source).render([ChatMessage(**m) for m in msgs],
                                      add_generation_prompt=False)
    assert got == want == "user:hi|assistant:<think>2+2</think>4|assistant:<think>2+3</think>5|"


def test_default_chat_template_kwargs_turn_thinking_off_unless_asked(thinker, tmp_path):
    """vLLM's --default-chat-template-kwargs: '{"enable_thinking": false}' serves the
    thinking model without reasoning; a request's own chat_template_kwargs win."""
    from serve_helpers import MODEL, Server
    ckpt, art, _ = thinker
    s = Server(art, tmp_path, "--reasoning-parser", "qwen3",
               "--default-chat-template-kwargs", '{"enable_thinking": false}')
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": USER}],
                "max_tokens": N, "temperature": 0, "ignore_eos": True}
        for asked in (None, True):
            if asked is not None:
                body["chat_template_kwargs"] = {"enable_thinking": asked}
            text = _reference_reply(ckpt, False if asked is None else asked)
            want = _reference(text, ANSWER if asked is None else REASONING, FORMATS["qwen3"])
            msg = s.http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
            assert (msg["reasoning"], msg["content"]) == want
        # /tokenize renders the chat the same way
        r = s.http.post("/tokenize", json={"model": MODEL, "messages": body["messages"]})
        assert r.json()["tokens"][-2:] == [START_ID, END_ID]
    finally:
        s.stop()


@pytest.mark.parametrize("value, words", [
    ("{not json", "not valid JSON"), ("[1]", "must be a JSON object"),
    ('{"messages": []}', "must not set 'messages'")])
def test_bad_default_chat_template_kwargs_are_refused(value, words):
    from braze.serving.options import ServerOptions
    with pytest.raises(BrazeError, match=words):
        ServerOptions(default_chat_template_kwargs=value)


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.sampled_from([5, 6, 7, START_ID, END_ID, 258]), max_size=12),
       state=st.sampled_from([REASONING, ANSWER, UNDECIDED]))
def test_reasoning_tokens_are_the_tokens_of_the_reasoning_text(ids, state):
    """Counted on token ids, the reasoning tokens are those whose text makes the split's
    reasoning (each test token is one character, each marker one token; 258 the tool-call
    marker)."""
    from braze.runtime.reasoning import ReasoningMarkers
    fmt = FORMATS["qwen3"]
    m = ReasoningMarkers("qwen3", fmt, START_ID, END_ID, False, 258)
    text = "".join({START_ID: START, END_ID: END, 258: fmt.calls}.get(t, "x") for t in ids)
    think, answer = _reference(text, state, FORMATS["qwen3"])
    # the reference reasoning text, markers inside it (a second <think>) counted as one token
    want = len((think or "").replace(START, "x"))
    assert m.reasoning_tokens(ids, state) == want
    # and the answer's tokens (the logprobs /v1/responses gives) are the answer's text
    start = m.answer_start(ids, state)
    if answer is None or (state == UNDECIDED and not ids):
        assert start is None
    else:
        tail = "".join({START_ID: START, END_ID: END, 258: fmt.calls}.get(t, "x")
                       for t in ids[start:])
        assert tail == answer, (text, start)


def test_responses_and_beam_search_split_the_reply_too(thinker, tmp_path):
    """/v1/responses with a reasoning parser (vLLM's): a `reasoning` output item with the
    reasoning text, then the message; usage counts the reasoning tokens; streamed, the
    reasoning item's events come and close before the message's. Chat beam search splits
    each beam's reply."""
    from serve_helpers import MODEL, Server
    ckpt, art, thought = thinker
    want = _reference(_reference_reply(ckpt), UNDECIDED, FORMATS["qwen3"])
    s = Server(art, tmp_path, "--reasoning-parser", "qwen3")
    try:
        body = {"model": MODEL, "input": USER, "max_output_tokens": N, "temperature": 0,
                "ignore_eos": True}
        r = s.http.post("/v1/responses", json=body)
        assert r.status_code == 200, r.text
        got = r.json()
        kinds = [o["type"] for o in got["output"]]
        assert kinds == ["reasoning", "message"]
        assert got["output"][0]["content"] == [{"type": "reasoning_text", "text": want[0]}]
        assert got["output"][1]["content"][0]["text"] == want[1]
        assert got["usage"]["output_tokens_details"]["reasoning_tokens"] == len(thought)
        # logprobs (include): the answer's tokens alone, as chat's of the same reply after
        # <think>, the reasoning and </think>
        lp = s.http.post("/v1/responses", json={**body, "top_logprobs": 2, "include": [
            "message.output_text.logprobs"]}).json()["output"][1]["content"][0]["logprobs"]
        chat = s.http.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": USER}], "max_tokens": N,
            "temperature": 0, "ignore_eos": True, "logprobs": True, "top_logprobs": 2}).json()
        assert lp == chat["choices"][0]["logprobs"]["content"][len(thought) + 2:] and lp
        events = []
        with s.http.stream("POST", "/v1/responses", json={**body, "stream": True}) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
        types = [e["type"] for e in events]
        think = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
        said = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        assert (think, said) == want
        added = [e["item"]["type"] for e in events if e["type"] == "response.output_item.added"]
        assert added == ["reasoning", "message"]
        assert types.index("response.output_item.done") < types.index("response.content_part.added")
        final = events[-1]["response"]
        assert [o["type"] for o in final["output"]] == kinds
        assert final["output"][0]["content"] == got["output"][0]["content"]
        # the reasoning item sent back, as vLLM's clients do, is taken as the reply's
        again = s.http.post("/v1/responses", json={**body, "input": [
            {"role": "user", "content": USER}, got["output"][0], got["output"][1],
            {"role": "user", "content": "and then?"}]})
        assert again.status_code == 200, again.text
        bad = s.http.post("/v1/responses", json={**body, "input": [
            {"type": "reasoning", "content": "not parts"}]})
        assert bad.status_code == 400 and "input[0]" in bad.json()["error"]["message"]
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(ckpt)
        r = s.http.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": USER}], "n": 2,
            "use_beam_search": True, "max_tokens": N, "ignore_eos": True,
            "return_token_ids": True})
        assert r.status_code == 200, r.text
        for ch in r.json()["choices"]:
            text = tok.decode(ch["token_ids"], skip_special_tokens=True)
            msg = ch["message"]
            assert (msg["reasoning"], msg["content"]) == _reference(text, UNDECIDED,
                                                                    FORMATS["qwen3"])
    finally:
        s.stop()


# a Qwen3-style template that renders an earlier reply's reasoning (as Qwen3's does for the
# replies after the last user message: a tool-calling loop), and enable_thinking=false as
# an empty closed reasoning
_HISTORY = (
    "{% for m in messages %}{{ m['role'] + ': ' }}{% if m.reasoning_content is defined %}"
    "{{ '<think>\n' + m.reasoning_content + '\n</think>\n\n' }}{% endif %}"
    "{{ m['content'] + '\n' }}{% endfor %}assistant:"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% endif %}")


@pytest.mark.parametrize("earlier, enable_thinking, want", [
    (False, None, UNDECIDED), (True, None, UNDECIDED), (True, False, ANSWER),
    (False, False, ANSWER)])
def test_an_earlier_replys_reasoning_does_not_decide_the_new_one(thinker, earlier,
                                                                 enable_thinking, want):
    """Only markers the template put after the conversation decide where the reply starts:
    an earlier reply's closed reasoning (Qwen3's tool loops render it; Magistral's system
    prompt spells [THINK]...[/THINK]) is followed by more of the conversation, and the new
    reply may reason again. (Its </think> made every such reply all answer: its reasoning
    came back as content, and a grammar held it from the first token.)"""
    from transformers import AutoTokenizer

    from braze.runtime.reasoning import ReasoningMarkers
    from braze.runtime.tokenizer import Tokenizer
    ckpt, _, _ = thinker
    msgs = [{"role": "user", "content": USER}]
    if earlier:
        msgs += [{"role": "assistant", "content": "a call", "reasoning_content": "hm"},
                 {"role": "tool", "content": "42"}]
    kw = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    ids = AutoTokenizer.from_pretrained(ckpt).apply_chat_template(
        msgs, chat_template=_HISTORY, tokenize=True, return_dict=False, **kw)
    assert (END_ID in ids) == (earlier or enable_thinking is False)    # the template's doing
    markers = ReasoningMarkers.resolve("qwen3", Tokenizer(ckpt))
    assert markers.prompt_state(ids) == want
