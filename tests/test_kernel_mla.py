"""The MLA kernels (latent_attention, latent_cache_write; codegen/kernels/mla.py) against
the reference ops (Triton interpreter), and the absorbed form against the expanded one in
plain torch math: mixed prefill + decode steps over shuffled block tables with padding
tokens, heads not a multiple of the 16-head tile, a kv_lora_rank that is not a power of
two; and their cubins for sm_80 and sm_90 at DeepSeek-V3's real sizes."""

from __future__ import annotations

import pytest
import torch

from braze.ir import MB, NB, Graph, S, T, TensorType, run_graph
from braze.ir.types import torch_dtype
from kernel_helpers import aot_compile_node, check_kernels

TOL = {"f32": dict(atol=1e-5, rtol=1e-5), "f16": dict(atol=3e-3, rtol=3e-3)}


def _graph(heads, rank, rope, block_size, dtype, nope=0, v_dim=0):
    """latent_cache_write then latent_attention (or, with nope/v_dim, mla_attention)."""
    g = Graph("mla")
    row = rank + rope
    kv = g.add_input("kv", TensorType((T, 1, row), dtype))
    cache = g.add_input("kv_latent.0", TensorType((NB, block_size, 1, row), dtype))
    slots = g.add_input("slot_mapping", TensorType((T,), "i64"))
    qsl = g.add_input("query_start_loc", TensorType((S + 1,), "i32"))
    lens = g.add_input("seq_lens", TensorType((S,), "i32"))
    tables = g.add_input("block_tables", TensorType((S, MB), "i32"))
    g.add_node("latent_cache_write", [kv, cache, slots])
    if nope:
        q = g.add_input("q", TensorType((T, heads, nope + rope), dtype))
        w = g.add_param("w_kv_b", TensorType((heads * (nope + v_dim), rank), dtype))
        out = g.op("mla_attention", q, cache, w, qsl, lens, tables, scale=0.3, kv_lora_rank=rank)
    else:
        q = g.add_input("q", TensorType((T, heads, row), dtype))
        out = g.op("latent_attention", q, cache, qsl, lens, tables, scale=0.3, kv_lora_rank=rank)
    g.set_output("o", out)
    return g


def _step(g, seqs, pad, seed):
    """Feeds for sequences [(cached, new), ...] plus `pad` padding tokens over shuffled
    blocks of a cache that holds noise everywhere."""
    gen = torch.Generator().manual_seed(seed)
    ct = g.input("kv_latent.0").type
    block_size, row = ct.shape[1], ct.shape[3]
    dt = torch_dtype(ct.dtype)
    need = [-(-(c + n) // block_size) for c, n in seqs]
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.zeros(len(seqs), max(need) + 1, dtype=torch.int32)
    qsl, slots, used = [0], [], 0
    for s, ((c, n), k) in enumerate(zip(seqs, need)):
        blocks = perm[used:used + k]
        used += k
        tables[s, :k] = torch.tensor(blocks, dtype=torch.int32)
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(c, c + n)]
        qsl.append(qsl[-1] + n)
    t = qsl[-1] + pad
    q = g.input("q").type
    return {
        "kv": torch.randn(t, 1, row, generator=gen).to(dt),
        "kv_latent.0": torch.randn(num_blocks, block_size, 1, row, generator=gen).to(dt),
        "slot_mapping": torch.tensor(slots + [-1] * pad, dtype=torch.int64),
        "query_start_loc": torch.tensor(qsl, dtype=torch.int32),
        "seq_lens": torch.tensor([c + n for c, n in seqs], dtype=torch.int32),
        "block_tables": tables,
        "q": torch.randn(t, q.shape[1], q.shape[2], generator=gen).to(dt),
    }, {"T": t, "S": len(seqs), "MB": tables.shape[1], "NB": num_blocks}


# decodes after long and short prefixes, a prefill, a prefill after a prefix; padding
STEP = [(17, 1), (0, 7), (3, 1), (9, 13), (0, 1)]


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("heads,rank,rope,block", [(4, 32, 8, 16), (20, 24, 8, 4), (16, 64, 16, 8)])
def test_latent_kernels_match_reference(dtype, heads, rank, rope, block):
    g = _graph(heads, rank, rope, block, dtype)
    feeds, sizes = _step(g, STEP, pad=3, seed=heads + rank)
    check_kernels(g, feeds, {}, {"latent_attention", "latent_cache_write"}, sizes, **TOL[dtype])


def test_absorbed_form_equals_expanded_attention():
    """q' = (q_nope W_UK, q_rope), latent attention, then W_UV: the numbers of attention
    over per-head K = (c W_UK^T, k_rope) and V = c W_UV^T, written out in torch here."""
    heads, rank, rope, nope, v_dim, block = 3, 24, 8, 16, 12, 4
    g = _graph(heads, rank, rope, block, "f32", nope=nope, v_dim=v_dim)
    feeds, _ = _step(g, [(5, 1), (0, 6), (2, 3)], pad=2, seed=3)
    w = torch.randn(heads * (nope + v_dim), rank, generator=torch.Generator().manual_seed(4))
    got = run_graph(g, {k: v.clone() for k, v in feeds.items()}, {"w_kv_b": w})["o"]
    # torch: per sequence, gather its cached rows (this step's written first), expand, attend
    cache = feeds["kv_latent.0"].clone()
    flat = cache.view(-1, rank + rope)
    ok = feeds["slot_mapping"] >= 0
    flat[feeds["slot_mapping"][ok]] = feeds["kv"][ok, 0]
    w_heads = w.view(heads, nope + v_dim, rank)
    qsl, lens = feeds["query_start_loc"].tolist(), feeds["seq_lens"].tolist()
    for s, n_total in enumerate(lens):
        rows = [feeds["block_tables"][s, p // block] * block + p % block for p in range(n_total)]
        c = flat[torch.tensor(rows)]                                  # [L, R + rope]
        k = torch.cat([torch.einsum("lr,hdr->lhd", c[:, :rank], w_heads[:, :nope]),
                       c[:, None, rank:].expand(-1, heads, -1)], -1)   # [L, H, nope + rope]
        v = torch.einsum("lr,hvr->lhv", c[:, :rank], w_heads[:, nope:])
        for i, t in enumerate(range(qsl[s], qsl[s + 1])):
            pos = n_total - (qsl[s + 1] - qsl[s]) + i
            scores = torch.einsum("hd,lhd->hl", feeds["q"][t], k[:pos + 1]) * 0.3
            want = torch.einsum("hl,lhv->hv", scores.softmax(-1), v[:pos + 1])
            torch.testing.assert_close(got[t], want, atol=1e-5, rtol=1e-5)
    assert (got[qsl[-1]:] == 0).all()


@pytest.mark.parametrize("heads,rank,rope,block", [(128, 512, 64, 16), (16, 512, 64, 64),
                                                   (4, 32, 8, 16)],
                         ids=["deepseek-v3", "deepseek-v3-tp8", "tiny"])
def test_mla_kernels_compile_for_sm80_and_sm90(heads, rank, rope, block):
    g = _graph(heads, rank, rope, block, "bf16")
    for i, node in enumerate(g.nodes):
        kernels = aot_compile_node(g, i)
        assert len(kernels) == 2 and all(k.asm.get("cubin") for k in kernels), node.op
        assert all(k.metadata.shared <= 163 * 1024 for k in kernels)
