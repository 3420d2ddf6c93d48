"""Multi-LoRA: the add-lora pass and lora op, PEFT adapters against transformers + peft,
adapters mixed in one batch, the slot pool, the prefix cache keyed by adapter, and the
errors a user can cause."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

from braze.ir import get_op
from braze.ir.errors import BrazeError
from braze.runtime.engine import Engine
from braze.runtime.llm import LLM
from braze.runtime.lora import LoRAError, LoRARequest
from braze.runtime.sampler import SamplingParams

from conftest import prompts_of
from lora_helpers import make_adapter, peft_greedy, peft_model, write_adapter

PROMPT = [1, 17, 93, 4, 250, 66, 7, 31, 128, 9]
LORA = dict(lora_slots=2, max_lora_rank=8)
GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def adapters(store, tmp_path_factory):
    """Two peft adapters on the tiny llama: every target at rank 4, and q/v only at rank 2
    with rsLoRA; a third (rank 8, gate/up/down) for the pool tests."""
    ck = store.checkpoint("llama")
    d = tmp_path_factory.mktemp("adapters")
    return {"a": make_adapter(ck, d / "a", seed=11, r=4, alpha=8, scale=3.0),
            "b": make_adapter(ck, d / "b", seed=12, r=2, alpha=4, targets=["q_proj", "v_proj"],
                              rslora=True, scale=3.0),
            "c": make_adapter(ck, d / "c", seed=13, r=8, alpha=8,
                              targets=["gate_proj", "up_proj", "down_proj"], scale=3.0)}


@pytest.fixture(scope="module")
def expected(store, adapters):
    ck = store.checkpoint("llama")
    out = {name: peft_greedy(ck, path, PROMPT, GREEDY.max_tokens) for name, path in adapters.items()}
    out[None] = peft_greedy(ck, None, PROMPT, GREEDY.max_tokens)
    return out


def req(name, adapters, i=1):
    return None if name is None else LoRARequest(name, i, str(adapters[name]))


# -- the op -----------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.lists(st.integers(1, 5), min_size=1, max_size=3),
       st.lists(st.integers(-1, 2), min_size=1, max_size=6), st.integers(1, 3))
def test_lora_op_is_shrink_then_expand_per_token(K, sizes, slots, R):
    """The reference against the definition written per token and per part."""
    g = torch.Generator().manual_seed(0)
    H, n, T = 6, len(sizes), len(slots)
    slots = torch.tensor([s if s < K else -1 for s in slots], dtype=torch.int32)
    x = torch.randn(T, H, generator=g)
    a = torch.randn(K, n * R, H, generator=g)
    b = torch.randn(K, sum(sizes), R, generator=g)
    got = get_op("lora").impl(x, a, b, slots, sizes=sizes)
    want = torch.zeros(T, sum(sizes))
    for t in range(T):
        s = int(slots[t])
        if s < 0:
            continue
        off = 0
        for j, o in enumerate(sizes):
            want[t, off:off + o] = b[s, off:off + o] @ (a[s, j * R:(j + 1) * R] @ x[t])
            off += o
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# -- compile ----------------------------------------------------------------------------

def test_no_lora_slots_changes_nothing(store):
    plain = json.loads((store.artifact("llama", opt_level=2) / "manifest.json").read_text())
    assert "lora" not in plain
    assert "lora" not in plain["compile"]["ops_after"]
    assert "add-lora" not in [p["name"] for p in plain["compile"]["passes"]]


@pytest.mark.parametrize("opt_level", [0, 2])
def test_compile_records_the_lora_contract(store, opt_level):
    art = store.artifact("llama", opt_level=opt_level, **LORA)
    m = json.loads((art / "manifest.json").read_text())
    lora = m["lora"]
    assert lora["slots"] == 2 and lora["max_rank"] == 8
    layers = m["model"]["num_layers"]
    per_layer = 7 if opt_level == 0 else 4       # -O2: merged qkv and gate_up, one delta each
    assert m["compile"]["ops_after"]["lora"] == layers * per_layer
    assert "lora" not in m["compile"]["extern_ops"]          # shrink/expand kernels
    from braze.inspect import format_summary, summarize
    text = format_summary(summarize(art))
    assert f"lora       2 adapter slots, max rank 8, targets q_proj,k_proj,v_proj,o_proj," \
           f"gate_proj,up_proj,down_proj, {per_layer * layers} linears with a delta" in text
    assert f"+ {2 * per_layer * layers} LoRA adapter pools" in text
    if opt_level == 2:
        qkv = lora["modules"]["model.layers.0.self_attn.qkv_proj"]
        assert [p[0] for p in qkv["parts"]] == [f"model.layers.0.self_attn.{n}_proj"
                                                for n in "qkv"]
        text = (art / "graph.bir").read_text()
        assert "%lora_slots: i32[T]" in text
        assert "%lora_a.model.layers.0.self_attn.qkv_proj: f32[2, 24, 64]" in text
        assert "%lora_b.model.layers.0.self_attn.qkv_proj: f32[2, 128, 8]" in text


def test_lora_targets_are_checked(store, tmp_path):
    import braze
    with pytest.raises(BrazeError, match="--lora-targets entry 'qq'"):
        braze.compile(store.checkpoint("llama"), tmp_path / "x", lora_slots=2, lora_targets="q,qq")


# -- against transformers + peft --------------------------------------------------------

@pytest.mark.parametrize("opt_level", [0, 2])
def test_mixed_batch_matches_peft(store, adapters, expected, opt_level):
    """Base, adapter a and adapter b in one batch: each gets peft's greedy tokens (and so
    its solo output), and the adapters do move the tokens."""
    llm = LLM(store.artifact("llama", opt_level=opt_level, **LORA), backend="reference",
              num_kv_blocks=32, max_num_seqs=4)
    names = [None, "a", "b", "a"]
    outs = llm.generate([PROMPT] * 4, GREEDY, lora_request=[req(n, adapters) for n in names])
    assert [o.token_ids for o in outs] == [expected[n] for n in names]
    assert expected["a"] != expected[None] and expected["b"] != expected[None]
    for n in ("a", "b"):       # solo, in a fresh engine
        solo = LLM(store.artifact("llama", opt_level=opt_level, **LORA), backend="reference",
                   num_kv_blocks=32, max_num_seqs=4)
        assert solo.generate(PROMPT, GREEDY, lora_request=req(n, adapters))[0].token_ids == expected[n]


def test_interpreted_kernels_match_peft(store, adapters, expected):
    """-O2 through the launch plans under the Triton interpreter, static buffers bound."""
    art = store.artifact("llama", opt_level=2, max_num_tokens=16, max_num_seqs=2, **LORA)
    llm = LLM(art, backend="interpret", num_kv_blocks=8, max_num_seqs=2, buckets=[2, 16])
    outs = llm.generate([PROMPT, PROMPT], SamplingParams(max_tokens=3, ignore_eos=True),
                        lora_request=[req("a", adapters), None])
    assert [o.token_ids for o in outs] == [expected["a"][:3], expected[None][:3]]
    assert not any("lora" in f for f in llm.engine.runner.graphs.stats["extern_fallbacks"])


# -- the slot pool and the prefix cache ---------------------------------------------------

def test_more_adapters_than_slots_wait_and_evict(store, adapters, expected):
    """Three adapters, two slots: the third waits for a slot, the least recently used
    unpinned adapter is evicted, and every request still gets its own output."""
    eng = Engine(store.artifact("llama", opt_level=0, **LORA), backend="reference",
                 num_kv_blocks=32, max_num_seqs=4)
    names = ["a", "b", "c", None]
    for i, n in enumerate(names):
        eng.add_request(f"r{i}", PROMPT, GREEDY, lora_request=req(n, adapters))
    eng.step()
    assert len(eng.lora.in_use()) == 2 and eng.num_waiting() == 1     # c waits for a slot
    final = eng.run_to_completion()
    assert [final[f"r{i}"].token_ids for i in range(4)] == [expected[n] for n in names]
    assert eng.lora.stats["lora_evictions"] >= 1 and eng.lora.in_use() == {}


def test_pool_never_evicts_an_adapter_in_use(store, adapters):
    eng = Engine(store.artifact("llama", opt_level=0, **LORA), backend="reference",
                 num_kv_blocks=8, max_num_seqs=4)
    m = eng.lora
    keys = {n: m.add(req(n, adapters)) for n in "abc"}
    sa, sb = m.acquire(keys["a"]), m.acquire(keys["b"])
    assert m.acquire(keys["c"]) is None                 # both slots pinned
    m.release(sb)
    assert m.acquire(keys["c"]) == sb                   # b (unpinned) made room, a stayed
    assert m.slot_of(keys["a"]) == sa and m.slot_of(keys["b"]) is None
    pools = eng.runner.executor.lora_pools
    assert pools["lora_a.model.layers.0.mlp.gate_proj"][sb].abs().sum() > 0     # c's
    assert pools["lora_a.model.layers.0.self_attn.q_proj"][sb].abs().sum() == 0  # not b's any more


def test_prefix_cache_is_keyed_by_adapter(store, adapters, expected):
    """The same 40-token prompt under a, then b, then a again: b never reuses a's blocks
    (and still gets its own output); a's second run does."""
    eng = Engine(store.artifact("llama", opt_level=0, **LORA), backend="reference",
                 num_kv_blocks=32, max_num_seqs=4)
    prompt = prompts_of([40], seed=3)[0]
    sp = SamplingParams(max_tokens=3, ignore_eos=True)
    outs = []
    for i, n in enumerate(["a", "b", "a", None]):
        before = eng.stats()["prefix_cache_hit_tokens"]
        eng.add_request(f"p{i}", prompt, sp, lora_request=req(n, adapters))
        outs.append((eng.run_to_completion([f"p{i}"])[f"p{i}"].token_ids,
                     eng.stats()["prefix_cache_hit_tokens"] - before))
    assert [hits for _, hits in outs] == [0, 0, 32, 0]
    ck = store.checkpoint("llama")
    assert outs[1][0] == peft_greedy(ck, adapters["b"], prompt, 3)
    assert outs[3][0] == peft_greedy(ck, None, prompt, 3)


