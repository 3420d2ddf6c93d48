"""Multi-LoRA on tensor-parallel artifacts (CPU, gloo, float32).

add-lora runs after the shard pass, on one rank's graph: a column-parallel linear's pools
hold the rank's B rows (a merged QKV / gate-up part by part, a replicated KV head's rows),
a row-parallel one's the rank's A columns, its delta added before the `all_reduce`.
runtime/lora.py cuts each adapter by the weights' shard records. Checked three ways: on
the IR's interpreter (the ranks' partial outputs sum to the unsharded graph's), the cut
pools against the heads each rank holds (4 ranks, 2 KV heads: replicated), and end to end
over gloo (logits against transformers + peft, the engine's greedy tokens, loads,
evictions and unloads reaching every rank)."""

from __future__ import annotations

import os
import textwrap

import pytest
import torch

from braze.ir import get_op, parse_graph, run_graph, verify
from braze.passes.shard import rank_loader
from braze.runtime.lora import Contract, LoRARequest, allocate_pools, read_adapter, write_slot
from braze.runtime.sampler import SamplingParams

from conftest import PROMPT
from lora_helpers import peft_model, write_adapter
from pass_helpers import materialize_params, run_passes
from test_lora import adapters, expected, req  # noqa: F401  (module fixtures)

LORA = dict(lora_slots=2, max_lora_rank=8)
GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)

MLP = """
graph @g(%x: f32[T, 16]) {
  param @model.layers.0.mlp.gate_proj.weight: f32[32, 16]
  param @model.layers.0.mlp.up_proj.weight: f32[32, 16]
  param @model.layers.0.mlp.down_proj.weight: f32[16, 32]
  %0: f32[T, 32] = linear(%x, @model.layers.0.mlp.gate_proj.weight)
  %1: f32[T, 32] = linear(%x, @model.layers.0.mlp.up_proj.weight)
  %2: f32[T, 32] = silu(%0)
  %3: f32[T, 32] = mul(%2, %1)
  %4: f32[T, 16] = linear(%3, @model.layers.0.mlp.down_proj.weight)
  return out=%4
}
"""
SIZES = {"gate_proj": (32, 16), "up_proj": (32, 16), "down_proj": (16, 32)}


def _mlp_adapter(path, seed):
    gen = torch.Generator().manual_seed(seed)
    t = {}
    for m, (o, i) in SIZES.items():
        key = f"base_model.model.model.layers.0.mlp.{m}"
        t[f"{key}.lora_A.weight"] = torch.randn(4, i, generator=gen)
        t[f"{key}.lora_B.weight"] = torch.randn(o, 4, generator=gen) / 4
    return write_adapter(path, t, r=4, lora_alpha=8, target_modules=list(SIZES))


def _run(g, ctx, whole, rank, paths, x, slots):
    """One rank's graph (rank None: the unsharded one) on its weights and adapter pools."""
    shards = ctx.records.get("shards", {})
    load = whole.__getitem__ if rank is None else rank_loader(whole.__getitem__, shards, rank)
    sources = {n for n, p in g.params.items() if p.recipe is None}
    sources |= {s.name for p in g.params.values() if p.recipe is not None
                for s in p.recipe.operands}
    params = materialize_params(g, {n: load(n) for n in sources})
    contract = Contract.from_manifest({"lora": g.meta["lora"], "parallel": {"shards": shards}},
                                      rank=rank or 0)
    pools = allocate_pools(g, "cpu")
    for slot, p in enumerate(paths):
        write_slot(pools, contract, slot, read_adapter(f"ad{slot}", p, contract))
    return run_graph(g, {"x": x, "lora_slots": slots, **pools}, params)["out"]


