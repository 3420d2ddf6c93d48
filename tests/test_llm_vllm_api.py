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
