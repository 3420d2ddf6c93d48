"""Speculative method `mtp` for Gemma 4: its assistant model (`Gemma4AssistantForCausalLM`)
compiled beside the target (`--mtp-assistant`) and run as the proposer
(runtime/assistant_proposer.py).

- the assistant graph's logits and projected state equal transformers'
  Gemma4AssistantForCausalLM fed the target's own hidden state and shared KV states
  (transformers' Gemma4ForCausalLM, same random weights, float32, 1e-4), before and past
  the sliding window, chained three guesses deep; the target's hidden-state output
  equals transformers' last hidden state;
- greedy output with mtp k=1 and k=2 equals greedy output without, token for token; with
  an assistant that guesses well, guesses are accepted and rejected, counted per position;
- seeded sampling gives the same tokens with and without mtp; the sampled distribution
  is the target's (chi-square, slow);
- aborts and preemption leak no KV block, batch row or proposer state;
- use_ordered_embeddings (the centroid-masked head) too: logits as transformers', greedy
  output kept;
- the refusals: a Gemma 4 artifact without an assistant, use_ordered_embeddings without
  its token_ordering, a target that is not Gemma 4, an assistant for another hidden
  size, tensor parallelism.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from braze.ir.contract import SeqChunk, build_step
from braze.ir.errors import BrazeError
from braze.runtime.engine import Engine
from braze.runtime.sampler import SamplingParams
from braze.tiny_gemma4_assistant import has_gemma4_assistant

from conftest import prompts_of, run_all, run_with_aborts

if not has_gemma4_assistant():
    pytest.skip("transformers has no Gemma4AssistantForCausalLM", allow_module_level=True)

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)
MTP = {"method": "mtp", "num_speculative_tokens": 2}


def _compile(target, out, assistant=None, **kw):
    import braze
    kw = {"opt_level": 0, "targets": "", "dtype": "float32", **kw}
    return braze.compile(target, out, mtp_assistant=assistant, **kw).root


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(target, random assistant, artifact with it)."""
    from braze.tiny_gemma4_assistant import make_pair
    d = tmp_path_factory.mktemp("g4a")
    target, assistant = make_pair(d)
    return target, assistant, _compile(target, d / "art", assistant)


@pytest.fixture(scope="module")
def ordered(pair, tmp_path_factory):
    """(target, assistant with use_ordered_embeddings: 16 clusters, top 4, artifact)."""
    from braze.tiny_gemma4_assistant import make_assistant
    d = tmp_path_factory.mktemp("g4o")
    assistant = make_assistant(pair[0], d / "assistant", use_ordered_embeddings=True,
                               num_centroids=16, centroid_intermediate_top_k=4)
    return pair[0], assistant, _compile(pair[0], d / "art", assistant)


@pytest.fixture(scope="module")
def guessing_pair(tmp_path_factory):
    """(target, assistant) where the assistant guesses well (braze/tiny_gemma4_assistant.py)."""
    from braze.tiny_gemma4_assistant import make_guessing_pair
    return make_guessing_pair(tmp_path_factory.mktemp("g4g"))


@pytest.fixture(scope="module")
def guessing(guessing_pair):
    target, assistant = guessing_pair
    return _compile(target, target.parent / "art", assistant, block_size=4)


# ------------------------------------------------------------------ the graph vs transformers

def _group_feeds(feeds, graph):
    """One block table for every KV cache group (the test's cache has one pool per layer)."""
    for v in graph.inputs:
        base, _, g = v.name.partition(".g")
        if g.isdigit():
            feeds[v.name] = feeds[base]
    return feeds


def _assistant_feeds(graph, hidden_name, tok, q, h, blocks):
    """One query row: token `tok` at position q, hidden state h [1, H], keys 0 .. q-1."""
    f = {"input_ids": torch.tensor([tok]), "positions": torch.tensor([q]),
         "slot_mapping": torch.tensor([-1]),
         "query_start_loc": torch.tensor([0, 1], dtype=torch.int32),
         "seq_lens": torch.tensor([q], dtype=torch.int32),
         "block_tables": torch.tensor([blocks], dtype=torch.int32),
         "logits_indices": torch.tensor([0]), hidden_name: h}
    return _group_feeds(f, graph)