def test_unload_while_running_lets_it_finish(store, adapters, expected):
    """Load, use, unload mid-request (it finishes with its tokens; new requests naming the
    adapter fail with 404), then reload under the same name and use it again."""
    eng = Engine(store.artifact("llama", opt_level=0, **LORA), backend="reference",
                 num_kv_blocks=32, max_num_seqs=4)
    eng.add_lora(req("a", adapters))
    eng.add_request("r0", PROMPT, GREEDY, lora_request="a")
    eng.step()
    eng.remove_lora("a")
    with pytest.raises(LoRAError, match="'a' is not loaded") as e:
        eng.add_request("r1", PROMPT, GREEDY, lora_request="a")
    assert e.value.status == 404
    assert eng.run_to_completion()["r0"].token_ids == expected["a"]
    assert eng.lora.in_use() == {} and None in eng.lora._holder     # its slot is free again
    eng.add_lora(LoRARequest("a", 2, str(adapters["b"])))           # the name, another adapter
    eng.add_request("r2", PROMPT, GREEDY, lora_request="a")
    assert eng.run_to_completion()["r2"].token_ids == expected["b"]


def test_a_new_lora_int_id_under_a_name_replaces_the_adapter(store, adapters, expected):
    """vLLM's identity of an adapter version is its lora_int_id: a LoRARequest with the
    name of a registered adapter and a new id (an RL loop's next checkpoint) replaces it;
    requests already running finish with the old weights. The same id with another path is
    ambiguous and refused."""
    eng = Engine(store.artifact("llama", opt_level=0, **LORA), backend="reference",
                 num_kv_blocks=32, max_num_seqs=4)
    eng.add_request("r0", PROMPT, GREEDY, lora_request=LoRARequest("p", 1, str(adapters["a"])))
    eng.step()
    eng.add_request("r1", PROMPT, GREEDY, lora_request=LoRARequest("p", 2, str(adapters["b"])))
    with pytest.raises(LoRAError, match="already loaded"):
        eng.add_request("r2", PROMPT, GREEDY, lora_request=LoRARequest("p", 2, str(adapters["c"])))
    done = eng.run_to_completion()
    assert done["r0"].token_ids == expected["a"] and done["r1"].token_ids == expected["b"]
    assert eng.list_loras() == [LoRARequest("p", 2, str(adapters["b"]))]
    assert eng.lora.in_use() == {} and eng.lora._holder.count(None) == 1   # a's slot freed


