"""`braze.LLM` as a vLLM user writes it: `LLM(model=...)`, `generate(prompts,
sampling_params=...)`, TextPrompt/TokensPrompt dicts, `out.prompt` and
`out.outputs[0].text` (the first lines of vLLM's quickstart), each checked against
transformers' greedy tokens or the engine's own plain path."""

from __future__ import annotations

import numpy as np
import pytest

from braze import LLM, SamplingParams
from braze.ir.errors import BrazeError

from conftest import hf_model
from test_engine import assert_valid_greedy

GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(store):
    return LLM(model=store.artifact("llama"), backend="reference", num_kv_blocks=32)


def test_the_vllm_quickstart_reads_outputs_and_prompt(store, llm):
    prompts = ["Hello, my name is", "The capital of France is"]
    outs = llm.generate(prompts, sampling_params=GREEDY)
    model = hf_model(store.checkpoint("llama"))
    tok = llm.get_tokenizer()
    for text, out in zip(prompts, outs):
        assert out.prompt == text
        assert len(out.outputs) == 1
        first = out.outputs[0]
        assert first.text == tok.decode(first.token_ids)
        assert len(first.token_ids) == 6 and first.finish_reason == "length"
        assert_valid_greedy(model, tok.encode(text), first.token_ids)
    # n > 1 keeps its list of samples; a token-id prompt has no prompt text
    many = llm.generate([[1, 5, 6]], SamplingParams(max_tokens=3, n=2, temperature=1.0,
                                                    seed=1))[0]
    assert len(many.outputs) == 2 and many.prompt is None


def test_text_and_tokens_prompt_dicts_are_the_plain_prompts(llm):
    ids = llm.get_tokenizer().encode("hello world")
    plain = llm.generate(["hello world", ids], GREEDY)
    dicts = llm.generate([{"prompt": "hello world"}, {"prompt_token_ids": ids}], GREEDY)
    assert [o.token_ids for o in dicts] == [o.token_ids for o in plain]
    assert [o.prompt_token_ids for o in dicts] == [ids, ids]
    single = llm.generate({"prompt_token_ids": np.array(ids)}, GREEDY)
    assert [o.token_ids for o in single] == [plain[1].token_ids]
    assert llm.generate(list(np.array(ids)), GREEDY)[0].token_ids == plain[1].token_ids


@pytest.mark.parametrize("prompts,words", [
    (None, "got NoneType"), (5, "got int"), ([[1.5, 2]], "token ids"),
    ({"prompt": "hi", "multi_modal_data": {}}, "multi_modal_data"),
    ([{"prompt_token_ids": "1,2"}], "prompt_token_ids")])
def test_a_prompt_of_another_shape_is_named(llm, prompts, words):
    with pytest.raises(BrazeError, match=words):
        llm.generate(prompts, GREEDY)


def test_sampling_params_given_twice_or_as_a_dict_is_an_error(llm):
    with pytest.raises(BrazeError, match="once"):
        llm.generate("hi", GREEDY, sampling_params=GREEDY)
    with pytest.raises(BrazeError, match="SamplingParams"):
        llm.generate("hi", {"max_tokens": 3})
    with pytest.raises(BrazeError, match="once"):
        LLM()


def test_the_engine_reads_no_float_as_a_token_id(llm):
    with pytest.raises(BrazeError, match="token ids"):
        llm.engine.encode([1.5, 2])
    with pytest.raises(BrazeError, match="token ids"):
        llm.engine.encode([True, 2])
    assert llm.engine.encode(np.array([3, 4])) == [3, 4]


def _hf_chat_ids(tok, conversation, **kw) -> list[int]:
    r = tok.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True, **kw)
    return list(r["input_ids"] if hasattr(r, "keys") else r)