@pytest.mark.parametrize("q", [5, 20])        # inside and past the sliding window (8)
@pytest.mark.parametrize("which", ["pair", "ordered"])
def test_assistant_equals_transformers(request, which, q):
    from transformers import AutoModelForCausalLM, Gemma4AssistantForCausalLM
    from braze.ir.interpreter import Interpreter
    from braze.runtime import Executor, open_artifact
    from braze.runtime.mtp_proposer import load_mtp
    target_dir, assistant_dir, art_dir = request.getfixturevalue(which)
    with contextlib.redirect_stderr(io.StringIO()):
        target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
        assistant = Gemma4AssistantForCausalLM.from_pretrained(
            assistant_dir, dtype=torch.float32).eval()
    ids = prompts_of([q + 1], seed=q)[0]
    with torch.no_grad():
        ref = target(torch.tensor([ids[:q]]), return_shared_kv_states=True,
                     output_hidden_states=True, use_cache=False)
    art = open_artifact(art_dir)
    ex = Executor(art, num_blocks=4)
    blocks = [1, 2]
    feeds = _group_feeds(build_step([SeqChunk(ids[:q], 0, blocks)], ex.block_size), ex.graph)
    out = ex.interpreter.run({**feeds, **ex.cache.tensors}, ex.params)
    torch.testing.assert_close(out["hidden_states"], ref.hidden_states[-1][0],
                               atol=1e-4, rtol=1e-4)
    graph, params, hidden_name = load_mtp(art, ex.params, "cpu")
    assert params["model.embed_tokens.weight"] is ex.params["model.embed_tokens.weight"]
    interp = Interpreter(graph)
    tok, h = ids[q], ref.hidden_states[-1][:, q - 1:q]          # the given hidden state
    for _ in range(3):                                           # three chained guesses
        with torch.no_grad():
            e = target.model.embed_tokens(torch.tensor([[tok]]))
            want = assistant(inputs_embeds=torch.cat((e, h), -1), position_ids=torch.tensor([[q]]),
                             attention_mask=torch.ones(1, q, dtype=torch.long),
                             shared_kv_states=ref.shared_kv_states, use_cache=False)
        f = _assistant_feeds(graph, hidden_name, tok, q, h[0], blocks)
        got = interp.run({**f, **ex.cache.tensors}, params)
        torch.testing.assert_close(got["logits"], want.logits[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got["hidden_states"], want.last_hidden_state[0],
                                   atol=1e-4, rtol=1e-4)
        tok, h = int(want.logits[0, -1].argmax()), want.last_hidden_state


def test_manifest_widens_the_window_group_for_the_assistant(pair):
    m = json.loads((pair[2] / "manifest.json").read_text())
    assert m["mtp"]["kind"] == "gemma4_assistant" and m["mtp"]["shared"] == [
        "model.embed_tokens.weight"]
    windows = sorted(g["window"] for g in m["kv_groups"])
    assert windows == [0, 9]             # the target's window 8, plus the key the assistant sees


# ------------------------------------------------------------------ exactness

@pytest.mark.parametrize("which,k", [("pair", 1), ("pair", 2), ("guessing", 1),
                                     ("guessing", 2)])
def test_greedy_output_identical_with_mtp(request, which, k):
    art = request.getfixturevalue(which)
    art = art[2] if which == "pair" else art
    prompts = prompts_of([5, 13, 30], seed=3)
    base = run_all(Engine(art, backend="reference"), prompts, GREEDY)
    eng = Engine(art, backend="reference",
                 speculative={"method": "mtp", "num_speculative_tokens": k})
    got = run_all(eng, prompts, GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in base]
    s = eng.stats()
    assert s["spec_decode_method"] == "mtp" and s["spec_decode_num_drafts"] > 0
    assert s["kv_blocks_free"] == s["kv_blocks_total"] and s["num_running"] == 0
    assert not eng.spec.proposer.rows
    if which == "guessing":
        acc, prop = s["spec_decode_accepted_per_position"], s["spec_decode_proposed_per_position"]
        assert 0 < sum(acc) == s["spec_decode_num_accepted_tokens"] < sum(prop)   # both
        assert s["steps"] < sum(len(o.token_ids) for o in got)


@pytest.mark.slow      # an -O2 compile; at interpret about 90 s
@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_optimised_target_gives_the_assistant_the_same_hidden_states(guessing_pair, guessing,
                                                                     tmp_path, backend):
    """-O2 (at `interpret`, through the Triton kernels' launch plan, whose static buffers
    hold the hidden-state output the assistant reads): output equal to plain greedy, and
    the same guesses accepted as at -O0 with the reference backend."""
    target, assistant = guessing_pair
    art = _compile(target, tmp_path / "a", assistant, opt_level=2, max_num_seqs=8,
                   max_logits_rows=32, max_num_tokens=64)
    prompts = prompts_of([5, 13, 30], seed=3)
    runs = []
    for a, be in ((guessing, "reference"), (art, backend)):
        eng = Engine(a, backend=be, cudagraph_mode="none", speculative=MTP)
        out = run_all(eng, prompts, GREEDY)
        s = eng.stats()
        runs.append(([o.token_ids for o in out], s["spec_decode_accepted_per_position"],
                     s["spec_decode_proposed_per_position"]))
    base = run_all(Engine(art, backend=backend, cudagraph_mode="none"), prompts, GREEDY)
    assert runs[0] == runs[1] and runs[1][0] == [o.token_ids for o in base]
    assert sum(runs[1][1]) > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["none", "piecewise"])
