"""A hybrid KV cache: one block table per KV cache group, over one pool the groups share
(or a pool each), and sliding-window groups that hold only the blocks inside their window.

An artifact records its KV cache groups in the manifest (`"kv_groups"`, written by
frontend/kv_groups.py): the layers with full attention form one group (window 0), the
layers of each distinct sliding window another. Group 0 reads the batch contract's
`slot_mapping` and `block_tables`; group g > 0 its own `slot_mapping.g<g>` and
`block_tables.g<g>` (ir/contract.py `group_step_inputs`). With separate pools each
group's layers have cache tensors of their own pool size, so a block id means a block of
that group's pool only; with a shared pool (below) block b is one page of memory, held
by one group at a time.

A sliding-window layer with window W lets the token at position p see keys at
positions > p - W. Once a sequence's next token to compute is at `start`, no token it
will ever compute sees a key below `start - W + 1`, so the blocks wholly below that
position are released (`slide`) and their table entries become the null block (block
0 of a window pool, never handed out; the attention masks it, and it stays all zeros).
Its blocks are allocated lazily too, only up to the end of the tokens scheduled
(`reserve`), so a 32k prompt prefilled in chunks never holds more than its window and
one chunk. A full-attention group keeps every block, as `BlockManager` does.

Prefix caching works per group over the same chained block hashes: a block enters its
group's prefix cache once its KV is computed (`commit`), and a released one stays there
(LRU) until evicted. A hit of h leading blocks needs, in each full group, blocks 0..h-1
cached, and in a window group only the blocks from `(h*bs - W + 1) // bs` to h-1 (what
the first token computed after the hit sees). The longest h every group can serve is
the hit; when a window group has lost some of those blocks the hit shrinks, down to 0,
never to a wrong answer (vLLM's hybrid allocator does the same).

With KV offload (runtime/kv_offload.py) a block is a tuple of ids, one per group:
`commit` logs the blocks every group still holds for the host tier, and `adopt` takes
loaded blocks into a full group whole and into a window group only inside the window of
the first token left to compute. Speculative decoding's rollback (`truncate`) never
cuts below the last `slide` position.

Each pool is a `BlockManager` used for its free queues, reference counts and prefix
cache; the sequences' tables live here. Pure Python; no torch.

Shared pool (vLLM's hybrid allocator). Separate pools split the memory between groups
once, for one traffic mix: short prompts need as many window blocks as full ones, long
ones far fewer, and a window pool sized for sequences at their window holds few cached
prefixes, so a prefix whose full blocks are still cached stops hitting once its window
blocks are evicted. Given one pool size (`blocks` an int) every group takes its blocks
from ONE pool of pages: one free queue, one LRU of cached blocks (keyed by group and
hash), so the prefix cache keeps whatever the traffic needs. The cache tensors are laid
out so a page id is the same bytes region in every group's layers (runtime/kv_cache.py
`KVCache.share`); block 0 is then the null block of every window group.
"""

from __future__ import annotations

from dataclasses import dataclass

from braze.ir.errors import BrazeError

from .block_manager import BlockManager, hash_computed

NULL_BLOCK = 0          # a window pool's placeholder for blocks that slid out


@dataclass(frozen=True)
class KVGroup:
    """One KV cache group: its sliding window (0 = full attention) and its layers."""
    window: int
    layers: tuple[int, ...]

    @classmethod
    def from_manifest(cls, entries, where: str) -> list["KVGroup"]:
        ok = isinstance(entries, list) and entries and all(
            isinstance(e, dict) and isinstance(e.get("window"), int) and e["window"] >= 0
            and isinstance(e.get("layers"), list) for e in entries)
        if not ok:
            raise BrazeError(f"{where}: its manifest's kv_groups entry is malformed "
                             f"({entries!r}); recompile it with this braze")
        return [cls(e["window"], tuple(int(x) for x in e["layers"])) for e in entries]

    def to_json(self) -> dict:
        return {"window": self.window, "layers": list(self.layers)}


