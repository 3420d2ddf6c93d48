"""Speculative method `mtp`: DeepSeek-V3's next-n layer compiled as the artifact's second
graph (braze/compile_mtp.py) and run as the proposer (runtime/mtp_proposer.py).

- the MTP graph's logits and hidden states equal a reference built from the published
  formula (DeepSeek-V3 report, section 2.2: concat(enorm(emb), hnorm(h)) -> eh_proj ->
  decoder layer -> shared_head norm -> LM head) with transformers' own DeepSeek-V3
  decoder layer for the layer itself, same random weights, float32, 1e-4; over a prompt
  computed in two chunks (the MTP's own latent cache);
- greedy output with mtp equals greedy output without, token for token, k = 1 and 3, at
  -O0 and -O2; seeded sampling too;
- with an MTP layer that guesses well (built below), guesses are accepted and counted per
  position, and rejections are rolled back: the MTP's proposal after each step equals
  the one computed from scratch on a fresh cache (stale KV of rejected tokens or of the
  layer's own chained hidden states would change it);
- the errors: an artifact without an MTP graph, a Gemma 4 artifact without its assistant.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file

from braze.ir.contract import SeqChunk, build_step
from braze.ir.errors import BrazeError
from braze.runtime.engine import Engine
from braze.runtime.sampler import SamplingParams

from conftest import prompts_of, run_all, run_with_aborts
from braze.tiny_mtp import guessing_mtp_checkpoint, with_mtp_layer

GREEDY = SamplingParams(max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def dsm(tmp_path_factory):
    """(checkpoint with an MTP layer, {opt_level: artifact}, checkpoint without)."""
    import braze
    from braze.tiny import make_checkpoint
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("dsv3mtp")
    with contextlib.redirect_stderr(io.StringIO()):
        base = make_checkpoint("deepseek_v3", d / "base", seed=1)
    with_mtp_layer(base, d / "m")
    arts = {}
    for opt in (0, 2):
        arts[opt] = d / f"a{opt}"
        extra = {"max_num_seqs": 16, "max_logits_rows": 64} if opt == 2 else {}
        braze.compile(d / "m", arts[opt], opt_level=opt, targets="", dtype="float32", **extra)
    braze.compile(base, d / "plain", opt_level=0, targets="", dtype="float32")
    return d / "m", arts, d / "plain"


# ------------------------------------------------------------------ the graph vs torch

def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def reference_mtp(ckpt, tokens_next, positions, hidden):
    """The MTP layer from the formula, for one sequence from position 0 with no cache:
    transformers' DeepseekV3DecoderLayer (index num_hidden_layers, built with a config of
    one more layer so the checkpoint's layer-N tensors load into it) for the layer."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.from_pretrained(ckpt)
    n, eps = cfg.num_hidden_layers, cfg.rms_norm_eps
    cfg.num_hidden_layers = n + 1
    cfg._attn_implementation = "eager"
    with contextlib.redirect_stderr(io.StringIO()):
        hf = AutoModelForCausalLM.from_pretrained(ckpt, config=cfg, dtype=torch.float32).eval()
    w = load_file(ckpt / "model.safetensors")
    p = f"model.layers.{n}."
    ids = torch.tensor(tokens_next)[None]
    with torch.no_grad():
        e = _rms(hf.model.embed_tokens(ids), w[p + "enorm.weight"], eps)
        h = _rms(hidden[None], w[p + "hnorm.weight"], eps)
        x = torch.cat((e, h), -1) @ w[p + "eh_proj.weight"].T
        pos = torch.tensor(positions)[None]
        cos_sin = hf.model.rotary_emb(x, pos)
        T = x.shape[1]
        mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
        y = hf.model.layers[n](x, attention_mask=mask, position_ids=pos,
                               position_embeddings=cos_sin)
        y = y[0] if isinstance(y, tuple) else y
        logits = hf.lm_head(_rms(y, w[p + "shared_head.norm.weight"], eps))
    return logits[0], y[0]