def test_chat_renders_as_transformers_does_and_generates_from_it(store, llm):
    from transformers import AutoTokenizer
    hf_tok = AutoTokenizer.from_pretrained(store.checkpoint("llama"))
    convs = [[{"role": "user", "content": "Hi there"}],
             [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": [{"type": "text", "text": "What is "},
                                           {"type": "text", "text": "2+2?"}]}]]
    want = [_hf_chat_ids(hf_tok, [{"role": m["role"], "content": m["content"] if
                                   isinstance(m["content"], str) else
                                   "\n".join(p["text"] for p in m["content"])} for m in c])
            for c in convs]
    outs = llm.chat(convs, GREEDY)
    assert [o.prompt_token_ids for o in outs] == want
    plain = llm.generate([{"prompt_token_ids": ids} for ids in want], GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == [o.token_ids for o in plain]
    model = hf_model(store.checkpoint("llama"))
    for ids, o in zip(want, outs):
        assert_valid_greedy(model, ids, o.outputs[0].token_ids)
    assert outs[0].prompt == hf_tok.decode(want[0])
    # one conversation, not a list of them
    assert llm.chat(convs[0], GREEDY)[0].token_ids == outs[0].token_ids
    # a template of the caller's, and its keyword arguments
    mine = "{% for m in messages %}[{{ m['role'] }}|{{ m['content'] }}|{{ tag }}]{% endfor %}"
    got = llm.chat(convs[0], GREEDY, chat_template=mine, chat_template_kwargs={"tag": "x"})
    assert got[0].prompt_token_ids == _hf_chat_ids(hf_tok, convs[0], chat_template=mine,
                                                   tag="x")


def test_chat_continues_the_final_message_as_transformers_cuts_it(store, llm):
    """vLLM's LLM.chat(continue_final_message=True, add_generation_prompt=False): the prompt
    ends inside the final (assistant) message, as transformers' apply_chat_template cuts it."""
    from transformers import AutoTokenizer
    hf_tok = AutoTokenizer.from_pretrained(store.checkpoint("llama"))
    conv = [{"role": "user", "content": "Count with me."},
            {"role": "assistant", "content": "One, two,"}]
    r = hf_tok.apply_chat_template(conv, tokenize=True, add_generation_prompt=False,
                                   continue_final_message=True)
    want = list(r["input_ids"] if hasattr(r, "keys") else r)
    out = llm.chat(conv, GREEDY, add_generation_prompt=False, continue_final_message=True)[0]
    assert out.prompt_token_ids == want
    assert out.prompt.endswith("One, two,")
    with pytest.raises(BrazeError, match="continue_final_message"):
        llm.chat(conv, GREEDY, continue_final_message=True)


def test_get_tokenizer_answers_what_vllm_scripts_ask_a_tokenizer(store, llm):
    """vLLM's get_tokenizer() is the transformers tokenizer, and scripts ask it for
    apply_chat_template (text or ids, to pass to generate) and the special token ids;
    each answer is transformers' own for the same tokenizer."""
    from transformers import AutoTokenizer
    hf_tok = AutoTokenizer.from_pretrained(store.checkpoint("llama"))
    tok = llm.get_tokenizer()
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    for kw in ({}, {"add_generation_prompt": True}, {"tokenize": False},
               {"tokenize": False, "add_generation_prompt": True},
               {"tokenize": False, "chat_template": "{{ messages[-1]['content'] }}"}):
        want = hf_tok.apply_chat_template(conv, **kw)
        want = list(want["input_ids"]) if hasattr(want, "keys") else want
        assert tok.apply_chat_template(conv, **kw) == want, kw
    assert tok.apply_chat_template([conv, conv[1:]], tokenize=False) == \
        hf_tok.apply_chat_template([conv, conv[1:]], tokenize=False)
    assert (tok.bos_token_id, tok.eos_token_id, tok.bos_token, tok.eos_token) == \
        (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.bos_token, hf_tok.eos_token)
    text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    ids = tok.apply_chat_template(conv, add_generation_prompt=True)
    assert llm.generate(text, GREEDY)[0].prompt_token_ids[1:] == ids  # generate adds a BOS
    assert llm.chat(conv, GREEDY)[0].prompt_token_ids == ids
    assert tok.apply_chat_template(conv, return_dict=False, padding=False) == \
        tok.apply_chat_template(conv)
    with pytest.raises(BrazeError, match="return_tensors"):
        tok.apply_chat_template(conv, return_tensors="pt")


def test_use_tqdm_as_vllm_scripts_pass_it(llm):
    """vLLM's generate/chat(..., use_tqdm=False): braze draws no progress bar, so the
    keyword changes nothing, and a vLLM script runs as written."""
    plain = llm.generate(["hello world"], GREEDY)[0].token_ids
    assert llm.generate(["hello world"], GREEDY, use_tqdm=False)[0].token_ids == plain
    assert llm.generate(["hello world"], sampling_params=GREEDY, use_tqdm=True)[0].token_ids \
        == plain
    conv = [{"role": "user", "content": "Hi"}]
    assert llm.chat(conv, GREEDY, use_tqdm=False)[0].token_ids == \
        llm.chat(conv, GREEDY)[0].token_ids


def test_chat_passes_tool_call_arguments_as_objects_as_the_server_does(store, llm):
    """An assistant's tool_calls in the history carry `arguments` as a JSON string (OpenAI's
    shape); templates expect an object (`arguments | tojson`), which vLLM's LLM.chat and
    braze's server pass. Reference: transformers rendering the object form."""
    from transformers import AutoTokenizer
    hf_tok = AutoTokenizer.from_pretrained(store.checkpoint("llama"))
    template = ("{% for m in messages %}{{ m['role'] }}:{% if m.tool_calls %}"
                "{% for c in m.tool_calls %}{{ c.function.name }}{{ c.function.arguments | tojson }}"
                "{% endfor %}{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}")
    call = {"id": "c1", "type": "function",
            "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    conv = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    as_object = [conv[0], {**conv[1], "tool_calls": [
        {**call, "function": {"name": "weather", "arguments": {"city": "Paris"}}}]}, conv[2]]
    want = hf_tok.apply_chat_template(as_object, chat_template=template, tokenize=False,
                                      add_generation_prompt=False)
    assert '{"city": "Paris"}' in want
    out = llm.chat(conv, GREEDY, chat_template=template, add_generation_prompt=False)[0]
    assert out.prompt == want
    with pytest.raises(BrazeError, match="not JSON"):
        llm.chat([{"role": "assistant", "tool_calls": [
            {**call, "function": {"name": "f", "arguments": "{oops"}}]}], GREEDY,
            chat_template=template)


