"""Speculative method `mtp` on tensor-parallel artifacts: DeepSeek-V3's next-n layer
(`mtp.bir`) and Gemma 4's assistant sharded per rank by the same shard pass as the main
graph (the assistant's queries split like the target's KV heads it reads), their calls
run on every rank (rank 0 broadcasts each call's inputs; runtime/parallel.py), only
rank 0 samples. Checked on CPUs (gloo, two ranks, float32) against one rank: greedy tokens equal
plain decoding, and the acceptance counts equal one speculating rank's (the guesses are
the same tokens); a broken per-rank MTP shard is refused before any rank runs.
"""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file

from braze.artifact import sha256_file
from braze.ir.errors import BrazeError
from braze.runtime import LLM, SamplingParams

from conftest import prompts_of

LIMITS = dict(targets="", dtype="float32", max_num_seqs=8)
ROWS = 32          # -O2 logits rows (--max-logits-rows): k + 1 per sequence to verify
PARAMS = SamplingParams(max_tokens=10, ignore_eos=True)
SPEC_KEYS = ("spec_decode_num_drafts", "spec_decode_num_draft_tokens",
             "spec_decode_num_accepted_tokens", "spec_decode_accepted_per_position",
             "spec_decode_proposed_per_position")


@pytest.fixture(scope="module")
def guessing(tmp_path_factory):
    """A DeepSeek-V3 checkpoint whose MTP layer guesses well (accepted and rejected
    guesses both happen): -> compile(opt_level, tensor_parallel_size) -> artifact."""
    import braze
    import torch
    from braze.tiny_mtp import guessing_deepseek
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("mtp_tp")
    ckpt = guessing_deepseek(d)
    made = {}

    def artifact(opt: int, tp: int, ep: bool = False):
        if (opt, tp, ep) not in made:
            made[opt, tp, ep] = d / f"a{opt}-tp{tp}{'-ep' if ep else ''}"
            braze.compile(ckpt, made[opt, tp, ep], opt_level=opt, tensor_parallel_size=tp,
                          expert_parallel=ep, max_logits_rows=ROWS if opt == 2 else None,
                          **LIMITS)
        return made[opt, tp, ep]
    return artifact


def _spec(k: int) -> dict:
    return {"method": "mtp", "num_speculative_tokens": k}


def _proposals(llm) -> list:
    """Every proposal rank 0's proposer makes (the guesses of each request, per step)."""
    seen, proposer = [], llm.engine.spec.proposer
    inner = proposer.propose

    def propose(reqs, budgets):
        out = inner(reqs, budgets)
        seen.append([list(g) for g in out])
        return out
    proposer.propose = propose
    return seen


# -O0 with the chain of one guess, -O2 (fused, pruned LM head) with two chained guesses;
# and whole experts per rank (--expert-parallel), the MTP layer's MoE placed like the main's
@pytest.mark.parametrize("opt,k,ep", [(0, 1, False), (2, 2, False),
                                      pytest.param(0, 2, True, marks=pytest.mark.slow)])
def test_greedy_tokens_and_acceptance_equal_one_rank(guessing, opt, k, ep):
    prompts = prompts_of([5, 13, 9], seed=3)
    one = guessing(opt, 1)
    plain = [o.token_ids for o in LLM(one, backend="reference").generate(prompts, PARAMS)]
    ref = LLM(one, backend="reference", speculative=_spec(k))
    want_guesses = _proposals(ref)
    assert [o.token_ids for o in ref.generate(prompts, PARAMS)] == plain
    want = ref.stats()
    two = guessing(opt, 2, ep)
    if ep:
        m = json.loads((two / "manifest.json").read_text())["mtp"]["parallel"]
        assert m["expert_parallel"] and any(s.get("experts") for s in m["shards"].values())
    with LLM(two, backend="reference", speculative=_spec(k)) as llm:
        guesses = _proposals(llm)
        got = [o.token_ids for o in llm.generate(prompts, PARAMS)]
        s = llm.stats()
        calls = llm.engine.spec.proposer.num_mtp_calls
    assert got == plain
    assert guesses == want_guesses              # the same guesses, step by step
    assert {key: s[key] for key in SPEC_KEYS} == {key: want[key] for key in SPEC_KEYS}
    assert 0 < s["spec_decode_num_accepted_tokens"] < s["spec_decode_num_draft_tokens"]
    assert calls == ref.engine.spec.proposer.num_mtp_calls > 0
    assert s["kv_blocks_free"] == s["kv_blocks_total"]


