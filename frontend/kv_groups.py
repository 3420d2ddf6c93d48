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
window 0 meaning full attention. Where every layer's caches have one shape, each kind's
layers are cut into groups of at most the smallest kind's layer count (`_split_equal`), so
several groups may have one window: their blocks then share one pool of equal pages.

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
from braze.ir.contract import CACHE_PREFIXES, group_step_inputs
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
    kinds = [(w, sorted(layer for layer, lw in window_of.items() if lw == w))
             for w in sorted(set(window_of.values()))]
    groups = _split_equal(graph, kinds)
    group_of = {layer: g for g, (_, layers) in enumerate(groups) for layer in layers}
    inputs = {v.name: v for v in graph.inputs}
    extra = {}
    for g in range(1, len(groups)):
        for name, t in group_step_inputs(g).items():
            extra[name] = inputs.get(name) or graph.add_input(name, t)
    for node in graph.nodes:
        where = _WRITES.get(node.op) or _READS.get(node.op)
        if where is None:
            continue
        ci, ti = where
        g = group_of[_layer(node.operands[ci].name)]
        if g == 0:
            continue
        ops = list(node.operands)
        which = "slot_mapping" if node.op in _WRITES else "block_tables"
        ops[ti] = extra[f"{which}.g{g}"]
        node.operands = ops
    return [{"window": w, "layers": layers} for w, layers in groups]


def _split_equal(graph: Graph, kinds: list[tuple[int, list[int]]]) -> list[tuple[int, list[int]]]:
    """vLLM's layout for a hybrid cache's shared pool: with more than one kind of attention
    and every layer's caches of one shape, each kind's layers cut into groups of at most
    the smallest kind's layer count (a table each), so that one block of any group is
    (nearly) the same bytes, and one pool of such pages serves them all without waste
    (runtime/hybrid_cache.py). Gemma 3's 5 global and 29 local layers: 1 + 6 groups."""
    if len(kinds) < 2:
        return kinds
    shapes: dict[int, list] = {}
    for v in graph.inputs:
        if v.name.startswith(CACHE_PREFIXES):
            shapes.setdefault(_layer(v.name), []).append(
                (v.name.rsplit(".", 1)[0], tuple(v.type.shape[1:]), str(v.type.dtype)))
    if len({tuple(sorted(x)) for x in shapes.values()}) != 1:
        return kinds            # layers of different sizes: no page fits them all
    k = min(len(layers) for _, layers in kinds)
    return [(w, layers[i:i + k]) for w, layers in kinds for i in range(0, len(layers), k)]