def test_chat_errors_name_the_message(llm):
    with pytest.raises(BrazeError, match=r"messages\[0\].content\[0\].*image_url"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}])
    with pytest.raises(BrazeError, match="rejected the messages: no system"):
        llm.chat([{"role": "system", "content": "x"}], GREEDY,
                 chat_template="{% if messages[0]['role'] == 'system' %}"
                               "{{ raise_exception('no system') }}{% endif %}")
    with pytest.raises(BrazeError, match="does not compile"):
        llm.chat([{"role": "user", "content": "x"}], chat_template="{% for %}")
    with pytest.raises(BrazeError, match="messages"):
        llm.chat("hello")
    # what braze passes to the template itself (a TypeError from deep inside before)
    for key in ("add_generation_prompt", "messages", "bos_token"):
        with pytest.raises(BrazeError, match=f"chat_template_kwargs.*{key}"):
            llm.chat([{"role": "user", "content": "x"}], GREEDY,
                     chat_template_kwargs={key: True})


def test_max_tokens_none_generates_up_to_max_model_len(llm):
    """vLLM's max_tokens=None: no count of its own, the model's length limit ends it."""
    limit = llm.engine.max_model_len
    prompt = [1, 5, 6, 7]
    out = llm.generate(prompt, SamplingParams(max_tokens=None, ignore_eos=True))[0]
    assert len(prompt) + len(out.token_ids) == limit and out.finish_reason == "length"
    counted = llm.generate(prompt, SamplingParams(max_tokens=limit - len(prompt),
                                                  ignore_eos=True))[0]
    assert out.token_ids == counted.token_ids
    with pytest.raises(BrazeError, match="max_tokens"):
        llm.generate(prompt, SamplingParams(max_tokens=0))