# -- errors -----------------------------------------------------------------------------

def test_adapter_paths_the_os_refuses_and_home_relative_ones(store, adapters, expected,
                                                              tmp_path, monkeypatch):
    """A path the OS refuses (too long) is the 404 of a missing adapter, not a crash (a 500
    over HTTP); "~/..." is the user's home, as vLLM reads it."""
    eng = Engine(store.artifact("llama", opt_level=0, **LORA), backend="reference",
                 num_kv_blocks=32, max_num_seqs=4)
    with pytest.raises(LoRAError, match="cannot read") as e:
        eng.add_lora(LoRARequest("long", 1, str(tmp_path / ("x" * 5000))))
    assert e.value.status == 404
    monkeypatch.setenv("HOME", str(adapters["a"].parent))
    eng.add_request("r", PROMPT, GREEDY, lora_request=LoRARequest("home", 2, "~/a"))
    assert eng.run_to_completion()["r"].token_ids == expected["a"]


@pytest.mark.parametrize("config, needle", [
    ([], "adapter_config.json holds a list, not a JSON object"),
    ({"r": True}, "r=True"),
    ({"lora_alpha": True}, "lora_alpha=True"),
    ({"r": 4, "lora_alpha": "8"}, "lora_alpha='8'"),
    ({"lora_alpha": float("nan")}, "lora_alpha=nan"),
])
def test_a_malformed_adapter_config_is_a_clear_error(store, tmp_path, config, needle):
    """adapter_config.json that is not an object was a crash (a 500 over HTTP), and a
    boolean r or lora_alpha was taken for 1 (a silently wrong scale)."""
    eng = Engine(store.artifact("llama", opt_level=0, **LORA), backend="reference",
                 num_kv_blocks=8, max_num_seqs=4)
    d = write_adapter(tmp_path / "ad", {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 64),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(64, 4)},
        **(config if isinstance(config, dict) else {}))
    if not isinstance(config, dict):
        (d / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(LoRAError, match=needle) as e:
        eng.add_lora(LoRARequest("ad", 1, str(d)))
    assert e.value.status == 400 and "adapter_config.json" in str(e.value)
    assert eng.list_loras() == []

def test_a_config_without_lora_alpha_takes_pefts_default(store, adapters, tmp_path):
    """adapter_config.json without lora_alpha: peft's LoraConfig default (8) applies, as
    peft itself loads it; braze took alpha = r, a silently wrong scale (here half)."""
    import shutil
    ck = store.checkpoint("llama")
    d = shutil.copytree(adapters["a"], tmp_path / "noalpha")          # r 4, alpha 8
    cfg = json.loads((d / "adapter_config.json").read_text())
    del cfg["lora_alpha"]
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    eng = Engine(store.artifact("llama", opt_level=0, **LORA), backend="reference",
                 num_kv_blocks=8, max_num_seqs=4)
    eng.add_request("r", PROMPT, GREEDY, lora_request=LoRARequest("na", 1, str(d)))
    assert eng.run_to_completion()["r"].token_ids == peft_greedy(ck, d, PROMPT, GREEDY.max_tokens)


def test_an_adapter_with_lora_bias_is_refused_naming_it(store, tmp_path):
    """peft's lora_bias=True adds a bias to each lora_B: refused naming lora_bias (the error
    named a '...lora_B.bias' tensor as 'not a LoRA A/B weight')."""
    ck = store.checkpoint("llama")
    from peft import LoraConfig, get_peft_model

    from conftest import hf_model
    model = get_peft_model(hf_model(ck), LoraConfig(r=4, target_modules=["q_proj"],
                                                    lora_bias=True))
    model.save_pretrained(tmp_path / "bias")
    eng = Engine(store.artifact("llama", opt_level=0, **LORA), backend="reference",
                 num_kv_blocks=8, max_num_seqs=4)
    with pytest.raises(LoRAError, match="lora_bias=True is not supported") as e:
        eng.add_lora(LoRARequest("bias", 1, str(tmp_path / "bias")))
    assert e.value.status == 400


def test_a_pickled_adapter_is_a_400_saying_to_save_it_as_safetensors(store, adapters, tmp_path):
    """An adapter saved as adapter_model.bin (peft's safe_serialization=False) is there but
    in a format braze does not load: a 400 saying how to save it, not the 404 of a missing
    adapter (over HTTP, "not found" for a directory that holds it)."""
    from safetensors.torch import load_file
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "adapter_config.json").write_text((adapters["a"] / "adapter_config.json").read_text())
    torch.save(load_file(str(adapters["a"] / "adapter_model.safetensors")),
               d / "adapter_model.bin")
    eng = Engine(store.artifact("llama", opt_level=0, **LORA), backend="reference",
                 num_kv_blocks=8, max_num_seqs=4)
    with pytest.raises(LoRAError, match="adapter_model.bin.*safe_serialization") as e:
        eng.add_lora(LoRARequest("pickled", 1, str(d)))
    assert e.value.status == 400