@pytest.mark.parametrize("opt", [0, 2])
def test_mtp_graph_matches_the_published_formula(dsm, opt):
    from braze.ir.interpreter import Interpreter
    from braze.runtime import Executor, open_artifact
    from braze.runtime.kv_cache import KVCache
    from braze.runtime.mtp_proposer import load_mtp
    ckpt, arts, _ = dsm
    art = open_artifact(arts[opt])
    ex = Executor(art, num_blocks=4)
    graph, params, hidden_name = load_mtp(art, ex.params, "cpu")
    # shared, not copied: the very tensors of the main graph
    assert params["model.embed_tokens.weight"] is ex.params["model.embed_tokens.weight"]
    assert params["lm_head.weight"] is ex.params["lm_head.weight"]
    cache = KVCache(graph, 4)
    g = torch.Generator().manual_seed(3)
    n = 21
    tokens = torch.randint(0, 256, (n,), generator=g).tolist()
    hidden = torch.randn(n, 64, generator=g)
    interp = Interpreter(graph)
    logits, rows, ys = [], [], []
    for lo, hi in ((0, 13), (13, n)):          # two chunks: the second reads the first's KV
        feeds = build_step([SeqChunk(tokens[lo:hi], lo, [2, 0])], ex.block_size)
        feeds[hidden_name] = hidden[lo:hi]
        feeds.update(cache.tensors)
        out = interp.run(feeds, params)
        logits.append(out["logits"])
        # -O2 prunes the logits to the sampled rows (logits_indices: the chunk's last)
        pruned = out["logits"].shape[0] != hi - lo
        assert pruned == (opt == 2)
        rows += (feeds["logits_indices"] + lo).tolist() if pruned else list(range(lo, hi))
        ys.append(out["hidden_states"])
    want_logits, want_y = reference_mtp(ckpt, tokens, list(range(n)), hidden)
    torch.testing.assert_close(torch.cat(logits), want_logits[rows], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat(ys), want_y, atol=1e-4, rtol=1e-4)


def test_artifact_ships_the_mtp_graph_without_duplicate_weights(dsm):
    _, arts, _ = dsm
    m = json.loads((arts[0] / "manifest.json").read_text())["mtp"]
    assert m["graph"] == "mtp.bir" and m["shared"] == ["lm_head.weight",
                                                        "model.embed_tokens.weight"]
    own = {}
    for f in m["files"]:
        own.update(load_file(arts[0] / f))
    assert not any(k.endswith(("embed_tokens.weight", "shared_head.head.weight", "lm_head.weight"))
                   for k in own)
    assert own["model.layers.2.mlp.gate.weight"].dtype == torch.float32
    graph = (arts[0] / "graph.bir").read_text()
    assert "hidden_states=" in graph.splitlines()[-2] or "hidden_states=" in graph


# ------------------------------------------------------------------ exactness

@pytest.mark.parametrize("opt,k", [(0, 1), (0, 3), (2, 2)])
def test_greedy_output_identical_with_mtp(dsm, opt, k):
    _, arts, _ = dsm
    prompts = prompts_of([5, 13, 30, 9], seed=3)
    base = run_all(Engine(arts[opt], backend="reference"), prompts, GREEDY)
    # vLLM's spelling without a count guesses once (the model's one next-n layer)
    spec = {"method": "mtp", "num_speculative_tokens": k} if k > 1 else {"method": "deepseek_mtp"}
    eng = Engine(arts[opt], backend="reference", speculative=spec)
    got = run_all(eng, prompts, GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in base]
    s = eng.stats()
    assert s["spec_decode_method"] == "mtp" and s["spec_decode_num_drafts"] > 0
    assert s["spec_decode_num_speculative_tokens"] == k
    assert s["kv_blocks_free"] == s["kv_blocks_total"] and s["num_running"] == 0
    assert not eng.spec.proposer.states           # finished requests leave no MTP state


def test_seeded_sampling_identical_with_mtp(dsm):
    _, arts, _ = dsm
    prompts = prompts_of([7, 12], seed=5)
    params = [SamplingParams(max_tokens=12, temperature=0.9, top_k=20, seed=s, ignore_eos=True)
              for s in (1, 2)]
    base = run_all(Engine(arts[0], backend="reference"), prompts, params)
    got = run_all(Engine(arts[0], backend="reference",
                         speculative={"method": "mtp", "num_speculative_tokens": 2}),
                  prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in base]


# ------------------------------------------------------------------ acceptance, rollback

@pytest.fixture(scope="module")
def guessing(dsm, tmp_path_factory):
    import braze
    d = tmp_path_factory.mktemp("guess")
    ckpt = guessing_mtp_checkpoint(dsm[0], d / "m", mix=0.03)
    braze.compile(ckpt, d / "a", opt_level=0, targets="", dtype="float32")
    return d / "a"


def test_acceptance_counted_per_position(guessing):
    prompts = prompts_of([6, 11, 17], seed=8)
    base = run_all(Engine(guessing, backend="reference"), prompts, GREEDY)
    eng = Engine(guessing, backend="reference",
                 speculative={"method": "mtp", "num_speculative_tokens": 3})
    got = run_all(eng, prompts, GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in base]
    s = eng.stats()
    acc, prop = s["spec_decode_accepted_per_position"], s["spec_decode_proposed_per_position"]
    assert sum(acc) == s["spec_decode_num_accepted_tokens"] > 0
    assert sum(prop) == s["spec_decode_num_draft_tokens"]
    assert s["spec_decode_num_accepted_tokens"] < s["spec_decode_num_draft_tokens"]  # rejections
    assert all(a <= p for a, p in zip(acc, prop)) and acc[0] >= acc[-1]
    # fewer steps than tokens: accepted guesses came out several per step
    assert s["steps"] < sum(len(o.token_ids) for o in got)
    assert s["kv_blocks_free"] == s["kv_blocks_total"]