def test_logprobs_read_as_vllms_dicts_of_logprob(store, llm):
    """vLLM's `outputs[0].logprobs[i]` and `prompt_logprobs[i]` are dicts {token id:
    Logprob(logprob, rank, decoded_token)}: the sampled (or prompt) token and the top N.
    Checked against transformers' log_softmax."""
    import torch
    model = hf_model(store.checkpoint("llama"))
    tok = llm.get_tokenizer()
    prompt = [1, 40, 41, 42, 43]
    out = llm.generate(prompt, SamplingParams(max_tokens=4, temperature=1.0, seed=3,
                                              ignore_eos=True, logprobs=3,
                                              prompt_logprobs=2))[0]
    gen = out.outputs[0].token_ids
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt + gen])).logits[0].double(), -1)
    for i, (t, d) in enumerate(zip(gen, out.outputs[0].logprobs)):
        row = ref[len(prompt) - 1 + i]
        top = torch.topk(row, 3).indices.tolist()
        assert list(d)[0] == t and set(d) == {t, *top} and len(d) == len({t, *top})
        assert t in d and 10 ** 6 not in d and d.get(10 ** 6) is None
        for tid, lp in d.items():
            assert abs(lp.logprob - row[tid].item()) < 1e-4
            assert lp.rank == int((row > row[tid] + 1e-6).sum()) + 1
            assert lp.decoded_token == tok.decode([tid], skip_special_tokens=False)
    assert out.prompt_logprobs[0] is None
    for pos in range(1, len(prompt)):
        d, row = out.prompt_logprobs[pos], ref[pos - 1]
        t = prompt[pos]
        assert set(d) == {t, *torch.topk(row, 2).indices.tolist()}
        assert abs(d[t].logprob - row[t].item()) < 1e-4
        assert d[t].decoded_token == tok.decode([t], skip_special_tokens=False)



def test_outputs_carry_vllms_num_cached_tokens_and_sample_index(llm):
    """vLLM's RequestOutput.num_cached_tokens (prompt tokens served from the prefix cache:
    the whole blocks of a prompt seen before, the last token always computed) and each
    sample's CompletionOutput.index (0..n-1) are read by vLLM code; they were missing."""
    bs = llm.engine.block_manager.block_size
    prompt = [1] + [(7 * i) % 200 + 3 for i in range(2 * bs + 5)]
    first = llm.generate([prompt], GREEDY)[0]
    again = llm.generate([prompt], GREEDY)[0]
    assert first.num_cached_tokens == first.metrics["num_cached_tokens"] == 0
    assert again.num_cached_tokens == again.metrics["num_cached_tokens"] == \
        (len(prompt) - 1) // bs * bs
    assert again.token_ids == first.token_ids
    many = llm.generate([prompt], SamplingParams(max_tokens=3, n=3, temperature=1.0,
                                                 seed=5))[0]
    assert [o.index for o in many.outputs] == [0, 1, 2]
    assert first.outputs[0].index == 0
    ranked = llm.generate([prompt], SamplingParams(max_tokens=3, n=2, best_of=4,
                                                   temperature=1.0, seed=5))[0]
    assert [o.index for o in ranked.outputs] == [0, 1]
    # the engine's own reports carry it too, from the first one on
    eng = llm.engine
    eng.add_request("cached-probe", prompt, GREEDY)
    reports = []
    while eng.has_unfinished():
        reports += [o for o in eng.step() if o.request_id == "cached-probe"]
    assert [o.num_cached_tokens for o in reports] == \
        [again.num_cached_tokens] * len(reports)


def test_priority_is_refused_unless_neutral_as_vllms_fcfs_scheduler_does(llm):
    """vLLM's generate(..., priority=[...]): under its default first-come first-served
    policy a non-zero priority is an error, zeros change nothing. braze schedules FCFS
    only, so it does the same (it was a TypeError, even for the neutral zeros)."""
    prompts = [[1, 5, 6, 7], [1, 9, 10]]
    plain = llm.generate(prompts, GREEDY)
    zeros = llm.generate(prompts, GREEDY, priority=[0, np.int64(0)])
    assert [o.token_ids for o in zeros] == [o.token_ids for o in plain]
    with pytest.raises(BrazeError, match=r"priority=5.*first-come first-served.*leave"):
        llm.generate(prompts, GREEDY, priority=[0, 5])
    with pytest.raises(BrazeError, match="2 priorities for 1 prompts"):
        llm.generate(prompts[:1], GREEDY, priority=[0, 0])
    assert not llm.engine.has_unfinished()          # nothing was queued by the refusals
    with pytest.raises(BrazeError, match=r"priority=1.*first-come"):
        llm.engine.add_request("prio", prompts[0], GREEDY, priority=1)
    assert "prio" not in llm.engine.requests