@pytest.mark.parametrize("merged", [False, True], ids=["separate", "merged-gate-up"])
@pytest.mark.parametrize("n", [2, 4])
def test_ranks_lora_graphs_sum_to_the_unsharded_graph(tmp_path, monkeypatch, n, merged):
    """gate/up column-parallel (B cut by rows, merged or not), down row-parallel (A cut by
    columns, its delta before the all_reduce): the ranks' partial outputs (the all_reduce
    kept per rank) sum to the unsharded graph with the whole adapters, token by token for
    base (-1) and two adapters in one batch."""
    gen = torch.Generator().manual_seed(0)
    whole = {f"model.layers.0.mlp.{m}.weight": torch.randn(o, i, generator=gen) / 4
             for m, (o, i) in SIZES.items()}
    paths = [_mlp_adapter(tmp_path / "a", 1), _mlp_adapter(tmp_path / "b", 2)]
    x = torch.randn(7, 16, generator=gen)
    slots = torch.tensor([-1, 0, 1, 0, 1, -1, 0], dtype=torch.int32)
    fuse = ["merge-projections"] if merged else []
    opts = dict(lora_slots=2, max_lora_rank=4)
    ref_g, ref_ctx = run_passes(parse_graph(textwrap.dedent(MLP)), fuse + ["add-lora"], **opts)
    want = _run(ref_g, ref_ctx, whole, None, paths, x, slots)
    base = run_graph(parse_graph(textwrap.dedent(MLP)), {"x": x}, whole)["out"]
    assert torch.equal(want[slots < 0], base[slots < 0])
    assert (want - base).abs().amax(-1)[slots >= 0].min() > 1e-3          # adapters act

    g, ctx = run_passes(parse_graph(textwrap.dedent(MLP)), ["shard"] + fuse + ["add-lora"],
                        tensor_parallel_size=n, **opts)
    verify(g)
    assert [nd.op for nd in g.nodes][-3:] == ["lora", "add", "all_reduce"]   # one collective
    assert [nd.op for nd in g.nodes].count("all_reduce") == 1
    pools = {v.name: tuple(v.type.shape) for v in g.inputs if v.name.startswith("lora_")}
    assert pools["lora_a.model.layers.0.mlp.down_proj"] == (2, 4, 32 // n)
    assert pools["lora_b.model.layers.0.mlp.down_proj"] == (2, 16, 4)
    up = "gate_up_proj" if merged else "up_proj"
    assert pools[f"lora_b.model.layers.0.mlp.{up}"] == (2, (64 if merged else 32) // n, 4)
    monkeypatch.setattr(get_op("all_reduce"), "impl", lambda x, group_size: x.clone())
    total = sum(_run(g, ctx, whole, r, paths, x, slots) for r in range(n))
    torch.testing.assert_close(total, want, atol=1e-4, rtol=1e-5)


def test_four_ranks_cut_adapters_by_the_heads_they_hold(store, adapters):  # noqa: F811
    """Llama with 2 KV heads at 4 ranks: each rank's merged-QKV pool holds its query
    head's rows of q's B, and the rows of the one KV head it keeps (ranks 0-1 head 0,
    ranks 2-3 head 1) of k's and v's; o's and down's A their input columns; A of q/k/v
    whole. Compared with the peft adapter's own tensors."""
    from safetensors.torch import load_file
    art = store.artifact("llama", opt_level=2, tensor_parallel_size=4, **LORA)
    from braze.runtime import open_artifact
    manifest = open_artifact(art).manifest
    peft = load_file(str(adapters["a"] / "adapter_model.safetensors"))
    L = "model.layers.1."

    def ab(m):
        k = f"base_model.model.{L}{m}"
        return peft[f"{k}.lora_A.weight"], peft[f"{k}.lora_B.weight"] * 2.0   # alpha 8 / r 4
    (qa, qb), (ka, kb), (va, vb) = ab("self_attn.q_proj"), ab("self_attn.k_proj"), ab("self_attn.v_proj")
    oa, ob = ab("self_attn.o_proj")
    hd = 16
    for r in range(4):
        host = read_adapter("a", adapters["a"], Contract.from_manifest(manifest, rank=r))
        a, b = host.tensors[L + "self_attn.qkv_proj"]
        R = 8
        assert torch.equal(a[:4], qa) and torch.equal(a[R:R + 4], ka) and torch.equal(a[2 * R:2 * R + 4], va)
        kv = r * 2 // 4                                  # the KV head this rank keeps
        want_b = torch.cat([qb[r * hd:(r + 1) * hd], kb[kv * hd:(kv + 1) * hd],
                            vb[kv * hd:(kv + 1) * hd]])
        torch.testing.assert_close(b[:, :4], want_b)
        a, b = host.tensors[L + "self_attn.o_proj"]
        torch.testing.assert_close(a[:4], oa[:, r * hd:(r + 1) * hd])
        torch.testing.assert_close(b[:, :4], ob)
    from braze.inspect import format_summary, summarize
    assert "each rank's pools hold its share of every adapter" in format_summary(summarize(art))


# -- end to end over gloo ------------------------------------------------------------------

SEQS = [PROMPT[:7], PROMPT[2:12], PROMPT[4:9]]      # base, adapter a (slot 0), adapter b (slot 1)
NEXT = PROMPT[15]


def _lora_logits(ex, contract, paths) -> list[torch.Tensor]:
    """Adapters a and b in slots 0 and 1; a prefill of base, a and b in one step, then a
    decode of one token each: each sequence's last logits of both steps."""
    from braze.ir.contract import SeqChunk

    from conftest import step_inputs
    for slot, p in enumerate(paths):
        write_slot(ex.lora_pools, contract, slot, read_adapter(f"ad{slot}", p, contract))
    out = []
    for step in ([SeqChunk(s, 0, [i]) for i, s in enumerate(SEQS)],
                 [SeqChunk([NEXT], len(s), [i]) for i, s in enumerate(SEQS)]):
        inputs = step_inputs(ex, step)
        inputs["lora_slots"] = torch.tensor(
            [i - 1 for i, c in enumerate(step) for _ in c.token_ids], dtype=torch.int32)
        logits = ex.run(inputs)
        out.append(logits if ex.logits_pruned else logits.index_select(0, inputs["logits_indices"]))
    return out


def _rank_main(rank, n, port, root, paths, queue, config_home):
    import datetime
    os.environ["XDG_CONFIG_HOME"] = config_home
    import torch.distributed as dist

    from braze.runtime import Executor, open_artifact
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=n, timeout=datetime.timedelta(seconds=120))
    try:
        art = open_artifact(root)
        ex = Executor(art, backend="reference", num_blocks=8)
        out = _lora_logits(ex, Contract.from_manifest(art.manifest, rank=rank), paths)
        if rank == 0:
            queue.put([t.numpy().copy() for t in out])
        dist.barrier()
    finally:
        dist.destroy_process_group()


# Phi-3's adapters target its checkpoint's fused qkv_proj / gate_up_proj: split into the
# graph's parts whole (runtime/lora.py), then each part cut to the rank
FUSED = ["qkv_proj", "gate_up_proj", "o_proj", "down_proj"]


@pytest.mark.parametrize("case", ["llama", "phi3-longrope-partial-tied"])
def test_mixed_batch_logits_at_two_ranks_match_peft_and_one_rank(store, adapters, case,  # noqa: F811
                                                                 tmp_path):
    """Base, adapter a and adapter b in one step (prefill, then a decode): every
    sequence's logits at 2 ranks within 1e-4 of transformers + peft and of one rank."""
    import torch.multiprocessing as mp

    from braze.runtime import Executor, open_artifact
    from braze.runtime.parallel import _free_port
    ck = store.checkpoint(case)
    if case == "llama":
        ads = [adapters["a"], adapters["b"]]
    else:
        from lora_helpers import make_adapter
        ads = [make_adapter(ck, tmp_path / f"f{i}", seed=5 + i, r=4, scale=3.0, targets=FUSED)
               for i in range(2)]
    paths = [str(a) for a in ads]
    one = open_artifact(store.artifact(case, opt_level=2, **LORA))
    want = _lora_logits(Executor(one, backend="reference", num_blocks=8),
                        Contract.from_manifest(one.manifest), paths)
    ctx = mp.get_context("spawn")
    q, port = ctx.Queue(), _free_port()
    root = str(store.artifact(case, opt_level=2, tensor_parallel_size=2, **LORA))
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, root, paths, q,
                                                  os.environ["XDG_CONFIG_HOME"]))
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = [torch.from_numpy(x) for x in q.get(timeout=300)]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.exitcode is None:
                p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    for i, (seq, ad) in enumerate(zip(SEQS, [None] + ads)):
        with torch.no_grad():
            hf = peft_model(ck, ad)(torch.tensor([seq + [NEXT]])).logits[0]
        for step, row in ((0, -2), (1, -1)):
            torch.testing.assert_close(got[step][i], hf[row], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(got[step][i], want[step][i], atol=1e-4, rtol=1e-4)
            assert torch.equal(got[step][i].argmax(), want[step][i].argmax())
    assert not torch.allclose(got[0][1], got[0][0], atol=1e-2)       # the adapters act


def test_engine_at_two_ranks_mixes_loads_evicts_and_unloads(store, adapters, expected):  # noqa: F811
    """Rank 0's one LoRAManager drives both ranks: a mixed batch of base and both adapters
    gives peft's (= one rank's) greedy tokens; three adapters in two slots wait and evict
    (each slot write reaches rank 1); an unloaded name loaded again from another
    directory serves that one."""
    from braze.runtime import LLM
    names = [None, "a", "b", "a"]
    opts = dict(backend="reference", num_kv_blocks=32, max_num_seqs=4)
    one = LLM(store.artifact("llama", opt_level=2, **LORA), **opts)
    want = [o.token_ids for o in one.generate([PROMPT[:10]] * 4, GREEDY,
                                              lora_request=[req(n, adapters) for n in names])]
    assert want == [expected[n] for n in names]
    with LLM(store.artifact("llama", opt_level=2, tensor_parallel_size=2, **LORA), **opts) as llm:
        outs = llm.generate([PROMPT[:10]] * 4, GREEDY,
                            lora_request=[req(n, adapters) for n in names])
        assert [o.token_ids for o in outs] == want
        eng = llm.engine
        late = ["c", "b", "a", None]
        for i, n in enumerate(late):
            eng.add_request(f"r{i}", PROMPT[:10], GREEDY, lora_request=req(n, adapters))
        eng.step()
        assert len(eng.lora.in_use()) == 2 and eng.num_waiting() == 1    # a waits for a slot
        final = eng.run_to_completion()
        assert [final[f"r{i}"].token_ids for i in range(4)] == [expected[n] for n in late]
        assert eng.lora.stats["lora_evictions"] >= 1
        eng.remove_lora("a")
        eng.add_lora(LoRARequest("a", 9, str(adapters["b"])))
        eng.add_request("r9", PROMPT[:10], GREEDY, lora_request="a")
        assert eng.run_to_completion()["r9"].token_ids == expected["b"]


def test_an_adapter_rank_1_cannot_read_ends_the_run_naming_it(store, adapters, tmp_path, capfd):  # noqa: F811
    """Every rank reads each adapter itself: one whose directory is gone by the time it
    goes to a slot (rank 0 kept its host copy) stops rank 1 with a line naming the rank,
    the adapter and the rule, and rank 0's run ends with an error, not a hang."""
    import shutil

    from braze.ir.errors import BrazeError
    from braze.runtime import LLM
    gone = shutil.copytree(adapters["a"], tmp_path / "gone")
    with LLM(store.artifact("llama", opt_level=2, tensor_parallel_size=2, **LORA),
             backend="reference", num_kv_blocks=32, max_num_seqs=4,
             collective_timeout_s=30) as llm:
        llm.engine.add_lora(LoRARequest("g", 1, str(gone)))
        shutil.rmtree(gone)
        with pytest.raises(BrazeError, match=r"tensor-parallel rank 1 \(pid \d+\) exited"):
            llm.generate(PROMPT[:10], GREEDY, lora_request="g")
    err = capfd.readouterr().err
    assert "tensor-parallel rank 1: LoRA adapter 'g': no adapter_config.json" in err
    assert "must be at the same path on every host" in err


def test_interpreted_kernels_at_two_ranks_match_peft(store, adapters, expected):  # noqa: F811
    """The launch plans (the shrink/expand Triton kernels on the rank's pool sizes, the
    collectives as extern calls) under the Triton interpreter on both ranks."""
    from braze.runtime import LLM
    art = store.artifact("llama", opt_level=2, max_num_tokens=16, max_num_seqs=2,
                         tensor_parallel_size=2, **LORA)
    with LLM(art, backend="interpret", num_kv_blocks=8, max_num_seqs=2, buckets=[2, 16]) as llm:
        outs = llm.generate([PROMPT[:10]] * 2, SamplingParams(max_tokens=3, ignore_eos=True),
                            lora_request=[req("a", adapters), None])
        assert [o.token_ids for o in outs] == [expected["a"][:3], expected[None][:3]]
        assert not any("lora" in f for f in llm.engine.runner.graphs.stats["extern_fallbacks"])


def test_add_lora_before_shard_is_refused_naming_the_order():
    from braze.ir.errors import BrazeError
    g = parse_graph(textwrap.dedent(MLP))
    run_passes(g, ["add-lora"], lora_slots=2, max_lora_rank=4)
    with pytest.raises(BrazeError, match="run add-lora after shard"):
        run_passes(g, ["shard"], tensor_parallel_size=2)


def test_compile_puts_add_lora_after_shard_at_every_level():
    from braze.passes import pipeline
    from braze.passes.add_lora import with_lora
    for level in (0, 1, 2):
        names = with_lora(["shard"] + pipeline(level))
        assert names.index("add-lora") > names.index("shard")