def window_blocks(window: int, block_size: int, chunk: int) -> int:
    """The most blocks one sequence of a window group holds while computing `chunk` new
    tokens: the W - 1 keys before its first new token and the chunk, each possibly
    straddling a block edge."""
    return -(-(window - 1) // block_size) + -(-chunk // block_size) + 1


def window_pool_blocks(window: int, block_size: int, max_num_seqs: int, max_num_tokens: int,
                       full_blocks: int) -> int:
    """A window group's pool: every running sequence at its window plus a decode block,
    and two steps' tokens as chunks (a step's blocks are released only once committed,
    which with async scheduling is a step later), plus the null block; never more than a
    full group would hold (`full_blocks`), plus the null block."""
    per_seq = -(-(window - 1) // block_size) + 3
    want = max_num_seqs * per_seq + 2 * -(-max_num_tokens // block_size) + 1
    return min(want, full_blocks) + 1


class _Seq:
    __slots__ = ("tables", "slid", "num_tokens", "hashes", "registered", "salt", "start")

    def __init__(self, ngroups: int, salt=None):
        self.tables: list[list[int]] = [[] for _ in range(ngroups)]
        self.slid = [0] * ngroups          # leading table entries released (now NULL_BLOCK)
        self.num_tokens = 0
        self.hashes: list[int] = []
        self.registered = 0
        self.salt = salt
        self.start = 0                     # the last `slide` position: computed before it


class HybridBlockManager:
    """The `BlockManager` interface the scheduler, persistent batch and engine use, over
    one pool per KV cache group, or one pool they all share. `blocks[g]` is group g's
    pool size (a window pool's includes its null block); an int `blocks` is the size of
    the one shared pool (its null block included when a group has a window). `max_chunk`
    is the most tokens one step schedules for a sequence (admission keeps that many
    window slots free)."""

    def __init__(self, groups: list[KVGroup], blocks: list[int] | int, block_size: int = 16,
                 enable_prefix_caching: bool = True, max_chunk: int = 8192):
        self.shared = isinstance(blocks, int)
        if not groups or (not self.shared and len(groups) != len(blocks)):
            raise BrazeError(f"{len(groups)} KV cache groups but {blocks!r} pool sizes")
        self.groups = list(groups)
        self.windows = [g.window for g in groups]
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.max_chunk = max_chunk
        self.pools: list[BlockManager] = []
        for g, n in zip(groups, [blocks] * len(groups) if self.shared else blocks):
            if g.window and n < 2:
                raise BrazeError(f"the KV pool of the window-{g.window} group needs at least "
                                 f"2 blocks (one is the null block), got {n}")
            if self.shared and self.pools:
                self.pools.append(self.pools[0])
                continue
            pool = BlockManager(n, block_size, enable_prefix_caching)
            if g.window or (self.shared and any(self.windows)):
                # pin the null block: never free, never handed out
                pool._plain_free.remove(NULL_BLOCK)
                pool._ref[NULL_BLOCK] = 1
            self.pools.append(pool)
        self._used = [0] * len(groups)     # blocks each group holds (ref > 0)
        self._seqs: dict[object, _Seq] = {}
        self._hit_tokens = 0
        self._query_tokens = 0
        # when a list: (seq_id, block index, its id per group) of each block `commit` newly
        # caches that every group still holds, for the engine to offload (runtime/kv_offload.py)
        self.registrations = None

    # ----------------------------------------------------------------- queries

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def num_blocks(self) -> int:
        """Group 0's pool size; a shared pool's blocks that can be handed out (its null
        block not counted)."""
        pool = self.pools[0]
        return pool.num_blocks - (1 if self.shared and pool._ref[NULL_BLOCK] == 1
                                  and any(self.windows) else 0)

    @property
    def num_free_blocks(self) -> int:
        """Free blocks of group 0's pool (of the shared pool: what the engine's block
        stats report)."""
        return self.pools[0].num_free_blocks

    def group_free_blocks(self, g: int) -> int:
        return self.pools[g].num_free_blocks

    def group_used_blocks(self, g: int) -> int:
        """Blocks of group g held by sequences (a window pool's null block not counted)."""
        return self._used[g]

    def _distinct_pools(self) -> list[BlockManager]:
        return self.pools[:1] if self.shared else self.pools

    def _key(self, g: int, h: int):
        """Group g's prefix-cache key of a block hash: a shared pool caches each group's
        copy of a block apart."""
        return (g, h) if self.shared and g else h

    def _take(self, g: int, n: int) -> list[int]:
        self._used[g] += n
        return self.pools[g]._take(n)

    def _hold(self, g: int, b: int) -> None:
        """One more reference to group g's cached block b (a prefix hit)."""
        pool = self.pools[g]
        if pool._ref[b] == 0:
            del pool._cached_free[b]
            self._used[g] += 1
        pool._ref[b] += 1

    def _release(self, g: int, b: int) -> None:
        pool = self.pools[g]
        pool._release(b)
        if pool._ref[b] == 0:
            self._used[g] -= 1

    def block_table(self, seq_id, group: int = 0) -> list[int]:
        return list(self._seq(seq_id).tables[group])

    def table_len(self, seq_id, group: int = 0) -> int:
        return len(self._seqs[seq_id].tables[group])

    def table_since(self, seq_id, start: int, group: int = 0) -> list[int]:
        return self._seq(seq_id).tables[group][start:]

    def num_tokens(self, seq_id) -> int:
        return self._seq(seq_id).num_tokens

    def num_registered(self, seq_id) -> int:
        seq = self._seqs.get(seq_id)
        return 0 if seq is None else seq.registered

    def seq_ids(self) -> list:
        return list(self._seqs)

    def __contains__(self, seq_id) -> bool:
        return seq_id in self._seqs

    def stats(self) -> dict:
        out = {"kv_blocks_total": self.num_blocks, "kv_blocks_free": self.num_free_blocks,
               "kv_blocks_used": sum(self._used) if self.shared else self._used[0],
               "kv_shared_pool": self.shared,
               "prefix_cache_hit_tokens": self._hit_tokens,
               "prefix_cache_queries": self._query_tokens,
               "evictions": sum(p._evictions for p in self._distinct_pools())}
        out["kv_groups"] = [{"window": w, "blocks_total": self.num_blocks if self.shared
                             else p.num_blocks,
                             "blocks_used": self.group_used_blocks(g),
                             "blocks_free": p.num_free_blocks}
                            for g, (w, p) in enumerate(zip(self.windows, self.pools))]
        return out

    # ----------------------------------------------------------------- windows

    def _first_needed(self, g: int, start: int) -> int:
        """Group g's first block that a token at position >= `start` can still see."""
        w = self.windows[g]
        return 0 if not w else max(0, start - w + 1) // self.block_size

    def slide(self, seq_id, start: int) -> None:
        """The sequence's next token to compute is at `start` (every later step computes
        tokens at or after it): release each window group's blocks wholly outside the
        window of that token, once committed (`commit`: with async scheduling the step
        before may still be running, and its blocks should reach the prefix cache)."""
        seq = self._seq(seq_id)
        seq.start = max(seq.start, start)
        for g, w in enumerate(self.windows):
            if not w:
                continue
            table = seq.tables[g]
            # only committed blocks: they enter the prefix cache (and KV offload) first
            upto = min(self._first_needed(g, start), len(table), seq.registered)
            if upto <= seq.slid[g]:
                continue
            for i in range(seq.slid[g], upto):
                if table[i] != NULL_BLOCK:
                    self._release(g, table[i])
                    table[i] = NULL_BLOCK
            seq.slid[g] = upto

    # ----------------------------------------------------------------- hits

    def _chain(self, token_ids, start_hashes, upto, salt):
        return self.pools[0]._chain(token_ids, start_hashes, upto, salt)

    def _hit_blocks(self, hashes: list[int], n: int, use_cache: bool) -> int:
        """The longest prefix (in blocks) every group can serve from its prefix cache,
        leaving at least one token to compute."""
        if not (self.enable_prefix_caching and use_cache):
            return 0
        h = (n - 1) // self.block_size
        for g, w in enumerate(self.windows):
            if w:
                continue
            cached, key = self.pools[g]._cached, self._key
            k = 0
            while k < h and key(g, hashes[k]) in cached:
                k += 1
            h = k
        changed = True
        while changed and h > 0:      # shrinking for one window group may fail another
            changed = False
            for g, w in enumerate(self.windows):
                if not w:
                    continue
                cached, key = self.pools[g]._cached, self._key
                # the largest h' <= h whose window blocks [first_needed(h'), h') are cached
                while h > 0:
                    lo = self._first_needed(g, h * self.block_size)
                    missing = next((i for i in range(h - 1, lo - 1, -1)
                                    if key(g, hashes[i]) not in cached), None)
                    if missing is None:
                        break
                    h, changed = missing, True    # a hit past a missing block needs it
        return h

    def cached_prefix_blocks(self, token_ids, salt=None) -> int:
        hashes = self._chain(token_ids, [], len(token_ids) // self.block_size, salt)
        return self._hit_blocks(hashes, len(token_ids), True)

    # -------------------------------------------------------------- allocation

    def _plan(self, token_ids, use_cache, salt):
        """(hashes, hit blocks h, per group: (first window block, hit blocks taken from its
        cache, new blocks to check for, new blocks taken now)) for admitting this prompt. A
        window group takes one block now (the scheduler's `reserve` grows it to the first
        chunk) but admits only with room for a whole chunk (`max_chunk` tokens)."""
        n = len(token_ids)
        hashes = self._chain(token_ids, [], n // self.block_size, salt)
        h = self._hit_blocks(hashes, n, use_cache)
        plans = []
        for g, w in enumerate(self.windows):
            cached = self.pools[g]._cached
            lo = self._first_needed(g, h * self.block_size)
            hits = [cached[self._key(g, hashes[i])] for i in range(lo, h)]
            if w:
                upto = min(n, h * self.block_size + self.max_chunk)
                need = -(-upto // self.block_size) - h
                now = -(-min(n, h * self.block_size + 1) // self.block_size) - h
            else:
                need = now = -(-n // self.block_size) - h
            plans.append((lo, hits, need, now))
        return hashes, h, plans

    def can_allocate(self, token_ids, watermark: int = 0, use_cache: bool = True,
                     salt=None) -> bool:
        if len(token_ids) == 0:
            return False
        _, _, plans = self._plan(token_ids, use_cache, salt)
        return self._plans_fit(plans, watermark)

    def _plans_fit(self, plans, watermark: int) -> bool:
        if self.shared:         # one pool: every group's new blocks from its free blocks
            return self.pools[0]._fits(sum(p[2] for p in plans),
                                       [b for p in plans for b in p[1]], watermark)
        return all(self.pools[g]._fits(need, hits, watermark if not self.windows[g] else 0)
                   for g, (_, hits, need, _) in enumerate(plans))

    def allocate(self, seq_id, token_ids, use_cache: bool = True, salt=None) -> int:
        if seq_id in self._seqs:
            raise BrazeError(f"sequence {seq_id!r} already has blocks; free it first")
        n = len(token_ids)
        if n == 0:
            raise BrazeError(f"sequence {seq_id!r} has an empty prompt")
        hashes, h, plans = self._plan(token_ids, use_cache, salt)
        if not self._plans_fit(plans, 0):
            need = sum(p[2] for p in plans)
            raise BrazeError(
                f"KV cache exhausted: sequence {seq_id!r} needs {need} more block(s) over "
                f"its {len(plans)} KV cache group(s) for {n} tokens; check can_allocate() "
                f"first")
        seq = _Seq(len(self.groups), salt)
        for g, (lo, hits, _, _) in enumerate(plans):
            for b in hits:          # every group's hits first: taking may evict cached blocks
                self._hold(g, b)
            seq.tables[g] = [NULL_BLOCK] * lo + hits
            seq.slid[g] = lo
        for g, (_, _, _, now) in enumerate(plans):
            seq.tables[g] += self._take(g, now)
        seq.num_tokens = n
        seq.hashes = hashes
        seq.registered = h
        self._seqs[seq_id] = seq
        if self.enable_prefix_caching:
            self._query_tokens += n
            self._hit_tokens += h * self.block_size
        return h * self.block_size

    def reserve(self, seq_id, total: int) -> bool:
        """Hold slots for the sequence's first `total` tokens in every group (window groups
        allocate lazily, so this is where they grow). False, changing no table's length
        past what fits, when a pool runs out: the caller preempts and retries."""
        seq = self._seqs[seq_id]
        want = -(-total // self.block_size)
        needs = [want - len(t) for t in seq.tables]
        if self.shared:
            if sum(k for k in needs if k > 0) > self.pools[0].num_free_blocks:
                return False
        elif any(k > self.pools[g].num_free_blocks for g, k in enumerate(needs) if k > 0):
            return False
        for g, k in enumerate(needs):
            if k > 0:
                seq.tables[g].extend(self._take(g, k))
        seq.num_tokens = max(seq.num_tokens, total)
        return True

    def append_slots(self, seq_id, num_new_tokens: int) -> bool:
        if num_new_tokens < 0:
            raise BrazeError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        return self.reserve(seq_id, self._seq(seq_id).num_tokens + num_new_tokens)

    def commit(self, seq_id, num_computed: int, token_ids=None) -> None:
        """Put the sequence's computed full blocks into each group's prefix cache (a
        window group's blocks that already slid out are gone and skipped)."""
        seq = self._seq(seq_id)
        upto = hash_computed(self._chain, self.block_size, seq_id, seq, num_computed, token_ids)
        new = set()
        for g, pool in enumerate(self.pools):
            table = seq.tables[g]
            for i in range(max(seq.registered, seq.slid[g]), min(upto, len(table))):
                if pool._register(table[i], self._key(g, seq.hashes[i])) and g == 0:
                    new.add(i)
        log = self.registrations
        if log is not None:     # KV offload: blocks every group still holds, newly cached
            for i in sorted(new):
                ids = self._ids(seq, i)
                if None not in ids:
                    log.append((seq_id, i, ids))
        seq.registered = max(seq.registered, upto)

    def _ids(self, seq: _Seq, i: int) -> tuple:
        """Block i of the sequence in each group (None where a window group released it)."""
        out = []
        for g, table in enumerate(seq.tables):
            b = table[i] if i < len(table) else NULL_BLOCK
            out.append(None if self.windows[g] and b == NULL_BLOCK else b)
        return tuple(out)

    def free(self, seq_id) -> None:
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            raise BrazeError(f"sequence {seq_id!r} has no blocks to free")
        for g, table in enumerate(seq.tables):
            for b in reversed(table):
                if b != NULL_BLOCK or not self.windows[g]:
                    self._release(g, b)

    def truncate(self, seq_id, num_tokens: int) -> None:
        seq = self._seq(seq_id)
        if not seq.registered * self.block_size <= num_tokens <= seq.num_tokens:
            raise BrazeError(f"sequence {seq_id!r}: cannot truncate to {num_tokens} tokens "
                             f"(it holds {seq.num_tokens}, {seq.registered} blocks cached)")
        if num_tokens < seq.start and any(self.windows):
            raise BrazeError(f"sequence {seq_id!r}: cannot truncate to {num_tokens} tokens: "
                             f"its window blocks before position {seq.start} are released, "
                             f"and recomputing from {num_tokens} would need them")
        keep = -(-num_tokens // self.block_size)
        for g, table in enumerate(seq.tables):
            for b in reversed(table[keep:]):
                if b != NULL_BLOCK or not self.windows[g]:
                    self._release(g, b)
            del table[keep:]
            seq.slid[g] = min(seq.slid[g], len(table))
        del seq.hashes[num_tokens // self.block_size:]     # a cut block's tokens change
        seq.num_tokens = num_tokens

    def adopt(self, seq_id, num_blocks: int, register: bool = True) -> list[tuple]:
        """The sequence's next blocks after its prefix hits were filled from a lower KV
        tier: they enter each group's prefix cache as computed. A window group gets blocks
        only for those inside the window of the first token left to compute (the rest are
        None: nothing to fill), and keeps room for a first chunk after them, so fewer than
        `num_blocks` may be adopted. Returns, per block adopted, its id in each group.
        `register`: as BlockManager.adopt's (without, `commit` registers them later)."""
        seq = self._seq(seq_id)
        first = seq.registered
        if num_blocks < 0 or first + num_blocks > (seq.num_tokens - 1) // self.block_size:
            raise BrazeError(f"sequence {seq_id!r}: cannot adopt {num_blocks} block(s) after "
                             f"{first}: at least one token of its {seq.num_tokens} must be left "
                             f"to compute")
        n = num_blocks
        while n > 0 and not self._adoption_fits(seq, first + n):
            n -= 1
        end = first + n
        for g, w in enumerate(self.windows):
            if not w or n == 0:
                continue
            table = seq.tables[g]
            lo = self._first_needed(g, end * self.block_size)
            for i in range(seq.slid[g], min(lo, len(table))):
                if table[i] != NULL_BLOCK:
                    self._release(g, table[i])
                    table[i] = NULL_BLOCK
            grow = end - len(table)
            if grow > 0:
                fresh = max(0, end - max(len(table), lo))
                table.extend([NULL_BLOCK] * (grow - fresh) + self._take(g, fresh))
            seq.slid[g] = max(seq.slid[g], min(lo, len(table)))
        if register:
            for g, pool in enumerate(self.pools):
                table = seq.tables[g]
                for i in range(first, end):
                    if table[i] != NULL_BLOCK or not self.windows[g]:
                        pool._register(table[i], self._key(g, seq.hashes[i]))
            seq.registered = end
        seq.start = max(seq.start, end * self.block_size)
        return [self._ids(seq, i) for i in range(first, end)]

    def _adoption_fits(self, seq: _Seq, end: int) -> bool:
        """Whether each window group can hold blocks up to `end` (those inside the window
        of position end * bs) and then a first chunk after them."""
        bs = self.block_size
        want = room = 0         # a shared pool: the window groups' sums against its free blocks
        for g, w in enumerate(self.windows):
            if not w:
                continue
            table, pool = seq.tables[g], self.pools[g]
            lo = self._first_needed(g, end * bs)
            freed = sum(1 for i in range(seq.slid[g], min(lo, len(table)))
                        if table[i] != NULL_BLOCK and pool._ref[table[i]] == 1)
            fresh = max(0, end - max(len(table), lo))
            chunk = -(-min(seq.num_tokens, end * bs + self.max_chunk) // bs) - max(end, len(table))
            want, room = want + fresh + max(chunk, 0), room + freed
            if not self.shared and want > pool.num_free_blocks + room:
                return False
            if not self.shared:
                want = room = 0
        return want <= self.pools[0].num_free_blocks + room

    def reset_prefix_cache(self) -> None:
        for p in self._distinct_pools():
            p.reset_prefix_cache()

    def _seq(self, seq_id) -> _Seq:
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise BrazeError(f"unknown sequence {seq_id!r}")
        return seq


# ------------------------------------------------------------ the runner's side

def kv_groups_of(manifest: dict, cache, where: str) -> list[KVGroup]:
    """The artifact's KV cache groups; an artifact compiled before they were recorded has
    one full-attention group of every cache."""
    entries = manifest.get("kv_groups")
    if entries is None:
        layers = sorted({int(n.rsplit(".", 1)[1]) for n in cache.tensors})
        return [KVGroup(0, tuple(layers))]
    return KVGroup.from_manifest(entries, where)


def group_pool_blocks(groups: list[KVGroup], num_kv_blocks: int, block_size: int,
                      max_num_seqs: int, max_num_tokens: int, freeing: bool) -> list[int]:
    """Each group's pool: `num_kv_blocks` for a full-attention group (and for every group
    when window freeing is off); a window group's window arithmetic otherwise."""
    if not freeing:
        return [num_kv_blocks] * len(groups)
    return [window_pool_blocks(g.window, block_size, max_num_seqs, max_num_tokens,
                               num_kv_blocks) if g.window else num_kv_blocks for g in groups]


# A shared pool's page holds one block of any group; a group with fewer or smaller cache
# tensors than the largest leaves part of each of its pages unused. Separate pools, sized
# exactly, win once that waste is large (a 1:2 layer split wastes a quarter of the memory
# at an even mix; the 5:1 Gemma 3 layout a 29/34 of a full-attention block), so the
# groups share only where, at an even mix, at most this fraction of the memory goes unused
# (vLLM pads its last layer group the same way; benchmarks/hybrid_cache.py --traffic).
MAX_SHARED_WASTE = 0.125


def share_pool(cache, names: list[list[str]]) -> bool:
    """Whether the KV cache groups whose cache tensors are `names` share one pool."""
    if len(names) < 2 or not all(names):
        return False
    page = cache.page_bytes(names)
    used = sum(cache.bytes_per_block_of(n) for n in names)
    return 1 - used / (len(names) * page) <= MAX_SHARED_WASTE


def shared_pool_blocks(cache, names: list[list[str]], group_blocks: list[int]) -> int:
    """The shared pool's pages: the bytes the separate pools `group_blocks` would take."""
    total = sum(n * cache.bytes_per_block_of(grp) for grp, n in zip(names, group_blocks))
    return total // cache.page_bytes(names)


def shared_max_tokens(groups: list[KVGroup], pages: int, block_size: int,
                      max_chunk: int) -> int:
    """The longest sequence a shared pool holds alone: each full-attention group's blocks
    for all its tokens, each window group's window and two chunks (a step's blocks are
    released once committed, with async scheduling a step later; never more than all its
    tokens), and the null block."""
    per_window = [window_blocks(g.window, block_size, 2 * max_chunk)
                  for g in groups if g.window]
    full = sum(1 for g in groups if not g.window)

    def need(n: int) -> int:
        return full * n + sum(min(n, w) for w in per_window)

    lo, hi = 0, pages          # the most blocks n with need(n) <= pages - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if need(mid) <= pages - 1 else (lo, mid - 1)
    return lo * block_size


def make_block_manager(runner, enable_prefix_caching: bool = True):
    """The block manager for a runner's cache: a `HybridBlockManager` when its window
    groups free their blocks, else the plain `BlockManager` over one table."""
    if not runner.window_freeing:
        return BlockManager(runner.num_kv_blocks, runner.block_size, enable_prefix_caching)
    bm = HybridBlockManager(runner.kv_groups, runner.group_blocks, runner.block_size,
                            enable_prefix_caching, max_chunk=runner.max_num_tokens)
    cache = runner.executor.cache       # each cache tensor's group, for KV offload's copies
    bm.tensor_group = {n: g for g, grp in enumerate(runner.kv_groups)
                       for n in cache.group_names(grp.layers)}
    return bm