def test_chat_text_part_without_text_is_named_as_such(llm):
    """A {"type": "text"} part without a text string was refused as being 'of type text'
    while asking for text parts, which reads as a contradiction: it names the missing text."""
    for part in ({"type": "text"}, {"type": "text", "text": None}, {"type": "text", "text": 3}):
        with pytest.raises(BrazeError, match=r"messages\[0\]\.content\[1\].*without a \"text\""):
            llm.chat([{"role": "user", "content": [{"type": "text", "text": "Hi"}, part]}])


def test_truncate_prompt_tokens_keeps_each_prompts_last_tokens(store, llm):
    """vLLM's SamplingParams(truncate_prompt_tokens=k): the prompt's last k tokens, text or
    ids (-1: max_model_len), as the server's field of that name. It was a TypeError."""
    limit = llm.engine.max_model_len
    long = [1] + [(5 * i) % 200 + 3 for i in range(limit + 20)]
    text = "The quick brown fox jumps over the lazy dog. " * 3
    k = 7
    cut = SamplingParams(max_tokens=4, ignore_eos=True, truncate_prompt_tokens=k)
    outs = llm.generate([long, text], cut)
    want = [long[-k:], llm.get_tokenizer().encode(text)[-k:]]
    assert [o.prompt_token_ids for o in outs] == want
    assert outs[1].prompt == text
    plain = llm.generate([{"prompt_token_ids": ids} for ids in want],
                         SamplingParams(max_tokens=4, ignore_eos=True))
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    model = hf_model(store.checkpoint("llama"))
    for ids, o in zip(want, outs):
        assert_valid_greedy(model, ids, o.token_ids)
    # -1 keeps max_model_len tokens: a short prompt as it is, a long one still too long
    short = llm.generate(text, SamplingParams(max_tokens=4, ignore_eos=True,
                                              truncate_prompt_tokens=-1))[0]
    assert short.token_ids == llm.generate(text, SamplingParams(
        max_tokens=4, ignore_eos=True))[0].token_ids
    with pytest.raises(BrazeError, match=f"{limit} tokens.*max_model_len"):
        llm.generate([long], SamplingParams(max_tokens=4, truncate_prompt_tokens=-1))
    for bad in (0, -2, limit + 1, 2.5, True):
        with pytest.raises(BrazeError, match="truncate_prompt_tokens"):
            llm.generate(text, SamplingParams(truncate_prompt_tokens=bad))
    assert not llm.engine.has_unfinished()


