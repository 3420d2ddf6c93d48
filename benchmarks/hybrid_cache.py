#!/usr/bin/env python
"""KV-cache bytes per token with and without window freeing, for a Gemma-3-like 5:1 mix
of sliding-window (local) and full-attention (global) layers at a long context.

The shape's config.json alone is written (no weights); the model is traced
(`load_model(..., with_weights=False)`), its KV cache groups assigned as `braze compile`
does (frontend/kv_groups.py) and the runtime's `KVCache` built from the graph, so each
group's bytes per block are what `braze serve` allocates. One request is then driven
through the runtime's `HybridBlockManager` the way the scheduler drives it (chunked
prefill of `--context` tokens in `--chunk`-token steps, then `--decode` decode steps:
`slide`, `reserve`, `commit` per step), and the blocks each group holds are counted at
the peak and at the end. Without window freeing every layer holds every block (the plain
`BlockManager`, one table): that is the `off` row.

Then the serving view: for a KV budget (`--kv-gib`), how many tokens the full-attention
pool holds once the window pools are sized as the runtime sizes them
(`window_pool_blocks` for `--max-num-seqs` and `--max-num-tokens`), against one table.

Then, with `--traffic`, what a KV budget holds under traffic (the runtime's
`HybridBlockManager` driven as the scheduler drives it): how many requests of a short
and of a long prompt run at once (each prefilled in chunks, window blocks released
behind it), and after a stream of distinct prompts, how many of them a later request
still hits the whole prefix of (the prefix cache). Three layouts of the same bytes:
separate pools with one group per window, as before (each window pool sized by
`window_pool_blocks`, the rest for the full-attention group); one pool those groups
share (pages as `KVCache.share` lays them out: a page holds one block of the largest
group, so a full-attention block leaves most of its page unused; the runtime refuses
it); and one shared pool over the groups `braze compile` now makes, cut to equal layer
counts (vLLM's layout: the 29 local layers become 6 groups with a table each, a page
is 5 layers).

    python benchmarks/hybrid_cache.py
    python benchmarks/hybrid_cache.py --context 32768 --chunk 2048 --decode 256
    python benchmarks/hybrid_cache.py --traffic --kv-gib 40 --short 512 --long 16384
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile

from arg_checks import at_least


def gemma3_4b_like():
    """Gemma 3 4B's text shape: 34 layers, every 6th global (5:1), window 1024, 4 KV heads
    of 256, bf16."""
    from braze.tiny import tiny_config
    layers = 34
    return tiny_config(
        "gemma3", vocab_size=262208, hidden_size=2560, intermediate_size=10240,
        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
        query_pre_attn_scalar=256, sliding_window=1024, max_position_embeddings=131072,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                     for i in range(layers)])


def measure(context: int, chunk: int, decode: int, block_size: int, dtype: str) -> dict:
    from braze.frontend import load_model
    from braze.frontend.kv_groups import assign_kv_groups
    from braze.runtime.hybrid_cache import HybridBlockManager, KVGroup
    from braze.runtime.kv_cache import KVCache
    cfg = gemma3_4b_like()
    with tempfile.TemporaryDirectory() as d:
        cfg.save_pretrained(d)
        with contextlib.redirect_stderr(io.StringIO()):
            loaded = load_model(d, dtype=dtype, block_size=block_size, with_weights=False)
    groups = [KVGroup(e["window"], tuple(e["layers"])) for e in assign_kv_groups(loaded.graph)]
    cache = KVCache(loaded.graph, num_blocks=1)
    per_block = [cache.bytes_per_block_of(cache.group_names(g.layers)) for g in groups]
    total = context + decode
    full_blocks = -(-total // block_size)
    bm = HybridBlockManager(groups, [full_blocks + 1] * len(groups), block_size,
                            enable_prefix_caching=True, max_chunk=chunk)
    tokens = list(range(total))
    bm.allocate("r", tokens[:context])
    peak = [0] * len(groups)
    start = 0
    while start < total:
        end = min(context, start + chunk) if start < context else start + 1
        bm.slide("r", start)
        assert bm.reserve("r", end)
        bm.commit("r", end, tokens)
        for g in range(len(groups)):
            peak[g] = max(peak[g], bm.group_used_blocks(g))
        start = end
    final = [bm.group_used_blocks(g) for g in range(len(groups))]
    return {"groups": groups, "per_block": per_block, "peak": peak, "final": final,
            "tokens": total, "full_blocks": full_blocks, "dtype": loaded.dtype,
            "cache": cache}


def capacity(r: dict, kv_bytes: int, block_size: int, max_num_seqs: int,
             max_num_tokens: int) -> dict:
    """Tokens a KV budget holds with one table, and with window pools sized by the runtime's
    formula and the rest for the full-attention groups' blocks."""
    from braze.runtime.hybrid_cache import window_pool_blocks
    off_blocks = kv_bytes // sum(r["per_block"])
    window = sum(per * window_pool_blocks(g.window, block_size, max_num_seqs, max_num_tokens,
                                          1 << 40)
                 for g, per in zip(r["groups"], r["per_block"]) if g.window)
    full_per = sum(per for g, per in zip(r["groups"], r["per_block"]) if not g.window)
    on_blocks = (kv_bytes - window) // full_per
    return {"off_tokens": off_blocks * block_size, "on_tokens": on_blocks * block_size,
            "window_bytes": window}


