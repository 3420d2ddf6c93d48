"""Expert parallelism in the shard pass (`--expert-parallel`): whole experts per rank.

The meaning is checked on the IR's reference interpreter: each rank's graph, run on that
rank's weights (the shard records, as the compiler cuts them), gives a partial MoE output;
the sum over ranks (what the `all_reduce` computes) equals the unsharded graph, both in
the dense form the shard pass sees and after fuse-moe made it `fused_moe` /
`fused_moe_routed` with `local_experts`. The end-to-end check over gloo process groups is
tests/test_expert_parallel.py."""

from __future__ import annotations

import textwrap

import pytest
import torch

from braze.ir import get_op, parse_graph, print_graph, run_graph, verify
from braze.ir.errors import BrazeError
from braze.passes.shard import rank_loader
from pass_helpers import run_passes

# Qwen3-MoE's dense form (the fuse_moe pass docstring's), E experts, top 2, renormalised
SOFTMAX_MOE = """
graph @g(%x: f32[T, 16]) {{
  param @router: f32[{e}, 16]
  param @gate: f32[{e}, 8, 16]
  param @up: f32[{e}, 8, 16]
  param @down: f32[{e}, 16, 8]
  %0: f32[T, {e}] = linear(%x, @router)
  %1: f32[T, {e}] = softmax(%0) {{dim=-1, dtype="f32"}}
  %2: f32[T, 2], %3: i64[T, 2] = topk(%1) {{k=2}}
  %4: f32[T, 1] = sum(%2) {{dims=[-1], keepdim=true}}
  %5: f32[T, 2] = div(%2, %4)
  %6: f32[T, {e}] = full_like(%1) {{value=0.0}}
  %7: f32[T, {e}] = scatter(%6, %3, %5) {{dim=1}}
  %8: f32[T, {e}, 8] = einsum(%x, @gate) {{equation="th,eih->tei"}}
  %9: f32[T, {e}, 8] = einsum(%x, @up) {{equation="th,eih->tei"}}
  %10: f32[T, {e}, 8] = silu(%8)
  %11: f32[T, {e}, 8] = mul(%10, %9)
  %12: f32[T, {e}, 16] = einsum(%11, @down) {{equation="tei,ehi->teh"}}
  %13: f32[T, 16] = einsum(%7, %12) {{equation="te,teh->th"}}
  return out=%13
}}
"""

# DeepSeek-V3-like: the graph routes itself (sigmoid scores, top-k, scaled weights)
ROUTED_MOE = """
graph @g(%x: f32[T, 16]) {{
  param @router: f32[{e}, 16]
  param @gate: f32[{e}, 8, 16]
  param @up: f32[{e}, 8, 16]
  param @down: f32[{e}, 16, 8]
  %0: f32[T, {e}] = linear(%x, @router)
  %1: f32[T, {e}] = sigmoid(%0)
  %2: f32[T, 2], %3: i64[T, 2] = topk(%1) {{k=2}}
  %4: f32[T, 2] = mul(%2) {{scalar=2.5}}
  %6: f32[T, {e}] = full_like(%1) {{value=0.0}}
  %7: f32[T, {e}] = scatter(%6, %3, %4) {{dim=1}}
  %8: f32[T, {e}, 8] = einsum(%x, @gate) {{equation="th,eih->tei"}}
  %9: f32[T, {e}, 8] = einsum(%x, @up) {{equation="th,eih->tei"}}
  %10: f32[T, {e}, 8] = silu(%8)
  %11: f32[T, {e}, 8] = mul(%10, %9)
  %12: f32[T, {e}, 16] = einsum(%11, @down) {{equation="tei,ehi->teh"}}
  %13: f32[T, 16] = einsum(%7, %12) {{equation="te,teh->th"}}
  return out=%13
}}
"""


def _graph(text, e):
    g = parse_graph(textwrap.dedent(text.format(e=e)))
    verify(g)
    return g