def test_vllms_constructor_arguments_are_taken_checked_or_refused_saying_why(store):
    """vLLM scripts write LLM(model=..., tensor_parallel_size=1, dtype="auto", seed=0,
    enforce_eager=True, trust_remote_code=True, ...). Where the artifact already does what
    they ask (its own tensor-parallel size and dtype), braze takes them; else the error
    names the argument and the braze way. Each was a bare "unknown engine option"."""
    art = store.artifact("llama")
    ok = LLM(model=art, backend="reference", num_kv_blocks=16, tensor_parallel_size=1,
             dtype="auto", enforce_eager=False, trust_remote_code=False,
             disable_log_stats=True, tokenizer_mode="auto")
    same = LLM(model=art, backend="reference", num_kv_blocks=16, dtype="float32")
    import torch
    typed = LLM(model=art, backend="reference", num_kv_blocks=16, dtype=torch.float32)
    plain = LLM(model=art, backend="reference", num_kv_blocks=16)
    want = plain.generate("hello", GREEDY)[0].token_ids
    eager = LLM(model=art, backend="reference", num_kv_blocks=16, enforce_eager=True)
    assert eager.engine.options.cudagraph_mode == "none"     # vLLM's: no CUDA graphs
    assert ok.engine.options.cudagraph_mode is None           # the artifact's
    for llm in (ok, same, typed, eager):
        assert llm.generate("hello", GREEDY)[0].token_ids == want
    for kw, words in ((dict(tensor_parallel_size=2), "tensor_parallel_size=2.*--tensor-parallel-size 2"),
                      (dict(dtype="bfloat16"), "dtype='bfloat16'.*float32.*--dtype bfloat16"),
                      (dict(enforce_eager=True, cudagraph_mode="full"),
                       "enforce_eager=True.*cudagraph_mode='full'"),
                      (dict(enforce_eager="yes"), "enforce_eager must be True or False"),
                      (dict(trust_remote_code=True), "trust_remote_code=True.*no model code"),
                      (dict(tokenizer="x"), "tokenizer='x'.*carries"),
                      (dict(quantization="fp8"), "quantization='fp8'.*braze compile"),
                      (dict(pipeline_parallel_size=2), "pipeline_parallel_size=2"),
                      (dict(tokenizer_mode="slow"), "tokenizer_mode='slow'.*tokenizer.json")):
        with pytest.raises(BrazeError, match=words):
            LLM(model=art, backend="reference", num_kv_blocks=16, **kw)


def test_a_checkpoint_given_as_the_model_says_to_compile_it(store):
    """vLLM's LLM(model=HF_DIR) is the first line a vLLM user writes; braze runs compiled
    artifacts, and the error said only that the directory has no manifest.json."""
    ckpt = store.checkpoint("llama")
    with pytest.raises(BrazeError, match=rf"Hugging Face checkpoint.*braze compile {ckpt} -o"):
        LLM(model=ckpt, backend="reference")


def test_get_tokenizer_answers_the_stop_token_lookups_of_vllm_scripts(store, llm):
    """vLLM scripts build stop_token_ids with get_tokenizer().convert_tokens_to_ids("<|eot_id|>")
    and read pad_token_id, len(tokenizer) and get_vocab(): AttributeErrors before. Each
    answer is transformers' own for the same tokenizer."""
    from transformers import AutoTokenizer
    hf_tok = AutoTokenizer.from_pretrained(store.checkpoint("llama"))
    tok = llm.get_tokenizer()
    for q in ("</s>", "<s>", "<pad>", "#", "not-a-token", ["</s>", "#", "not-a-token"], ()):
        assert tok.convert_tokens_to_ids(q) == hf_tok.convert_tokens_to_ids(q), q
    assert (tok.pad_token, tok.pad_token_id) == (hf_tok.pad_token, hf_tok.pad_token_id)
    assert len(tok) == len(hf_tok) and tok.get_vocab() == hf_tok.get_vocab()
    eos = tok.convert_tokens_to_ids("</s>")
    out = llm.generate([[1, 5, 6]], SamplingParams(max_tokens=4, stop_token_ids=[eos],
                                                   logit_bias={eos: 100}))[0]
    assert out.token_ids == [eos] and out.finish_reason == "stop"


def test_an_llm_closed_says_so_when_asked_to_generate(store):
    """After close() (or its with-block), generate ran on regardless, and with a grammar
    died of a RuntimeError from the grammar thread ("cannot schedule new futures after
    shutdown"); a tensor-parallel artifact's ranks are gone by then. Now it says why."""
    with LLM(model=store.artifact("llama"), backend="reference", num_kv_blocks=16) as llm:
        assert llm.generate("hi", GREEDY)[0].token_ids
    choice = SamplingParams(max_tokens=4, structured_outputs={"choice": ["yes", "no"]})
    for call in (lambda: llm.generate("hi", GREEDY), lambda: llm.generate("hi", choice),
                 lambda: llm.chat([{"role": "user", "content": "hi"}], GREEDY),
                 lambda: llm.engine.add_request("r", [1, 5], GREEDY)):
        with pytest.raises(BrazeError, match=r"closed.*new braze\.LLM"):
            call()
    assert not llm.engine.has_unfinished()
    llm.close()                     # twice is fine