def test_lora_request_paths_are_checked_and_pathlike_taken(store, adapters, expected):
    """LoRARequest's lora_path: a pathlib.Path is taken (as a str, so the same adapter
    compares equal either way); None, a number or "" is refused naming lora_path (None and
    a number were a TypeError from pathlib deep in generate; "" read the current
    directory)."""
    for bad in (None, 3, ""):
        with pytest.raises(BrazeError, match="lora_path must be"):
            LoRARequest("a", 1, bad)
    from pathlib import Path
    r = LoRARequest("a", 1, Path(adapters["a"]))
    assert r == LoRARequest("a", 1, str(adapters["a"]))
    llm = LLM(store.artifact("llama", opt_level=0, **LORA), backend="reference",
              num_kv_blocks=8, max_num_seqs=2)
    assert llm.generate(PROMPT, GREEDY, lora_request=r)[0].token_ids == expected["a"]


def test_a_hub_repo_id_as_adapter_path_says_to_download_it(store, tmp_path, monkeypatch):
    """vLLM takes a Hub repository id as lora_path (its docs' --lora-modules
    sql=yard1/llama-2-7b-sql-lora-test): braze reads local directories, and the 404 says
    how to get one (it said only that there was no adapter_config.json in it)."""
    monkeypatch.chdir(tmp_path)
    eng = Engine(store.artifact("llama", opt_level=0, **LORA), backend="reference",
                 num_kv_blocks=8, max_num_seqs=4)
    with pytest.raises(LoRAError) as e:
        eng.add_lora(LoRARequest("sql", 1, "yard1/llama-2-7b-sql-lora-test"))
    assert e.value.status == 404
    assert "huggingface-cli download yard1/llama-2-7b-sql-lora-test --local-dir DIR" in \
        str(e.value)
    (tmp_path / "yard1" / "empty").mkdir(parents=True)      # a local directory, not an adapter
    with pytest.raises(LoRAError, match="no adapter_config.json") as e:
        eng.add_lora(LoRARequest("sql", 1, "yard1/empty"))
    assert "huggingface-cli" not in str(e.value)


