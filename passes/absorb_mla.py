"""absorb-mla: multi-head latent attention, expanded -> absorbed (W_UK into q, W_UV after).

The model states MLA in its expanded form: the cached latents are multiplied by
kv_b_proj into per-head keys and values (ir/op_mla.py). Since q_nope . (c W_UK^T) =
(q_nope W_UK) . c, the per-head key expansion can be folded into the query instead, and
the value expansion moved after the attention: the attention then reads each cached
latent row once for all heads (the `latent_attention` kernel, codegen/kernels/mla.py),
and no step ever materialises per-head K and V. W_UK and W_UV are derived from
kv_b_proj's weight at compile time, so the artifact ships them per head.

Before (tiny DeepSeek-V3: 4 heads, nope 16, rope 8, v 12, kv_lora_rank 32):
    %60: f32[T, 4, 12] = mla_attention(%58, %kv_latent.0, @model.layers.0.self_attn.kv_b_proj.weight, %query_start_loc, %seq_lens, %block_tables) {scale=0.2646, kv_lora_rank=32}
After:
    param @model.layers.0.self_attn.kv_b_proj.per_head: f32[4, 28, 32] = reshape(@model.layers.0.self_attn.kv_b_proj.weight) {shape=[4, 28, 32]}
    param @model.layers.0.self_attn.kv_b_proj.w_uk: f32[4, 16, 32] = slice(@...per_head) {dim=1, start=0, end=16}
    param @model.layers.0.self_attn.kv_b_proj.w_uv: f32[4, 12, 32] = slice(@...per_head) {dim=1, start=16, end=28}
    %61: f32[T, 4, 16] = slice(%58) {dim=2, start=0, end=16}
    %62: f32[T, 4, 8] = slice(%58) {dim=2, start=16, end=24}
    %63: f32[T, 4, 32] = einsum(%61, @...w_uk) {equation="thd,hdr->thr"}
    %64: f32[T, 4, 40] = cat(%63, %62) {dim=2}
    %65: f32[T, 4, 32] = latent_attention(%64, %kv_latent.0, %query_start_loc, %seq_lens, %block_tables) {scale=0.2646, kv_lora_rank=32}
    %60: f32[T, 4, 12] = einsum(%65, @...w_uv) {equation="thr,hvr->thv"}

The absorbed form is used for every token, prefill included (one launch for a mixed
step); a long prefill pays R + rope instead of nope + rope per key and head for it.

Refused, with the reason (`--explain`): a kv_b weight that is computed in the graph
rather than a checkpoint param (it could not be split at compile time), or shapes that
are not concrete.
"""

from __future__ import annotations

from braze.ir import Graph, Node

from .manager import PassContext, register_pass
from .rewrite import Rewriter, Rule, rewrite


@register_pass("absorb-mla", after=("fuse-attention",))
def absorb_mla(g: Graph, ctx: PassContext) -> int:
    """mla_attention (expanded K/V) -> W_UK-absorbed q, latent_attention, W_UV."""
    return rewrite(g, ctx, [Rule("mla_attention", _absorb, explain="MLA not absorbed: ")])


def _absorb(node: Node, rw: Rewriter):
    g = rw.g
    q, cache, w, qsl, seq_lens, tables = node.operands
    rank = int(node.attrs["kv_lora_rank"])
    out = node.results[0]
    heads, qk, row, v_dim = q.type.shape[1], q.type.shape[2], cache.type.shape[3], out.type.shape[2]
    if not all(isinstance(d, int) for d in (heads, qk, row, v_dim)):
        return f"head counts and dims must be concrete, got q {q.type} and cache {cache.type}"
    if w.kind != "param":
        return (f"w_kv_b {w.ref} is computed in the graph, not a weight; the absorbed form "
                f"splits it into W_UK and W_UV at compile time")
    rope = row - rank
    nope = qk - rope
    base = w.name[: -len(".weight")] if w.name.endswith(".weight") else w.name
    per_head = g.add_derived_param(g.unique_param_name(base + ".per_head"), "reshape", [w],
                                   {"shape": [heads, nope + v_dim, rank]})
    w_uk = g.add_derived_param(g.unique_param_name(base + ".w_uk"), "slice", [per_head],
                               {"dim": 1, "start": 0, "end": nope})
    w_uv = g.add_derived_param(g.unique_param_name(base + ".w_uv"), "slice", [per_head],
                               {"dim": 1, "start": nope, "end": nope + v_dim})
    with g.inserting_before(node):
        q_nope = g.op("slice", q, dim=2, start=0, end=nope)
        q_rope = g.op("slice", q, dim=2, start=nope, end=qk)
        q_lat = g.op("einsum", q_nope, w_uk, equation="thd,hdr->thr")
        q_abs = g.op("cat", q_lat, q_rope, dim=2)
        o_lat = g.op("latent_attention", q_abs, cache, qsl, seq_lens, tables,
                     scale=node.attrs["scale"], kv_lora_rank=rank)
        o = g.op("einsum", o_lat, w_uv, equation="thr,hvr->thv")
    rw.replace(out, o, dead=[node])
    return 1