def test_chat_takes_use_tqdm_third_as_vllms_chat_does(llm):
    """vLLM's signature is chat(messages, sampling_params, use_tqdm, lora_request, ...):
    llm.chat(conv, params, False) took False for a LoRA adapter and failed on "serves no
    LoRA adapters". A lora_request of another type is named as such, first."""
    conv = [{"role": "user", "content": "Hi"}]
    plain = llm.chat(conv, GREEDY)[0].token_ids
    assert llm.chat(conv, GREEDY, False)[0].token_ids == plain
    assert llm.chat(conv, GREEDY, True, None)[0].token_ids == plain
    for bad in (True, 3):
        with pytest.raises(BrazeError, match=rf"lora_request must be a LoRARequest.*got "
                                             rf"{type(bad).__name__}"):
            llm.generate("hi", GREEDY, lora_request=bad)
    assert not llm.engine.has_unfinished()


def test_spaces_between_special_tokens_is_vllms_field_taken_at_what_braze_does(llm):
    """SamplingParams(spaces_between_special_tokens=...) was a TypeError. braze decodes
    as vLLM's fast-tokenizer detokenizer does (the tokenizer's own spacing, as the server
    takes the field): True (vLLM's default) is that; False is refused naming it."""
    ids = [1, 5, 6, 7]
    plain = llm.generate([ids], SamplingParams(max_tokens=4, ignore_eos=True,
                                               skip_special_tokens=False))[0]
    same = llm.generate([ids], SamplingParams(max_tokens=4, ignore_eos=True,
                                              skip_special_tokens=False,
                                              spaces_between_special_tokens=True))[0]
    assert (same.token_ids, same.text) == (plain.token_ids, plain.text)
    for bad in (False, "yes"):
        with pytest.raises(BrazeError, match="spaces_between_special_tokens"):
            llm.generate([ids], SamplingParams(spaces_between_special_tokens=bad))


def test_llm_seed_makes_unseeded_sampling_repeat_as_vllms_does(store):
    """vLLM's LLM(seed=S): requests without a seed of their own sample the same tokens in
    every run of the script (the engine's generator is seeded). It was refused; now each
    unseeded request takes the next seed of a generator seeded with S."""
    art = store.artifact("llama")
    hot = SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True)
    prompts = ["hello", "hello", [1, 5, 6]]

    def run(seed):
        with LLM(model=art, backend="reference", num_kv_blocks=32, seed=seed) as llm:
            return [o.token_ids for o in llm.generate(prompts, hot)] + \
                [o.token_ids for o in llm.generate(prompts[:1], hot)]
    first, again, other = run(7), run(7), run(8)
    assert first == again
    assert first != other
    assert first[0] != first[1]         # each request its own draw, as in vLLM
    with LLM(model=art, backend="reference", num_kv_blocks=32, seed=7) as llm:
        own = SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True, seed=3)
        alone = LLM.generate(llm, [[1, 5, 6]], own)[0].token_ids
    with LLM(model=art, backend="reference", num_kv_blocks=32) as llm:
        assert llm.generate([[1, 5, 6]], own)[0].token_ids == alone   # its own seed wins
    for bad in (-1, 1.5, "7"):
        with pytest.raises(BrazeError, match="seed"):
            LLM(model=art, backend="reference", num_kv_blocks=8, seed=bad)


def test_chat_takes_vllms_chat_template_content_format(llm):
    """vLLM's chat(..., chat_template_content_format="string"|"auto"|"openai") was a
    TypeError. braze renders a message's content as one string (vLLM's "string"), which
    "auto" and "string" take; "openai" (content as a list of parts) is refused naming it."""
    conv = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    plain = llm.chat(conv, GREEDY)[0]
    for fmt in ("auto", "string"):
        got = llm.chat(conv, GREEDY, chat_template_content_format=fmt)[0]
        assert (got.prompt_token_ids, got.token_ids) == (plain.prompt_token_ids, plain.token_ids)
    for bad in ("openai", "text"):
        with pytest.raises(BrazeError, match=f"chat_template_content_format={bad!r}"):
            llm.chat(conv, GREEDY, chat_template_content_format=bad)
