"""fuse-attention: the attention primitive -> the kernel op, with what a kernel needs.

The model's `paged_attention` states what to compute; `attention` is the op the
Triton template implements: one launch for a mixed prefill + decode batch,
with the GQA shape (num_heads, num_kv_heads, head_dim), scale, sliding window
and causality as attributes, and its output already flattened to
[T, heads * head_dim] so the reshape before the output projection disappears.

Before:
    %55: f32[T, 4, 16] = paged_attention(%47, %k_cache.0, %v_cache.0, %query_start_loc, %seq_lens, %block_tables) {scale=0.25}
    %56: f32[T, 64] = reshape(%55) {shape=[-1, 64]}
After:
    %56: f32[T, 64] = attention(%47, %k_cache.0, %v_cache.0, %query_start_loc, %seq_lens, %block_tables) {scale=0.25, num_heads=4, num_kv_heads=2, head_dim=16}

A `paged_attention` whose output is used other than by that one flattening
reshape still becomes `attention`, followed by a reshape back to [T, heads, dim].
"""

from __future__ import annotations

from braze.ir import Graph, Node

from .manager import PassContext, register_pass
from .rewrite import Rewriter, Rule, rewrite


# after fuse-rope: it pairs q and k through the operands of the attention primitive
@register_pass("fuse-attention", after=("fuse-rope",))
def fuse_attention(g: Graph, ctx: PassContext) -> int:
    """paged_attention (+ the reshape that flattens its heads) -> attention."""
    return rewrite(g, ctx, [Rule("paged_attention", _fuse)])


def _fuse(node: Node, rw: Rewriter):
    g = rw.g
    q, k_cache = node.operands[0], node.operands[1]
    heads, dim, kv_heads = q.type.shape[1], q.type.shape[2], k_cache.type.shape[2]
    if not all(isinstance(d, int) for d in (heads, dim, kv_heads)):
        return f"head counts must be concrete, got q {q.type} and cache {k_cache.type}"
    out = node.results[0]
    out_dim = out.type.shape[2]
    attrs = dict(node.attrs, num_heads=heads, num_kv_heads=kv_heads, head_dim=dim)
    with g.inserting_before(node):
        flat = g.op("attention", *node.operands, **attrs)
    readers = g.users(out)
    flattening = [u for u in readers if u.op == "reshape"
                  and list(u.attrs["shape"]) in ([-1, heads * out_dim], [out.type.shape[0], heads * out_dim])]
    rw.replace([u.results[0] for u in flattening], [flat] * len(flattening), dead=flattening)
    if len(flattening) != len(readers) or out in g.outputs.values():
        with g.inserting_before(node):
            unflat = g.op("reshape", flat, shape=[-1, heads, out_dim])
        g.replace_all_uses(out, unflat)
    rw.erase_dead([node])
    return 1