def by_window(groups):
    """One group per window (the layout before groups were cut to equal layer counts)."""
    from braze.runtime.hybrid_cache import KVGroup
    windows = sorted({g.window for g in groups})
    return [KVGroup(w, tuple(sorted(x for g in groups if g.window == w for x in g.layers)))
            for w in windows]


def layouts(r: dict, kv_bytes: int, block_size: int, max_num_seqs: int,
            max_num_tokens: int) -> list[tuple]:
    """(name, groups, blocks: per-group pool sizes or one shared pool's, page bytes) of
    each layout of `kv_bytes`."""
    from braze.runtime.hybrid_cache import share_pool, window_pool_blocks
    cache = r["cache"]
    names = lambda gs: [cache.group_names(g.layers) for g in gs]     # noqa: E731
    merged = by_window(r["groups"])
    per = [cache.bytes_per_block_of(n) for n in names(merged)]
    window = [window_pool_blocks(g.window, block_size, max_num_seqs, max_num_tokens, 1 << 40)
              if g.window else 0 for g in merged]
    rest = kv_bytes - sum(n * p for n, p in zip(window, per))
    full_per = sum(p for g, p in zip(merged, per) if not g.window)
    separate = [n or rest // full_per for n in window]
    out = [("separate pools, a group per window (before)", merged, separate, None)]
    for name, gs in (("one shared pool, a group per window", merged),
                     ("one shared pool, groups cut to equal layers (now)", r["groups"])):
        page = cache.page_bytes(names(gs))
        name += "" if share_pool(cache, names(gs)) else " [refused: wastes pages]"
        out.append((name, gs, kv_bytes // page, page))
    return out


def _prefill(bm, sid, tokens, chunk: int) -> bool:
    start = 0
    while start < len(tokens):
        end = min(len(tokens), start + chunk)
        bm.slide(sid, start)
        if not bm.reserve(sid, end):
            return False
        bm.commit(sid, end, tokens)
        start = end
    bm.slide(sid, start)        # as its first decode step is scheduled
    return True


def traffic(groups, blocks, block_size: int, chunk: int, prompt_len: int,
            limit: int = 100_000) -> dict:
    """Requests of `prompt_len` distinct tokens: how many run at once (admitted and
    prefilled, until the next does not fit), and after a stream of them served one after
    another, how many of the most recent a request still hits the whole prefix of."""
    from braze.runtime.hybrid_cache import HybridBlockManager
    prompt = lambda i: list(range(i * prompt_len, (i + 1) * prompt_len))     # noqa: E731
    bm = HybridBlockManager(groups, blocks, block_size, max_chunk=chunk)
    running = 0
    while running < limit:
        t = prompt(running)
        if not bm.can_allocate(t):
            break
        bm.allocate(running, t)
        if not _prefill(bm, running, t, chunk):
            bm.free(running)
            break
        running += 1
    bm = HybridBlockManager(groups, blocks, block_size, max_chunk=chunk)
    served = 2 * running + 8          # more than the pool holds at once
    for i in range(served):
        t = prompt(i)
        bm.allocate(i, t)
        assert _prefill(bm, i, t, chunk)
        bm.free(i)
    hits = 0
    for i in reversed(range(served)):       # the most recent first
        if bm.cached_prefix_blocks(prompt(i) + [0]) < prompt_len // block_size:
            break
        hits += 1
    return {"running": running, "cached_prompts": hits}


def print_traffic(r: dict, a) -> None:
    bs = a.block_size
    kv = int(a.kv_gib * (1 << 30))
    print()
    print(f"Traffic: {a.kv_gib:g} GiB of KV, window pools (separate) for {a.max_num_seqs} "
          f"sequences and {a.max_num_tokens}-token steps; prompts prefilled in {a.chunk}-token "
          f"chunks")
    print("| layout | groups | page bytes | blocks | prompt | running at once | "
          "prompts whose prefix still hits |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for name, groups, blocks, page in layouts(r, kv, bs, a.max_num_seqs, a.max_num_tokens):
        shown = f"{blocks:,}" if isinstance(blocks, int) else " + ".join(f"{b:,}" for b in blocks)
        for n in (a.short, a.long):
            t = traffic(groups, blocks, bs, a.chunk, n)
            print(f"| {name} | {len(groups)} | {f'{page:,}' if page else '-'} | {shown} | {n:,} | "
                  f"{t['running']:,} | {t['cached_prompts']:,} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=32768, help="prompt tokens (default 32768)")
    ap.add_argument("--chunk", type=int, default=2048,
                    help="prefill tokens per step (default 2048)")
    ap.add_argument("--decode", type=int, default=256, help="decode steps after (default 256)")
    ap.add_argument("--block-size", type=int, default=16, help="tokens per block (default 16)")
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "float16", "bfloat16"), 
                    help="cache dtype (default bfloat16)")
    ap.add_argument("--kv-gib", type=float, default=40.0,
                    help="KV budget for the serving view, GiB (default 40)")
    ap.add_argument("--max-num-seqs", type=int, default=64,
                    help="running sequences the window pools are sized for (default 64)")
    ap.add_argument("--max-num-tokens", type=int, default=8192,
                    help="tokens per step the window pools are sized for (default 8192)")
    ap.add_argument("--traffic", action="store_true",
                    help="also: requests at once and prefixes cached, per pool layout")
    ap.add_argument("--short", type=int, default=512, help="short prompt (default 512)")
    ap.add_argument("--long", type=int, default=16384, help="long prompt (default 16384)")
    a = ap.parse_args(argv)
    at_least(ap, a, context=1, chunk=1, decode=0, block_size=1, max_num_seqs=1,
             max_num_tokens=1, short=1, long=1)
    if a.block_size & (a.block_size - 1):
        ap.error(f"--block-size {a.block_size}: give a power of two, as braze compile takes")
    if a.kv_gib <= 0:
        ap.error(f"--kv-gib {a.kv_gib}: give a positive budget")
    r = measure(a.context, a.chunk, a.decode, a.block_size, a.dtype)
    n, bs = r["tokens"], a.block_size
    print(f"Gemma-3-4B-like, {r['dtype']}, {n} tokens ({a.context} prompt in {a.chunk}-token "
          f"chunks + {a.decode} decode), block {bs}")
    print("| group | layers | bytes/block | blocks held: off | peak | end |")
    print("|---|--:|--:|--:|--:|--:|")
    for g, per, pk, fin in zip(r["groups"], r["per_block"], r["peak"], r["final"]):
        kind = f"window {g.window}" if g.window else "full"
        print(f"| {kind} | {len(g.layers)} | {per:,} | {r['full_blocks']:,} | {pk:,} | {fin:,} |")
    off = sum(r["per_block"]) * r["full_blocks"]
    peak = sum(p * k for p, k in zip(r["per_block"], r["peak"]))
    end = sum(p * k for p, k in zip(r["per_block"], r["final"]))
    print()
    print("| window freeing | KV bytes held | bytes per token | vs off |")
    print("|---|--:|--:|--:|")
    print(f"| off | {off:,} | {off // n:,} | 1.00 |")
    print(f"| on, peak | {peak:,} | {peak // n:,} | {peak / off:.3f} |")
    print(f"| on, end | {end:,} | {end // n:,} | {end / off:.3f} |")
    c = capacity(r, int(a.kv_gib * (1 << 30)), bs, a.max_num_seqs, a.max_num_tokens)
    print()
    print(f"Serving view: {a.kv_gib:g} GiB of KV, window pools for {a.max_num_seqs} sequences "
          f"and {a.max_num_tokens}-token steps ({c['window_bytes'] / (1 << 30):.2f} GiB)")
    print("| window freeing | tokens the full-attention layers hold | vs off |")
    print("|---|--:|--:|")
    print(f"| off | {c['off_tokens']:,} | 1.00 |")
    print(f"| on | {c['on_tokens']:,} | {c['on_tokens'] / c['off_tokens']:.2f} |")
    if a.traffic:
        print_traffic(r, a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
