"""KV cache groups: which layers share a block table (compile side of the hybrid cache).

Layers attend in one of a few ways: full attention, or a sliding window of W tokens
(Mistral's every layer, Gemma 3 and 4's local layers). A sliding-window layer needs only
the last W keys, so the runtime can release a sequence's older blocks for those layers
while full-attention layers keep theirs (runtime/hybrid_cache.py). That needs one block
table, and one slot mapping, per kind: a KV cache group.

`assign_kv_groups` finds each attention op's layer (its cache input) and window, orders
the groups full attention first, then windows ascending, and rewires the cache writes
and attention ops of group g > 0 to read `slot_mapping.g<g>` and `block_tables.g<g>`
(ir/contract.py). Group 0 keeps the contract's own inputs, so a model with one kind of
attention (Llama, or Mistral with every layer windowed) has the same graph as before.
A layer that shares an earlier layer's cache (Gemma 4) has no cache of its own and
belongs to the group of the cache it reads, which must have the same window. The
groups go into the manifest (`"kv_groups"`): `[{"window": W, "layers": [...]}, ...]`,
window 0 meaning full attention.

Before:

    cache_write(%k, %v, %k_cache.0, %v_cache.0, %slot_mapping)
    %o = paged_attention(%q, %k_cache.0, %v_cache.0, %query_start_loc, %seq_lens,
                         %block_tables) {scale=0.25, sliding_window=8}

after, when layer 0 is in group 1 (a full-attention group exists):

    cache_write(%k, %v, %k_cache.0, %v_cache.0, %slot_mapping.g1)
    %o = paged_attention(%q, %k_cache.0, %v_cache.0, %query_start_loc, %seq_lens,
                         %block_tables.g1) {scale=0.25, sliding_window=8}
"""

from __future__ import annotations

from braze.ir import Graph
from braze.ir.contract import group_step_inputs
from braze.ir.errors import BrazeError

_WRITES = {"cache_write": (2, 4), "latent_cache_write": (1, 2)}     # op: (cache, slots)
_READS = {"paged_attention": (1, 5), "mla_attention": (1, 5)}       # op: (cache, tables)


def _layer(name: str) -> int:
    return int(name.rsplit(".", 1)[1])


def assign_kv_groups(graph: Graph) -> list[dict]:
    """Group the layers by window, rewire groups > 0 to their own step inputs; returns
    the manifest's `kv_groups`. Call on the traced graph, before any pass."""
    window_of: dict[int, int] = {}
    for node in graph.nodes:
        if node.op in _READS:
            ci, _ = _READS[node.op]
            layer = _layer(node.operands[ci].name)
            w = int(node.attrs.get("sliding_window") or 0)
            if window_of.setdefault(layer, w) != w:
                raise BrazeError(f"layers reading the KV cache of layer {layer} have different "
                                 f"sliding windows ({window_of[layer]} and {w}); they cannot "
                                 f"share one cache")
    if not window_of:
        raise BrazeError(f"graph @{graph.name} has no attention over a KV cache")
    windows = sorted(set(window_of.values()))
    group_of = {w: g for g, w in enumerate(windows)}
    inputs = {v.name: v for v in graph.inputs}
    extra = {}
    for g in range(1, len(windows)):
        for name, t in group_step_inputs(g).items():
            extra[name] = inputs.get(name) or graph.add_input(name, t)
    for node in graph.nodes:
        where = _WRITES.get(node.op) or _READS.get(node.op)
        if where is None:
            continue
        ci, ti = where
        g = group_of[window_of[_layer(node.operands[ci].name)]]
        if g == 0:
            continue
        ops = list(node.operands)
        which = "slot_mapping" if node.op in _WRITES else "block_tables"
        ops[ti] = extra[f"{which}.g{g}"]
        node.operands = ops
    return [{"window": w, "layers": sorted(layer for layer, lw in window_of.items() if lw == w)}
            for w in windows]