def test_cuda_backend_with_the_assistant_equals_plain(guessing_pair, tmp_path, mode):
    """On a GPU, -O2 float16 through the kernels and (piecewise) CUDA graphs: the target's
    hidden-state output is a captured static buffer; greedy output with mtp equals plain
    greedy and the well-guessing assistant's guesses are accepted."""
    target, assistant = guessing_pair
    art = _compile(target, tmp_path / "a", assistant, opt_level=2, dtype="float16",
                   targets="sm_80,sm_90", max_num_seqs=8, max_logits_rows=32,
                   max_num_tokens=128)
    prompts = prompts_of([6, 11, 17], seed=8)
    base = run_all(Engine(art, backend="cuda", cudagraph_mode=mode), prompts, GREEDY)
    eng = Engine(art, backend="cuda", cudagraph_mode=mode,
                 speculative={"method": "mtp", "num_speculative_tokens": 3})
    got = run_all(eng, prompts, GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in base]
    assert eng.stats()["spec_decode_num_accepted_tokens"] > 0


def test_ordered_embeddings_assistant_keeps_greedy_output(ordered):
    """use_ordered_embeddings (the centroid-masked head): guesses come only from the top
    clusters, and the output stays plain greedy's."""
    prompts = prompts_of([5, 13], seed=3)
    base = run_all(Engine(ordered[2], backend="reference"), prompts, GREEDY)
    eng = Engine(ordered[2], backend="reference", speculative=MTP)
    assert [o.token_ids for o in run_all(eng, prompts, GREEDY)] == [o.token_ids for o in base]
    assert eng.stats()["spec_decode_num_drafts"] > 0


def test_seeded_sampling_identical_with_mtp(guessing):
    prompts = prompts_of([7, 12], seed=5)
    params = [SamplingParams(max_tokens=10, temperature=0.9, top_k=20, seed=s, ignore_eos=True)
              for s in (1, 2)]
    base = run_all(Engine(guessing, backend="reference"), prompts, params)
    eng = Engine(guessing, backend="reference", speculative=MTP)
    got = run_all(eng, prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in base]
    assert eng.stats()["spec_decode_num_accepted_tokens"] > 0


# ------------------------------------------------------------------ bookkeeping