def test_a_directory_of_named_adapters_names_them(store, adapters, expected, tmp_path):
    """peft saves a model's adapters other than "default" each in a subdirectory of the
    save_pretrained directory: given that directory, the 404 names the subdirectories that
    hold adapters (it said only 'no adapter_config.json'); one of them serves as peft's."""
    import shutil
    out = tmp_path / "saved"
    for sub in ("sql", "chat"):
        shutil.copytree(adapters["a"], out / sub)
    eng = Engine(store.artifact("llama", opt_level=0, **LORA), backend="reference",
                 num_kv_blocks=8, max_num_seqs=4)
    with pytest.raises(LoRAError, match="no adapter_config.json") as e:
        eng.add_lora(LoRARequest("sql", 1, str(out)))
    assert e.value.status == 404
    assert f"{out / 'chat'}, {out / 'sql'}" in str(e.value)
    eng.add_request("r", PROMPT, GREEDY, lora_request=LoRARequest("sql", 1, str(out / "sql")))
    assert eng.run_to_completion()["r"].token_ids == expected["a"]


def test_adapter_errors_name_the_problem(store, adapters, tmp_path):
    eng = Engine(store.artifact("llama", opt_level=0, **LORA), backend="reference",
                 num_kv_blocks=8, max_num_seqs=4)
    ck = store.checkpoint("llama")
    big = make_adapter(ck, tmp_path / "big", seed=1, r=16, targets=["q_proj"])
    with pytest.raises(LoRAError, match="rank 16, more than the artifact's --max-lora-rank 8"):
        eng.add_lora(LoRARequest("big", 1, str(big)))
    H = 64
    odd = write_adapter(tmp_path / "odd", {
        "base_model.model.model.layers.0.self_attn.c_attn.lora_A.weight": torch.ones(4, H),
        "base_model.model.model.layers.0.self_attn.c_attn.lora_B.weight": torch.ones(H, 4)})
    with pytest.raises(LoRAError, match="targets module model.layers.0.self_attn.c_attn, which "
                                        "this model has no LoRA-capable linear for") as e:
        eng.add_lora(LoRARequest("odd", 2, str(odd)))
    assert e.value.status == 400
    with pytest.raises(LoRAError, match="no adapter_config.json") as e:
        eng.add_lora(LoRARequest("gone", 3, str(tmp_path / "nowhere")))
    assert e.value.status == 404
    eng.add_lora(req("a", adapters))
    with pytest.raises(LoRAError, match="already loaded"):
        eng.add_lora(LoRARequest("a", 4, str(adapters["b"])))
    assert [r.lora_name for r in eng.list_loras()] == ["a"]
    # an artifact compiled for q,v only refuses an adapter with o_proj
    qv = Engine(store.artifact("llama", opt_level=0, lora_targets="q,v", **LORA),
                backend="reference", num_kv_blocks=8, max_num_seqs=4)
    with pytest.raises(LoRAError, match="compiled with --lora-targets q_proj,v_proj"):
        qv.add_lora(req("a", adapters))
    qv.add_lora(req("b", adapters))                      # q and v only: fine
    plain = Engine(store.artifact("llama", opt_level=0), backend="reference", num_kv_blocks=8)
    with pytest.raises(BrazeError, match="serves no LoRA adapters; compile it with --lora-slots"):
        plain.add_request("x", PROMPT, GREEDY, lora_request=req("a", adapters))