def _weights(e, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = {"router": torch.randn(e, 16, generator=gen), "gate": torch.randn(e, 8, 16, generator=gen),
         "up": torch.randn(e, 8, 16, generator=gen), "down": torch.randn(e, 16, 8, generator=gen)}
    return w


def _params(g, load):
    """The graph's params: derived ones (fuse-moe's gate_up) from their recipes."""
    out = {}
    for name, p in g.params.items():
        r = p.recipe
        out[name] = load(name) if r is None else r.opdef.impl(
            *[load(s.name) for s in r.operands], **r.attrs).contiguous()
    return out


def _rank_sum(text, e, n, passes, monkeypatch, seed=0):
    whole = _weights(e, seed)
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(seed + 1))
    ref = run_graph(_graph(text, e), {"x": x}, whole)["out"]
    g, ctx = run_passes(_graph(text, e), ["shard"] + passes, tensor_parallel_size=n,
                        expert_parallel=True)
    shards = ctx.records["shards"]
    # the sum over ranks is the all_reduce's job; here each rank's partial is kept
    monkeypatch.setattr(get_op("all_reduce"), "impl", lambda x, group_size: x.clone())
    total = torch.zeros_like(ref)
    for r in range(n):
        total += run_graph(g, {"x": x}, _params(g, rank_loader(whole.__getitem__, shards, r)))["out"]
    return g, shards, ref, total


@pytest.mark.parametrize("text", [SOFTMAX_MOE, ROUTED_MOE], ids=["softmax", "routed"])
@pytest.mark.parametrize("e,n", [(4, 2), (8, 4)])
def test_ranks_sum_to_the_unsharded_moe_dense_form(text, e, n, monkeypatch):
    g, shards, ref, total = _rank_sum(text, e, n, [], monkeypatch)
    torch.testing.assert_close(total, ref, atol=1e-5, rtol=1e-5)
    k = e // n
    for name in ("gate", "up", "down"):
        assert shards[name] == {"dim": 0, "ranges": [[r * k, (r + 1) * k] for r in range(n)],
                                "experts": True}
    assert "router" not in shards                       # replicated: every rank routes
    assert shards["ep.experts"] == {"values": [list(range(r * k, (r + 1) * k)) for r in range(n)]}
    text_out = print_graph(g)
    assert f"param @gate: f32[{k}, 8, 16]" in text_out
    assert "index_select(%7, @ep.experts) {dim=1}" in text_out
    assert [nd.op for nd in g.nodes].count("all_reduce") == 1


@pytest.mark.parametrize("text,op", [(SOFTMAX_MOE, "fused_moe"), (ROUTED_MOE, "fused_moe_routed")],
                         ids=["softmax", "routed"])
def test_ranks_sum_to_the_unsharded_moe_after_fuse_moe(text, op, monkeypatch):
    g, shards, ref, total = _rank_sum(text, 4, 2, ["fuse-moe"], monkeypatch, seed=3)
    torch.testing.assert_close(total, ref, atol=1e-5, rtol=1e-5)
    (fused,) = [nd for nd in g.nodes if nd.op == op]
    assert fused.attrs["local_experts"] == 2 and fused.operands[-1].name == "ep.experts"
    assert "index_select" not in g.op_counts() and "einsum" not in g.op_counts()


def test_tensor_parallel_without_the_flag_splits_the_intermediate_instead():
    g, ctx = run_passes(_graph(SOFTMAX_MOE, 4), ["shard"], tensor_parallel_size=2)
    shards = ctx.records["shards"]
    assert shards["gate"]["dim"] == 1 and "ep.experts" not in shards


def test_uneven_experts_are_refused_naming_the_dimension():
    with pytest.raises(BrazeError, match=r"num_experts \(6, dim 0 of @(gate|up|down)\) is not "
                                         r"divisible by --tensor-parallel-size 4"):
        run_passes(_graph(SOFTMAX_MOE, 6), ["shard"], tensor_parallel_size=4, expert_parallel=True)


def test_expert_parallel_needs_more_than_one_rank():
    with pytest.raises(BrazeError, match=r"--expert-parallel needs --tensor-parallel-size > 1"):
        run_passes(_graph(SOFTMAX_MOE, 4), ["shard"], tensor_parallel_size=1, expert_parallel=True)


def test_expert_parallel_on_a_dense_model_is_refused():
    dense = """
    graph @g(%x: f32[T, 8]) {
      param @w: f32[8, 8]
      %0: f32[T, 8] = linear(%x, @w)
      return out=%0
    }
    """
    with pytest.raises(BrazeError, match="no mixture-of-experts layer"):
        run_passes(parse_graph(textwrap.dedent(dense)), ["shard"], tensor_parallel_size=2,
                   expert_parallel=True)