def test_rejected_guesses_are_rolled_back_in_the_mtp_cache(guessing):
    """Before every step, the MTP's first guess (its logits) equals the one computed from
    scratch: the main graph's hidden states of the whole sequence, then the MTP layer
    over it on a fresh cache. KV left from rejected tokens, or from the chained guesses
    (written from the layer's own hidden state), would make them differ."""
    from braze.ir.interpreter import Interpreter
    from braze.runtime import Executor, open_artifact
    from braze.runtime.kv_cache import KVCache
    from braze.runtime.mtp_proposer import load_mtp
    eng = Engine(guessing, backend="reference",
                 speculative={"method": "mtp", "num_speculative_tokens": 3})
    prop = eng.spec.proposer
    eng.add_request("r", prompts_of([9], seed=11)[0],
                    SamplingParams(max_tokens=20, ignore_eos=True))
    req = eng.requests["r"]
    seen, run = [], prop._run

    def spy(tokens, positions, hidden, seqs):
        logits, h = run(tokens, positions, hidden, seqs)
        if positions[-1] == len(req.all_token_ids) - 2:      # the catch-up call
            seen.append((list(req.all_token_ids), logits[0].clone()))
        return logits, h
    prop._run = spy
    eng.run_to_completion(["r"])
    art = open_artifact(guessing)
    ex = Executor(art, num_blocks=8)
    graph, params, hidden_name = load_mtp(art, ex.params, "cpu")
    interp = Interpreter(graph)
    blocks = [0, 1, 2, 3]
    for toks, logits in seen:
        L = len(toks)
        feeds = build_step([SeqChunk(toks[:L - 1], 0, blocks)], ex.block_size)
        h = ex.interpreter.run({**feeds, **ex.cache.tensors}, ex.params)["hidden_states"]
        mf = build_step([SeqChunk(toks[1:L], 0, blocks)], ex.block_size)
        mf[hidden_name] = h
        mf.update(KVCache(graph, 8).tensors)
        want = interp.run(mf, params)["logits"][-1]
        torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)
    assert len(seen) >= 4
    s = eng.stats()
    assert 0 < s["spec_decode_num_accepted_tokens"] < s["spec_decode_num_draft_tokens"]


# ------------------------------------------------------------------ errors

def test_artifact_without_mtp_graph_is_a_clear_error(dsm):
    _, _, plain = dsm
    with pytest.raises(BrazeError, match="multi-token-prediction graph.*num_nextn_predict_layers"):
        Engine(plain, backend="reference",
               speculative={"method": "mtp", "num_speculative_tokens": 1})


def test_gemma4_without_its_assistant_is_refused_clearly():
    """A Gemma 4 artifact compiled without --mtp-assistant: the error says how to compile
    one with it (tests/test_gemma4_assistant.py covers the assistant itself)."""
    from types import SimpleNamespace
    from braze.runtime.mtp_proposer import load_mtp
    art = SimpleNamespace(manifest={"model": {"family": "gemma4"}}, root="g4",
                          model={"family": "gemma4"})
    with pytest.raises(BrazeError, match="Gemma4AssistantForCausalLM.*g4 has none.*"
                                         "--mtp-assistant ASSISTANT_DIR"):
        load_mtp(art, {}, "cpu")


def test_kernel_plan_gives_the_mtp_the_same_hidden_states(dsm, tmp_path):
    """-O2 through the Triton kernels (interpret backend): the main graph's hidden-state
    output the MTP reads comes from the launch plan's static buffers; the guesses, their
    acceptance and the output equal the reference backend's."""
    import braze
    ckpt = guessing_mtp_checkpoint(dsm[0], tmp_path / "m", mix=0.03)
    art = tmp_path / "a"
    braze.compile(ckpt, art, opt_level=2, targets="", dtype="float32", max_num_seqs=4,
                  max_logits_rows=16, max_num_tokens=64)
    spec = {"method": "mtp", "num_speculative_tokens": 2}
    prompts = prompts_of([6, 11], seed=8)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    runs = []
    for backend in ("reference", "interpret"):
        eng = Engine(art, backend=backend, cudagraph_mode="none", speculative=spec)
        out = run_all(eng, prompts, params)
        s = eng.stats()
        runs.append(([o.token_ids for o in out], s["spec_decode_accepted_per_position"],
                     s["spec_decode_proposed_per_position"]))
    assert runs[0] == runs[1] and sum(runs[0][1]) > 0