@pytest.mark.parametrize("k", [1, 3])
def test_every_guess_equals_one_computed_from_scratch(guessing, k):
    """Each proposal's first guess (its logits) equals the one computed from scratch: the
    target over the whole sequence on a fresh cache, then the assistant at its last
    position. A wrong hidden-state row after a partly accepted step, keys of rejected
    guesses, or window blocks released one position too early (the assistant sees W + 1
    keys; window freeing is on, the prompt longer than the window, blocks of 4 tokens)
    would change it."""
    from braze.ir.interpreter import Interpreter
    from braze.runtime import Executor, open_artifact
    from braze.runtime.mtp_proposer import load_mtp
    eng = Engine(guessing, backend="reference", num_kv_blocks=32,
                 speculative={"method": "mtp", "num_speculative_tokens": k})
    assert eng.runner.window_freeing
    prop = eng.spec.proposer
    eng.add_request("r", prompts_of([21], seed=11)[0],
                    SamplingParams(max_tokens=24, ignore_eos=True))
    req = eng.requests["r"]
    seen, run, propose = [], prop._run, prop.propose

    def spy(tokens, positions, hidden, tables):
        logits, h = run(tokens, positions, hidden, tables)
        if first:                                   # not a chained guess
            seen.append((list(req.all_token_ids), logits[0].clone()))
            first.clear()
        return logits, h

    def proposing(reqs, budgets):
        first.append(True)
        return propose(reqs, budgets)
    first = []
    prop._run, prop.propose = spy, proposing
    eng.run_to_completion(["r"])
    s = eng.stats()
    assert 0 < s["spec_decode_num_accepted_tokens"] < s["spec_decode_num_draft_tokens"]
    art = open_artifact(guessing)
    ex = Executor(art, num_blocks=16)
    graph, params, hidden_name = load_mtp(art, ex.params, "cpu")
    interp = Interpreter(graph)
    blocks = list(range(1, 13))         # block size 4: 48 positions
    for toks, logits in seen:
        q = len(toks) - 1
        feeds = _group_feeds(build_step([SeqChunk(toks[:q], 0, blocks)], ex.block_size),
                             ex.graph)
        h = ex.interpreter.run({**feeds, **ex.cache.tensors}, ex.params)["hidden_states"]
        f = _assistant_feeds(graph, hidden_name, toks[q], q, h[q - 1:q], blocks)
        want = interp.run({**f, **ex.cache.tensors}, params)["logits"][0]
        torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)
    assert len(seen) >= 6


@pytest.mark.parametrize("blocks,aborts", [(64, {1: 3}), (9, {0: 2, 2: 5})])
def test_aborts_and_preemption_leak_nothing(guessing, blocks, aborts):
    """A cache small enough to preempt, chunked prefill, prefix-shared prompts, aborts, a
    request that does not speculate (logprobs) among those that do: requests not aborted
    get the plain engine's tokens; nothing leaks."""
    shared = prompts_of([16], seed=21)[0]
    prompts = [shared + p for p in prompts_of([4, 9, 3], seed=2)] + prompts_of([11], seed=4)
    params = [SamplingParams(max_tokens=n, ignore_eos=True, logprobs=1 if n == 12 else None)
              for n in (14, 9, 16, 12)]
    plain = run_all(Engine(guessing, backend="reference", num_kv_blocks=64), prompts, params)
    eng = Engine(guessing, backend="reference", num_kv_blocks=blocks, max_num_tokens=24,
                 max_num_seqs=4, speculative={"method": "mtp", "num_speculative_tokens": 3})
    run_with_aborts(eng, prompts, params, aborts, plain)
    s = eng.stats()
    assert s["kv_blocks_free"] == s["kv_blocks_total"] and s["num_running"] == 0
    assert eng.runner.batch.num_free_rows == eng.runner.max_num_seqs
    assert not eng.spec.proposer.rows
    assert s["spec_decode_num_accepted_tokens"] > 0
    assert (s["preemptions"] > 0) == (blocks == 9)       # the small cache did preempt


# ------------------------------------------------------------------ refusals

def test_gemma4_without_assistant_is_refused(pair, tmp_path):
    art = _compile(pair[0], tmp_path / "plain")
    with pytest.raises(BrazeError, match="Gemma4AssistantForCausalLM.*--mtp-assistant"):
        Engine(art, backend="reference", speculative=MTP)


def _edited_assistant(src, dst, **changes):
    import shutil
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_unsupported_assistants_are_refused_in_one_line(pair, tmp_path):
    from braze.tiny import make_checkpoint
    target, assistant, _ = pair
    cases = [
        (_edited_assistant(assistant, tmp_path / "ordered", use_ordered_embeddings=True,
                           num_centroids=16, centroid_intermediate_top_k=4),
         target, {}, "has no masked_embedding.token_ordering"),
        (_edited_assistant(assistant, tmp_path / "uneven", use_ordered_embeddings=True,
                           num_centroids=24, centroid_intermediate_top_k=4),
         target, {}, "num_centroids=24 must divide vocab_size=256"),
        (_edited_assistant(assistant, tmp_path / "wide", backbone_hidden_size=96),
         target, {}, "backbone_hidden_size=96 but the target's hidden_size is 64"),
        (target, target, {}, "model_type is 'gemma4_text', not 'gemma4_assistant'"),
    ]
    with contextlib.redirect_stderr(io.StringIO()):
        llama = make_checkpoint("llama", tmp_path / "llama", with_tokenizer=False)
    cases.append((assistant, llama, {}, "--mtp-assistant is for Gemma 4 targets"))
    for i, (a, t, kw, msg) in enumerate(cases):
        with pytest.raises(BrazeError, match=msg) as e:
            _compile(t, tmp_path / f"a{i}", a, **kw)
        assert "\n" not in str(e.value)