@pytest.mark.parametrize("targets, save_embedding_layers, module", [
    (["embed_tokens", "q_proj"], True, "model.embed_tokens"),    # + its whole weight
    (["embed_tokens", "q_proj"], False, "model.embed_tokens"),   # lora_embedding_A/B only
    (["lm_head", "q_proj"], True, "lm_head"),
    (["lm_head", "q_proj"], False, "lm_head"),                   # lora_A/B on lm_head
])
def test_adapters_on_the_embeddings_or_lm_head_are_refused_naming_them(
        store, tmp_path, targets, save_embedding_layers, module):
    """peft adapters with embed_tokens or lm_head among target_modules: refused naming the
    module and what to train instead (the error named a tensor, e.g. '...embed_tokens.
    base_layer.weight', as 'not a LoRA A/B weight', leaving the user to guess why)."""
    from peft import LoraConfig, get_peft_model

    from conftest import hf_model
    model = get_peft_model(hf_model(store.checkpoint("llama")),
                           LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    model.save_pretrained(tmp_path / "ad", save_embedding_layers=save_embedding_layers)
    eng = Engine(store.artifact("llama", opt_level=0, **LORA), backend="reference",
                 num_kv_blocks=8, max_num_seqs=4)
    with pytest.raises(LoRAError) as e:
        eng.add_lora(LoRARequest("emb", 1, str(tmp_path / "ad")))
    msg = str(e.value)
    assert e.value.status == 400 and module in msg
    assert f"without {targets[0]} in target_modules" in msg, msg
    assert eng.list_loras() == []


def test_an_adapter_on_moe_experts_is_refused_naming_target_parameters(store, tmp_path):
    """peft puts LoRA on an MoE layer's experts through target_parameters (their fused
    gate_up_proj / down_proj parameters): refused naming them and what to train instead
    (the error was 'rank_pattern is not supported yet', a config key peft filled in itself).
    The same artifact serves the adapter's attention part alone, as peft computes it."""
    from peft import LoraConfig, get_peft_model

    from conftest import hf_model
    ck = store.checkpoint("mixtral")
    torch.manual_seed(5)
    model = get_peft_model(hf_model(ck), LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"],
        target_parameters=["gate_up_proj", "down_proj"]))
    model.save_pretrained(tmp_path / "moe")
    llm = LLM(store.artifact("mixtral", opt_level=0, **LORA), backend="reference",
              num_kv_blocks=16, max_num_seqs=2)
    with pytest.raises(LoRAError, match="target_parameters") as e:
        llm.generate(PROMPT, GREEDY, lora_request=LoRARequest("moe", 1, str(tmp_path / "moe")))
    assert "gate_up_proj" in str(e.value) and "target_modules" in str(e.value)
    assert e.value.status == 400
    attn = make_adapter(ck, tmp_path / "attn", seed=5, targets=["q_proj", "v_proj"], scale=3.0)
    got = llm.generate(PROMPT, GREEDY, lora_request=LoRARequest("attn", 2, str(attn)))
    assert got[0].token_ids == peft_greedy(ck, attn, PROMPT, GREEDY.max_tokens)


# -- other families and target sets ------------------------------------------------------

@pytest.mark.parametrize("case,targets", [
    ("qwen3-headdim24-tied", None),                        # QK-norm + RoPE fused with the delta
    ("phi3-longrope-partial-tied", ["qkv_proj", "gate_up_proj", "o_proj", "down_proj"]),
])
def test_families_match_peft_at_O2(store, tmp_path, case, targets):
    """Qwen3 (its -O2 rope_cache_write fusion intact with deltas on q and k) and Phi-3,
    whose adapters target the checkpoint's fused qkv_proj / gate_up_proj that braze splits
    at load (the adapter is split the same way)."""
    ck = store.checkpoint(case)
    ad = make_adapter(ck, tmp_path / "ad", seed=5, r=4, scale=3.0,
                      **({"targets": targets} if targets else {}))
    art = store.artifact(case, opt_level=2, **LORA)
    plain = json.loads((store.artifact(case, opt_level=2) / "manifest.json").read_text())
    fused = json.loads((art / "manifest.json").read_text())["compile"]["ops_after"]
    for op in ("rope_cache_write", "paged_attention", "add_rms_norm"):
        assert fused.get(op) == plain["compile"]["ops_after"].get(op), op
    llm = LLM(art, backend="reference", num_kv_blocks=32, max_num_seqs=4)
    outs = llm.generate([PROMPT, PROMPT], GREEDY, lora_request=[LoRARequest("x", 1, str(ad)), None])
    want = peft_greedy(ck, ad, PROMPT, GREEDY.max_tokens)
    assert [o.token_ids for o in outs] == [want, peft_greedy(ck, None, PROMPT, GREEDY.max_tokens)]


def test_merged_qkv_with_untargeted_part(store, adapters, expected):
    """--lora-targets q,v at -O2: the merged QKV delta keeps k's rows zero."""
    art = store.artifact("llama", opt_level=2, lora_targets="q,v", **LORA)
    m = json.loads((art / "manifest.json").read_text())["lora"]
    assert m["modules"]["model.layers.0.self_attn.qkv_proj"]["targeted"] == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    llm = LLM(art, backend="reference", num_kv_blocks=32, max_num_seqs=4)
    assert llm.generate(PROMPT, GREEDY, lora_request=req("b", adapters))[0].token_ids == expected["b"]