@settings(max_examples=5, deadline=None)
@given(data=st.data())
def test_mixed_requests_chunks_prefix_cache_aborts_and_preemption(guessing, data):
    """MTP-speculating and plain requests (logprobs make one plain), prompts sharing a
    prefix (prefix-cache hits), chunked prefill, random aborts and a cache small enough
    to preempt: every request not aborted gets the plain engine's tokens; no KV block,
    batch row or MTP state leaks."""
    n = data.draw(st.integers(2, 5), label="requests")
    shared = prompts_of([16], seed=21)[0]
    prompts = [(shared if data.draw(st.booleans(), label="shared prefix") else [])
               + prompts_of([data.draw(st.integers(3, 20), label="len")], seed=s)[0]
               for s in range(n)]
    params = [SamplingParams(max_tokens=data.draw(st.integers(3, 20), label="max_tokens"),
                             ignore_eos=True,
                             logprobs=1 if data.draw(st.integers(0, 3), label="plain") == 0
                             else None)
              for _ in range(n)]
    aborts = {i: data.draw(st.integers(1, 6), label="abort after") for i in range(n)
              if data.draw(st.integers(0, 3), label="abort?") == 0}
    blocks = data.draw(st.sampled_from([6, 9, 64]), label="num_kv_blocks")
    k = data.draw(st.integers(1, 3), label="k")
    plain = run_all(Engine(guessing, backend="reference", num_kv_blocks=64), prompts, params)
    eng = Engine(guessing, backend="reference", num_kv_blocks=blocks, max_num_tokens=24,
                 max_num_seqs=4,
                 speculative={"method": "mtp", "num_speculative_tokens": k})
    run_with_aborts(eng, prompts, params, aborts, plain)
    s = eng.stats()
    assert s["kv_blocks_free"] == s["kv_blocks_total"] and s["num_running"] == 0
    assert eng.runner.batch.num_free_rows == eng.runner.max_num_seqs
    assert not eng.spec.proposer.states


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["none", "piecewise"])
def test_cuda_backend_mtp_equals_plain(dsm, tmp_path, mode):
    """On a GPU, -O2 float16 through the kernels and (piecewise) CUDA graphs: the main
    graph's hidden-state output the MTP reads is a captured static buffer; greedy output
    with mtp equals plain greedy, and the aligned MTP layer's guesses are accepted."""
    import braze
    ckpt = guessing_mtp_checkpoint(dsm[0], tmp_path / "m", mix=0.03)
    art = tmp_path / "a"
    braze.compile(ckpt, art, opt_level=2, dtype="float16", max_num_seqs=8,
                  max_logits_rows=32, max_num_tokens=128)
    prompts = prompts_of([6, 11, 17], seed=8)
    base = run_all(Engine(art, backend="cuda", cudagraph_mode=mode), prompts, GREEDY)
    eng = Engine(art, backend="cuda", cudagraph_mode=mode,
                 speculative={"method": "mtp", "num_speculative_tokens": 3})
    got = run_all(eng, prompts, GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in base]
    assert eng.stats()["spec_decode_num_accepted_tokens"] > 0


def test_incomplete_mtp_layer_compiles_the_model_and_says_why_mtp_is_refused(dsm, tmp_path):
    import shutil
    import braze
    ckpt = tmp_path / "m"
    shutil.copytree(dsm[0], ckpt)
    w = load_file(ckpt / "model.safetensors")
    del w["model.layers.2.eh_proj.weight"]
    from safetensors.torch import save_file
    save_file(w, ckpt / "model.safetensors", metadata={"format": "pt"})
    logs = []
    braze.compile(ckpt, tmp_path / "a", opt_level=0, targets="", dtype="float32",
                  log=logs.append)
    assert any("MTP layer 2" in ln and "eh_proj" in ln and "not compiled" in ln for ln in logs)
    assert "graph" not in json.loads((tmp_path / "a" / "manifest.json").read_text())["mtp"]
    out = run_all(Engine(tmp_path / "a", backend="reference"), prompts_of([5]), GREEDY)
    assert len(out[0].token_ids) == GREEDY.max_tokens
    with pytest.raises(BrazeError, match="has none"):
        Engine(tmp_path / "a", backend="reference",
               speculative={"method": "mtp", "num_speculative_tokens": 1})


def test_cli_generate_with_mtp_equals_plain(dsm):
    from cli_helpers import run
    _, arts, _ = dsm
    common = ["generate", arts[0], "--prompt-ids", "1,5,9,33,7,2", "--max-tokens", "10",
              "--backend", "reference", "--json", "--ignore-eos", "--num-kv-blocks", "16"]
    code, plain, err = run(*common)
    assert code == 0, err
    code, spec, err = run(*common, "--speculative",
                          '{"method": "mtp", "num_speculative_tokens": 2}')
    assert code == 0, err
    assert json.loads(spec)["token_ids"] == json.loads(plain)["token_ids"]