@pytest.mark.slow
def test_cli_compile_with_assistant_and_generate_with_mtp(pair, tmp_path):
    from cli_helpers import assert_one_line_error, run
    target, assistant, _ = pair
    art = tmp_path / "a"
    code, _, err = run("compile", target, "-o", art, "--opt-level", "0", "--targets", "",
                       "--dtype", "float32", "-q", "--mtp-assistant", assistant)
    assert code == 0, err
    common = ["generate", art, "--prompt-ids", "1,5,9,33,7,2", "--max-tokens", "8",
              "--backend", "reference", "--json", "--ignore-eos", "--num-kv-blocks", "16"]
    code, plain, err = run(*common)
    assert code == 0, err
    code, spec, err = run(*common, "--speculative", json.dumps(MTP))
    assert code == 0, err
    assert json.loads(spec)["token_ids"] == json.loads(plain)["token_ids"]
    code, out, err = run("inspect", art)
    assert code == 0 and "Gemma 4 assistant model" in out and "window 9" in out, err
    code, _, err = run("compile", target, "-o", tmp_path / "b", "--targets", "", "-q",
                       "--mtp-assistant", tmp_path / "nowhere")
    assert_one_line_error(code, err, "nowhere has no config.json")


# ------------------------------------------------------------------ distribution

CHI2_LIMIT = 45.0   # df <= 15: P(chi2 > 45) < 1e-4 for a correct sampler


@pytest.mark.slow
def test_sampled_distribution_is_the_targets(tmp_path):
    """With a 16-token vocabulary, the second and third generated tokens' frequencies over
    800 seeds match their exact marginals under transformers' target (sum over x0 of
    p(x0) p(x1 | x0), and over (x0, x1) of p(x0) p(x1 | x0) p(x2 | x0, x1): chi-square),
    while guesses were both accepted and rejected."""
    from transformers import AutoModelForCausalLM
    from braze.tiny_gemma4_assistant import make_guessing_pair
    target, assistant = make_guessing_pair(tmp_path, vocab_size=16, vocab_size_per_layer_input=16,
                                           with_tokenizer=False)
    art = _compile(target, tmp_path / "art", assistant)
    prompt = [1, 5, 6, 7, 5, 6]
    n = 800
    eng = Engine(art, backend="reference", num_kv_blocks=256, max_num_seqs=128, speculative=MTP)
    params = [SamplingParams(max_tokens=3, ignore_eos=True, temperature=1.0, seed=s)
              for s in range(n)]
    got = run_all(eng, [prompt] * n, params)
    s = eng.stats()
    assert 0 < s["spec_decode_num_accepted_tokens"] < s["spec_decode_num_draft_tokens"]
    with contextlib.redirect_stderr(io.StringIO()):
        model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    with torch.no_grad():
        p0 = torch.softmax(model(torch.tensor([prompt])).logits[0, -1].double(), -1)
        seq1 = torch.cat([torch.tensor([prompt] * 16), torch.arange(16)[:, None]], 1)
        p1 = torch.softmax(model(seq1).logits[:, -1].double(), -1)            # [x0, x1]
        seq2 = torch.cat([seq1.repeat_interleave(16, 0), torch.arange(16).repeat(16)[:, None]], 1)
        p2 = torch.softmax(model(seq2).logits[:, -1].double(), -1).view(16, 16, 16)
    for i, marginal in ((1, torch.einsum("a,ab->b", p0, p1)),
                        (2, torch.einsum("a,ab,abc->c", p0, p1, p2))):
        counts = torch.bincount(torch.tensor([o.token_ids[i] for o in got]), minlength=16)
        exp = marginal * n
        chi2 = float(((counts.double() - exp) ** 2 / exp).sum())
        assert chi2 < CHI2_LIMIT, f"token {i}: chi2 {chi2:.1f}"
        uniform = torch.full((16,), n / 16.0, dtype=torch.float64)
        assert float(((counts - uniform) ** 2 / uniform).sum()) > CHI2_LIMIT   # it can tell