def test_add_lora_pass_on_a_hand_graph():
    """The pass alone: y = linear(x, W) becomes y + lora(x, ...), and runs as the math says."""
    from braze.ir import Graph, T, TensorType, run_graph
    from braze.passes import PassContext, PassManager
    from braze.passes.add_lora import target_modules
    g = Graph("g")
    x = g.add_input("x", TensorType((T, 8), "f32"))
    w = g.add_param("layer.q_proj.weight", TensorType((6, 8), "f32"))
    u = g.add_param("layer.other.weight", TensorType((6, 8), "f32"))
    g.set_output("y", g.op("add", g.op("linear", x, w), g.op("linear", x, u)))
    ctx = PassContext(options={"lora_slots": 2, "max_lora_rank": 3, "lora_targets": "q"})
    PassManager(["add-lora"], ctx=ctx, verify_each=True).run(g)
    assert g.op_counts()["lora"] == 1
    assert g.meta["lora"]["modules"] == {"layer.q_proj": {"parts": [["layer.q_proj", 6]],
                                                          "targeted": ["layer.q_proj"], "in": 8}}
    gen = torch.Generator().manual_seed(0)
    feeds = {"x": torch.randn(4, 8, generator=gen),
             "lora_slots": torch.tensor([1, -1, 0, 1], dtype=torch.int32),
             "lora_a.layer.q_proj": torch.randn(2, 3, 8, generator=gen),
             "lora_b.layer.q_proj": torch.randn(2, 6, 3, generator=gen)}
    params = {"layer.q_proj.weight": torch.randn(6, 8, generator=gen),
              "layer.other.weight": torch.randn(6, 8, generator=gen)}
    got = run_graph(g, feeds, params)["y"]
    x, A, B = feeds["x"], feeds["lora_a.layer.q_proj"], feeds["lora_b.layer.q_proj"]
    want = x @ params["layer.q_proj.weight"].T + x @ params["layer.other.weight"].T
    for t, s in enumerate([1, -1, 0, 1]):
        if s >= 0:
            want[t] += B[s] @ (A[s] @ x[t])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert target_modules("qkv,o") == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_preemption_releases_and_reacquires_slots(store, adapters):
    """A KV cache too small for every request: preempted requests give up their adapter
    slot and take one again on readmission, and still get peft's tokens."""
    ck = store.checkpoint("llama")
    n = 30
    want = {k: peft_greedy(ck, adapters[k] if k else None, PROMPT, n) for k in ("a", "b", None)}
    eng = Engine(store.artifact("llama", opt_level=0, **LORA), backend="reference",
                 num_kv_blocks=6, max_num_seqs=4)
    names = ["a", "b", None, "a"]
    sp = SamplingParams(max_tokens=n, ignore_eos=True)
    for i, name in enumerate(names):
        eng.add_request(f"r{i}", PROMPT, sp, lora_request=req(name, adapters))
    final = eng.run_to_completion()
    assert eng.stats()["preemptions"] > 0
    assert [final[f"r{i}"].token_ids for i in range(4)] == [want[k] for k in names]
    assert eng.lora.in_use() == {}


def test_host_copies_are_an_lru_of_max_cpu_loras(store, adapters, expected):
    eng = Engine(store.artifact("llama", opt_level=0, **LORA), backend="reference",
                 num_kv_blocks=32, max_num_seqs=1, max_cpu_loras=2)
    for n in "abc":
        eng.add_lora(req(n, adapters))
    assert eng.lora.stats["lora_reads_from_disk"] == 3          # a's copy made room for c
    eng.add_request("x", PROMPT, GREEDY, lora_request="a")
    assert eng.run_to_completion()["x"].token_ids == expected["a"]
    assert eng.lora.stats["lora_reads_from_disk"] == 4          # read again for its slot


def test_an_adapter_unreadable_when_reread_fails_its_request_only(store, adapters, expected,
                                                                  tmp_path):
    """An adapter whose host copy was evicted (max_cpu_loras) is read from disk again when a
    request needs a slot; if its directory is gone by then, that request ends (abort, the
    reason naming the adapter) and the engine goes on with the others: it used to raise out
    of the scheduler and end every request (a server's engine with them)."""
    import shutil
    eng = Engine(store.artifact("llama", opt_level=0, **LORA), backend="reference",
                 num_kv_blocks=32, max_num_seqs=4, max_cpu_loras=2)
    gone = tmp_path / "gone"
    shutil.copytree(adapters["a"], gone)
    eng.add_lora(LoRARequest("gone", 1, str(gone)))
    for i, n in enumerate("bc"):
        eng.add_lora(LoRARequest(n, i + 2, str(adapters[n])))      # gone's host copy evicted
    shutil.rmtree(gone)
    eng.add_request("r0", PROMPT, GREEDY, lora_request="b")
    eng.add_request("r1", PROMPT, GREEDY, lora_request="gone")
    eng.add_request("r2", PROMPT, GREEDY)
    final = eng.run_to_completion()
    assert final["r0"].token_ids == expected["b"] and final["r2"].token_ids == expected[None]
    assert final["r1"].finish_reason == "abort" and final["r1"].token_ids == []
    assert "LoRA adapter 'gone'" in final["r1"].stop_reason
    assert eng.lora.in_use() == {} and eng.lora._refs == {}
    eng.add_request("r3", PROMPT, GREEDY, lora_request="c")      # the engine still serves
    assert eng.run_to_completion()["r3"].token_ids == expected["c"]