def test_gemma4_assistant_at_two_ranks(tmp_path_factory):
    """The assistant reads each rank's part of the target's KV cache: the plain tokens,
    and the same guesses (acceptance per position) as one rank."""
    import braze
    from braze.tiny_gemma4_assistant import has_gemma4_assistant, make_guessing_pair
    if not has_gemma4_assistant():
        pytest.skip("transformers has no Gemma4AssistantForCausalLM")
    d = tmp_path_factory.mktemp("g4tp")
    target, assistant = make_guessing_pair(d)
    arts = [d / "tp1", d / "tp2"]
    for tp, art in zip((1, 2), arts):
        braze.compile(target, art, mtp_assistant=assistant, opt_level=0, block_size=4,
                      tensor_parallel_size=tp, **LIMITS)
    m = json.loads((arts[1] / "manifest.json").read_text())["mtp"]
    assert m["kind"] == "gemma4_assistant" and len(m["ranks"]) == 2
    prompts = prompts_of([5, 13, 9], seed=3)
    plain = [o.token_ids for o in LLM(arts[0], backend="reference").generate(prompts, PARAMS)]
    ref = LLM(arts[0], backend="reference", speculative=_spec(2))
    want_guesses = _proposals(ref)
    ref.generate(prompts, PARAMS)
    want = ref.stats()
    with LLM(arts[1], backend="reference", speculative=_spec(2)) as llm:
        guesses = _proposals(llm)
        got = [o.token_ids for o in llm.generate(prompts, PARAMS)]
        s = llm.stats()
    assert got == plain
    assert guesses == want_guesses
    assert {key: s[key] for key in SPEC_KEYS} == {key: want[key] for key in SPEC_KEYS}
    assert s["spec_decode_num_accepted_tokens"] > 0


# the interpret backend runs the MTP graph's own launch plan (Triton kernels, the
# collectives as extern calls) on every rank, as the cuda backend does
@pytest.mark.slow
def test_mtp_launch_plan_at_two_ranks(guessing):
    prompts = prompts_of([6, 11], seed=4)
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    one = guessing(2, 1)
    plain = [o.token_ids for o in LLM(one, backend="reference").generate(prompts, params)]
    with LLM(guessing(2, 2), backend="interpret", speculative=_spec(2)) as llm:
        got = [o.token_ids for o in llm.generate(prompts, params)]
        assert llm.engine.spec.proposer.runs_on == "plan"
        assert llm.stats()["spec_decode_num_drafts"] > 0
    assert got == plain


def test_artifact_holds_per_rank_mtp_shards_and_inspect_shows_them(guessing):
    from braze.inspect import format_summary, summarize
    one, two = guessing(0, 1), guessing(0, 2)
    m = json.loads((two / "manifest.json").read_text())["mtp"]
    assert [len(r["files"]) for r in m["ranks"]] == [1, 1]
    whole = load_file(one / json.loads((one / "manifest.json").read_text())["mtp"]["files"][0])
    shards = m["parallel"]["shards"]
    split = [n for n, spec in shards.items() if "ranges" in spec]
    assert split and not set(m["shared"]) & set(shards)     # the main graph's slices
    for r in range(2):
        part = load_file(two / m["ranks"][r]["files"][0])
        for name in split:
            dim, (a, b) = shards[name]["dim"], shards[name]["ranges"][r]
            assert part[name].equal(whole[name].narrow(dim, a, b - a))
        assert part["tp.vocab_start"].tolist() == shards["tp.vocab_start"]["values"][r]
    text = format_summary(summarize(two))
    assert "mtp par    tensor-parallel over 2 ranks" in text
    ops = [ln for ln in (two / "mtp.bir").read_text().splitlines()
           if "= all_reduce(" in ln or "= all_gather(" in ln]
    assert len(ops) == len(m["parallel"]["collectives"]) > 0
    assert f"{len(ops)} collectives per MTP call" in text


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_a_broken_per_rank_mtp_shard_is_refused(guessing, tmp_path):
    from braze.runtime import open_artifact
    from braze.runtime.mtp_proposer import load_mtp
    src = guessing(0, 2)
    rank1 = json.loads((src / "manifest.json").read_text())["mtp"]["ranks"][1]["files"][0]
    # tampered bytes: the manifest's sha256
    a = _copy(src, tmp_path / "tampered")
    data = bytearray((a / rank1).read_bytes())
    data[-3] ^= 0xFF
    (a / rank1).write_bytes(bytes(data))
    with pytest.raises(BrazeError, match=f"{rank1} does not match its sha256"):
        open_artifact(a)
    # a missing file
    a = _copy(src, tmp_path / "missing")
    (a / rank1).unlink()
    with pytest.raises(BrazeError, match=f"missing {rank1}"):
        open_artifact(a)
    # a consistent manifest, but rank 1's shard lacks a weight: rank 0 refuses it before
    # any rank runs an MTP call
    a = _copy(src, tmp_path / "lacking")
    t = load_file(a / rank1)
    gone = sorted(k for k in t if "mlp.experts" in k)[0]
    del t[gone]
    save_file(t, a / rank1)
    man = json.loads((a / "manifest.json").read_text())
    man["files"][rank1] = sha256_file(a / rank1)
    (a / "manifest.json").write_text(json.dumps(man))
    (a / "signature.json").unlink(missing_ok=True)      # its manifest changed: unsigned
    art = open_artifact(a, trust_artifact=True)
    with pytest.raises(BrazeError, match=f"MTP weight {gone} of tensor-parallel rank 1 "
                                         f"is missing from {rank1}"):
        load_mtp(art, art.load_weights(rank=0), "cpu")