def test_generate_command_takes_an_adapter(store, adapters, expected):
    from cli_helpers import run as braze
    art = store.artifact("llama", opt_level=0, **LORA)
    code, out, err = braze("generate", art, "--prompt-ids", ",".join(map(str, PROMPT)),
                           "--max-tokens", "6", "--ignore-eos", "--backend", "reference",
                           "--lora", adapters["a"], "--json")
    assert code == 0, err
    assert json.loads(out)["token_ids"] == expected["a"]
    code, out, err = braze("generate", store.artifact("llama"), "--prompt-ids", "1,2",
                           "--backend", "reference", "--lora", adapters["a"])
    assert code != 0 and "serves no LoRA adapters" in err


def test_llm_takes_vllms_lora_options_as_checks(store, adapters, expected):
    """LLM(..., enable_lora=True, max_loras=K, max_lora_rank=R), as a vLLM script writes it:
    the artifact fixed its slots and rank when it was compiled, so these run where the
    artifact has them and name the compile flag where it does not."""
    art = store.artifact("llama", opt_level=0, **LORA)
    llm = LLM(art, backend="reference", num_kv_blocks=32, enable_lora=True, max_loras=2,
              max_lora_rank=4)
    out = llm.generate({"prompt_token_ids": PROMPT}, GREEDY,
                       lora_request=LoRARequest("a", 1, str(adapters["a"])))
    assert out[0].outputs[0].token_ids == expected["a"]
    with pytest.raises(BrazeError, match="max_lora_rank=16.*--max-lora-rank 8"):
        LLM(art, backend="reference", num_kv_blocks=8, enable_lora=True, max_lora_rank=16)
    with pytest.raises(BrazeError, match="max_loras=3.*--lora-slots 2"):
        LLM(art, backend="reference", num_kv_blocks=8, max_loras=3)
    with pytest.raises(BrazeError, match="enable_lora=True.*--lora-slots"):
        LLM(store.artifact("llama"), backend="reference", num_kv_blocks=8, enable_lora=True)


def test_max_loras_below_the_slots_bounds_the_adapters_in_a_batch(store, adapters, expected):
    """vLLM's max_loras is the adapters one batch may hold: below the artifact's
    --lora-slots, only that many run at once (the others wait, as for a full pool) and all
    still get peft's tokens. It was checked against the slots and then ignored."""
    llm = LLM(store.artifact("llama", opt_level=0, **LORA), backend="reference",
              num_kv_blocks=32, max_num_seqs=4, max_loras=1)
    eng = llm.engine
    names = ["a", "b", None]
    for i, n in enumerate(names):
        eng.add_request(f"r{i}", PROMPT, GREEDY, lora_request=req(n, adapters, i + 1))
    eng.step()
    assert list(eng.lora.in_use()) == ["a"] and eng.num_waiting() == 1     # b waits
    final = eng.run_to_completion()
    assert [final[f"r{i}"].token_ids for i in range(3)] == [expected[n] for n in names]
    assert eng.lora.in_use() == {} and eng.lora.stats["lora_evictions"] == 1


def test_beam_search_takes_one_adapter_per_prompt(store, adapters):
    """vLLM's LLM.beam_search(prompts, params, lora_request=[...]): one adapter (or None)
    per prompt, each prompt's beams scored with its own, as peft's beam search has them."""
    from braze.runtime.beam_search import BeamSearchParams
    ck = store.checkpoint("llama")
    llm = LLM(store.artifact("llama", opt_level=0, **LORA), backend="reference",
              num_kv_blocks=64)
    prompts, names, width, steps = [PROMPT, PROMPT[:6], PROMPT[2:]], ["a", None, "b"], 2, 4
    got = llm.beam_search(prompts, BeamSearchParams(beam_width=width, max_tokens=steps,
                                                    ignore_eos=True),
                          lora_request=[req(n, adapters) for n in names])
    for prompt, name, out in zip(prompts, names, got):
        model = peft_model(ck, None if name is None else adapters[name])
        with torch.no_grad():
            want = model.generate(torch.tensor([prompt]), num_beams=width,
                                  num_return_sequences=width, do_sample=False,
                                  max_new_tokens=steps, early_stopping=False,
                                  eos_token_id=None, pad_token_id=0)
        assert [s.token_ids for s in out.sequences] == [w[len(prompt):].tolist() for w in want]
    with pytest.raises(BrazeError, match="2 lora_requests for 3 prompts"):
        llm.beam_search(prompts, BeamSearchParams(beam_width=width, max_tokens=1),
                        lora_request=[None, None])
    assert llm.stats()["kv_blocks_free"] == llm.stats()["kv_blocks_total"]
