"""The hybrid KV cache's block manager (runtime/hybrid_cache.py): window groups hold only
their window, prefix hits shrink rather than serve freed blocks, and a random-operation
state machine that simulates every cache write checks that each position a step reads
holds that sequence's own KV, with no leak and no block handed out twice."""

from __future__ import annotations

import random

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from braze.ir.errors import BrazeError
from braze.runtime.hybrid_cache import (NULL_BLOCK, HybridBlockManager, KVGroup,
                                        window_blocks, window_pool_blocks)

BS = 4


def groups(*windows):
    return [KVGroup(w, (i,)) for i, w in enumerate(windows)]


def run(bm, sid, tokens, start, end):
    """One scheduled chunk [start, end) of a sequence, then its commit."""
    bm.slide(sid, start)
    assert bm.reserve(sid, end)
    bm.commit(sid, end, tokens)


def test_window_group_holds_only_its_window_at_long_context():
    W, n, chunk = 10, 400, 16
    bm = HybridBlockManager(groups(0, W), [200, 40], BS, max_chunk=chunk)
    tokens = list(range(n))
    cached = bm.allocate("a", tokens)
    assert cached == 0
    start = 0
    while start < n:                    # chunked prefill, then the window of the last token
        end = min(n, start + chunk)
        run(bm, "a", tokens, start, end)
        lo = max(0, start - W + 1) // BS
        assert bm.group_used_blocks(1) == -(-end // BS) - lo
        assert bm.group_used_blocks(0) == -(-n // BS)
        assert bm.block_table("a", 1)[:lo] == [NULL_BLOCK] * lo
        start = end
    for _ in range(50):                 # decode: one block in, one block out
        tokens.append(7)
        run(bm, "a", tokens, len(tokens) - 1, len(tokens))
        last = len(tokens) - 1
        assert bm.group_used_blocks(1) == -(-len(tokens) // BS) - max(0, last - W + 1) // BS
        assert bm.group_used_blocks(1) <= window_blocks(W, BS, 1)
    bm.free("a")
    assert bm.group_used_blocks(0) == bm.group_used_blocks(1) == 0


def test_window_pool_size_formula():
    # every running sequence at its window + a decode block + a block of its uncommitted
    # chunk, two steps' chunks, the null block
    assert window_pool_blocks(10, 4, 3, 16, 10_000) == 3 * (3 + 3) + 2 * 4 + 1 + 1
    assert window_pool_blocks(4096, 16, 256, 8192, 100) == 101     # never above a full pool


def test_prefix_hit_shrinks_to_what_the_window_group_still_holds():
    W = 6
    bm = HybridBlockManager(groups(0, W), [64, 64], BS, max_chunk=64)
    a = list(range(40))
    bm.allocate("a", a)
    run(bm, "a", a, 0, 40)
    # the window group released blocks 0..7 while computing (slid before it ran): the whole
    # prompt's hit (9 blocks) needs window blocks 7..8, still held
    bm.slide("a", 40)
    assert bm.cached_prefix_blocks(a + [1]) == 10
    bm.free("a")
    # after free every computed block is in both caches; evict the window group's block 8
    pool = bm.pools[1]
    h8 = bm._chain(a, [], 10, None)[8]
    b8 = pool._cached[h8]
    del pool._cached[h8], pool._block_hash[b8]
    pool._cached_free.pop(b8)
    pool._plain_free.append(b8)
    # a hit reaching block 9 or past needs block 8 in the window group: the hit is the
    # longest one whose window is whole, blocks 0..7 (window of position 32: blocks 6, 7)
    assert bm.cached_prefix_blocks(a + [1]) == 8
    assert bm.allocate("b", a + [1]) == 32
    assert bm.block_table("b", 1)[:6] == [NULL_BLOCK] * 6
    bm.free("b")


def test_window_only_model_and_refusals():
    bm = HybridBlockManager(groups(5), [12], BS, max_chunk=8)
    t = list(range(30))
    bm.allocate("a", t)
    assert bm.table_len("a") == 1          # lazily: reserve grows it chunk by chunk
    start = 0
    while start < 30:
        run(bm, "a", t, start, min(30, start + 8))
        start += 8
    assert bm.group_used_blocks(0) <= window_blocks(5, BS, 8)
    with pytest.raises(BrazeError, match="null block"):
        HybridBlockManager(groups(0, 5), [8, 1], BS)
    with pytest.raises(BrazeError, match="pool sizes"):
        HybridBlockManager(groups(0, 5), [8], BS)


def test_reserve_fails_when_a_window_pool_is_empty_and_changes_nothing():
    bm = HybridBlockManager(groups(0, 5), [40, 4], BS, max_chunk=8)
    small = HybridBlockManager(groups(0, 5), [40, 2], BS, max_chunk=8)
    assert not small.can_allocate(list(range(20)))  # no room for a whole 8-token chunk
    assert small.can_allocate(list(range(4)))
    bm.allocate("a", list(range(8)))            # 1 window block of the 3 allocatable
    assert bm.reserve("a", 8) and bm.group_free_blocks(1) == 1
    before = (bm.table_len("a", 0), bm.table_len("a", 1))
    assert not bm.reserve("a", 16)              # window needs 2 more (no slide yet)
    assert (bm.table_len("a", 0), bm.table_len("a", 1)) == before
    bm.commit("a", 8, list(range(8)))
    bm.slide("a", 8)                            # start 8: blocks < (8-5+1)//4 = 1 go
    assert bm.reserve("a", 16)


# ---------------------------------------------------------------- the state machine

class HybridMachine(RuleBasedStateMachine):
    """Sequences over a small alphabet (so prefixes repeat and hit) are admitted, run in
    chunks and decodes, and freed, over a full group and two window groups. A simulated
    cache records which token prefix each slot's KV belongs to; every step checks that
    each position its tokens can see holds the sequence's own KV."""

    POOLS = [48, 14, 20]        # one per group; an int: one pool the groups share

    def __init__(self):
        super().__init__()
        self.windows = (0, 5, 9)
        self.bm = HybridBlockManager(groups(*self.windows), self.POOLS, BS, max_chunk=8)
        self.seqs: dict[str, dict] = {}
        # (memory, slot) -> (group, prefix written): with a shared pool a block id is the
        # same memory in every group, so one group's write there clobbers another's KV
        self.slots: dict[tuple, tuple] = {}
        self.n = 0
        # loads whose copy has not landed (a GPU's load stream): per sequence, the slot
        # writes still to come; such a sequence takes no step until they have
        self.landing: dict[str, list] = {}

    def _mem(self, g):
        return 0 if self.bm.shared else g

    def _write(self, g, slot, prefix):
        self.slots[self._mem(g), slot] = (g, prefix)

    def _read(self, g, slot):
        return self.slots.get((self._mem(g), slot))

    @rule(data=st.data())
    def admit(self, data):
        base = data.draw(st.sampled_from([[1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3, 4, 5],
                                          [1, 2, 3, 4, 9, 9, 9, 9], [5, 5, 5, 5]]))
        cut = data.draw(st.integers(1, len(base)))
        extra = data.draw(st.lists(st.integers(0, 3), max_size=12))
        tokens = base[:cut] + extra
        sid = f"s{self.n}"
        self.n += 1
        if not self.bm.can_allocate(tokens):
            return
        cached = self.bm.allocate(sid, tokens)
        assert cached % BS == 0 and cached < len(tokens)
        self.seqs[sid] = {"tokens": list(tokens), "computed": cached}
        self._check_visible(sid, cached)

    @rule(data=st.data())
    def admit_loading(self, data):
        """Admission with blocks after the prefix hits loaded from a lower KV tier (which
        holds every prefix: its copies carry the right KV by construction)."""
        tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3, 4, 5] + data.draw(
            st.lists(st.integers(0, 3), min_size=1, max_size=20))
        sid = f"s{self.n}"
        self.n += 1
        if not self.bm.can_allocate(tokens):
            return
        cached = self.bm.allocate(sid, tokens)
        first = cached // BS
        k = data.draw(st.integers(0, (len(tokens) - 1) // BS - first))
        late = data.draw(st.booleans())
        ids = self.bm.adopt(sid, k, register=not late)
        assert len(ids) <= k
        writes = []
        for j, per_group in enumerate(ids):
            i = first + j
            for g, b in enumerate(per_group):
                if b is None:
                    assert self.windows[g]          # only a window group skips a block
                    continue
                for p in range(i * BS, (i + 1) * BS):
                    writes.append((g, b * BS + p % BS, tuple(tokens[:p + 1])))
        self.seqs[sid] = {"tokens": list(tokens), "computed": cached + len(ids) * BS}
        if late and writes:     # in flight: the slots hold no one's KV until it lands
            for g, slot, _ in writes:
                self._write(g, slot, "being copied")
            self.landing[sid] = writes
            return
        for w in writes:
            self._write(*w)
        self._check_visible(sid, cached + len(ids) * BS)

    @precondition(lambda self: self.landing)
    @rule(data=st.data())
    def land(self, data):
        """A load's copy has landed: its blocks enter the prefix caches (the scheduler's
        commit of the loaded tokens)."""
        sid = data.draw(st.sampled_from(sorted(self.landing)))
        self._land(sid)
        s = self.seqs[sid]
        self.bm.commit(sid, s["computed"], s["tokens"])
        self._check_visible(sid, s["computed"])

    def _land(self, sid):
        for w in self.landing.pop(sid):
            self._write(*w)

    def _check_visible(self, sid, start):
        """Every key a token at position >= start sees is the sequence's own KV."""
        s = self.seqs[sid]
        for g, w in enumerate(self.windows):
            table = self.bm.block_table(sid, g)
            for p in range(0 if not w else max(0, start - w + 1), start):
                slot = table[p // BS] * BS + p % BS
                assert table[p // BS] != NULL_BLOCK or not w, (g, p, "null block read")
                assert self._read(g, slot) == (g, tuple(s["tokens"][:p + 1])), (g, p)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def step(self, data):
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        if sid in self.landing:         # the scheduler passes it over
            return
        s = self.seqs[sid]
        if s["computed"] == len(s["tokens"]):           # decode: a new token first
            s["tokens"].append(data.draw(st.integers(0, 3)))
        start = s["computed"]
        end = start + data.draw(st.integers(1, min(8, len(s["tokens"]) - start)))
        self.bm.slide(sid, start)
        if not self.bm.reserve(sid, end):
            if start == s["computed"] and len(s["tokens"]) > end:
                pass
            self._free(sid)           # preempted
            return
        self._check_visible(sid, start)
        for g, w in enumerate(self.windows):          # the step writes its tokens' KV
            table = self.bm.block_table(sid, g)
            for p in range(start, end):
                b = table[p // BS]
                assert b != NULL_BLOCK or not w
                assert self.bm.pools[g].ref_count(b) == 1 or not self.bm.pools[g].is_cached(b) \
                    or self._read(g, b * BS + p % BS) == (g, tuple(s["tokens"][:p + 1])), \
                    "a step wrote into a shared cached block"
                self._write(g, b * BS + p % BS, tuple(s["tokens"][:p + 1]))
        s["computed"] = end
        self.bm.commit(sid, end, s["tokens"])

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def truncate(self, data):
        """Speculative rollback: tokens past k are dropped (and may come back different);
        never below the cached blocks nor the last chunk's start."""
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        if sid in self.landing:
            return
        s = self.seqs[sid]
        bm = self.bm
        lo = max(bm.num_registered(sid) * BS, bm._seqs[sid].start)
        hi = bm.num_tokens(sid)
        if lo > hi:
            return
        k = data.draw(st.integers(lo, hi))
        bm.truncate(sid, k)
        s["tokens"] = s["tokens"][:k]
        s["computed"] = min(s["computed"], k)

    def _free(self, sid):
        if sid in self.landing:     # abandoned mid-copy: the copy ends before any reuse
            self._land(sid)
        self.bm.free(sid)
        del self.seqs[sid]

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def finish(self, data):
        self._free(data.draw(st.sampled_from(sorted(self.seqs))))

    @invariant()
    def blocks_balance(self):
        bm = self.bm
        pools = bm.pools[:1] if bm.shared else bm.pools
        owners = [[0] * pool.num_blocks for pool in pools]
        used = [0] * len(self.windows)
        for g, w in enumerate(self.windows):
            own = owners[0 if bm.shared else g]
            for sid in self.seqs:
                table = bm.block_table(sid, g)
                real = [b for b in table if b != NULL_BLOCK or not w]
                assert len(set(real)) == len(real), "a block twice in one table"
                for b in real:
                    own[b] += 1
            used[g] = len({b for sid in self.seqs for b in bm.block_table(sid, g)
                           if b != NULL_BLOCK or not w})
            assert bm.group_used_blocks(g) == used[g], (g, "blocks in use miscounted")
            if w:
                own[NULL_BLOCK] = 1
        for own, pool in zip(owners, pools):
            free = pool.free_blocks()
            assert len(set(free)) == len(free)
            for b in range(pool.num_blocks):
                assert pool.ref_count(b) == own[b], b       # no block handed out twice
                assert (b in free) == (own[b] == 0)
                if own[b] > 1:          # only prefix-cached (full, computed) blocks are shared
                    assert pool.is_cached(b)
            assert len(pool._cached) == len(pool._block_hash)
        if bm.shared:       # no block in two groups' tables at once
            for g in range(len(self.windows)):
                for h in range(g):
                    a = {b for sid in self.seqs for b in bm.block_table(sid, g)} - {NULL_BLOCK}
                    c = {b for sid in self.seqs for b in bm.block_table(sid, h)} - {NULL_BLOCK}
                    assert not a & c, (g, h, "a block in two groups")
            s = bm.stats()
            assert s["kv_blocks_total"] == s["kv_blocks_free"] + s["kv_blocks_used"]

    def teardown(self):
        for sid in list(self.seqs):
            self._free(sid)
        for g, w in enumerate(self.windows):
            assert self.bm.group_used_blocks(g) == 0, "leak"


TestHybridMachine = HybridMachine.TestCase
TestHybridMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


class SharedHybridMachine(HybridMachine):
    """The same operations over one pool all three groups share (one free queue, one LRU
    of cached blocks): small enough that groups evict each other's cached blocks."""
    POOLS = 24


TestSharedHybridMachine = SharedHybridMachine.TestCase
TestSharedHybridMachine.settings = settings(max_examples=150, stateful_step_count=40,
                                            deadline=None)


def test_random_long_runs_match_window_arithmetic():
    """Several sequences decoding far past their windows at once: each window group holds
    exactly the blocks from each sequence's window start to its end."""
    rng = random.Random(0)
    W = 7
    bm = HybridBlockManager(groups(0, W), [400, 60], BS, max_chunk=4)
    seqs = {f"s{i}": [rng.randrange(50) for _ in range(rng.randrange(1, 20))] for i in range(4)}
    done = {}
    for sid, t in seqs.items():
        done[sid] = bm.allocate(sid, t)
    for _ in range(120):
        for sid, t in seqs.items():
            start = done[sid]
            if start == len(t):
                t.append(rng.randrange(50))
            end = min(len(t), start + 4)
            run(bm, sid, t, start, end)
            done[sid] = end
    want = sum(-(-done[s] // BS) - max(0, done[s] - 4 - W + 1) // BS for s in seqs)
    # each sequence's last chunk started at most 4 tokens before its end
    got = bm.group_used_blocks(1)
    assert got <= want + len(seqs) and got <= len(seqs) * window_blocks(W, BS, 4)
    for sid in seqs:
        lo = max(0, (done[sid] - 1) - W + 1) // BS
        assert all(b != NULL_BLOCK for b in bm.block_table(sid, 1)[lo:])


def test_manifest_groups_old_artifacts_and_malformed_entries():
    from types import SimpleNamespace

    from braze.runtime.hybrid_cache import kv_groups_of
    cache = SimpleNamespace(tensors={"k_cache.0": None, "v_cache.0": None, "k_cache.1": None,
                                     "v_cache.1": None})
    # an artifact compiled before the groups were recorded: one full-attention group
    assert kv_groups_of({}, cache, "old") == [KVGroup(0, (0, 1))]
    got = kv_groups_of({"kv_groups": [{"window": 0, "layers": [1]},
                                      {"window": 8, "layers": [0]}]}, cache, "new")
    assert got == [KVGroup(0, (1,)), KVGroup(8, (0,))]
    for bad in ([], [{"window": -1, "layers": [0]}], [{"layers": [0]}], "x"):
        with pytest.raises(BrazeError, match="kv_groups entry is malformed"):
            kv_groups_of({"kv_groups": bad}, cache, "bad.braze")


def test_adopt_fills_window_groups_only_inside_the_window():
    """Blocks loaded from a lower KV tier: a full group takes each, a window group only
    those the first token left to compute sees; all enter the prefix caches."""
    bm = HybridBlockManager(groups(0, 5), [64, 20], BS, max_chunk=8)
    t = list(range(30))
    assert bm.allocate("a", t) == 0
    ids = bm.adopt("a", 6)                  # positions 0..23 loaded; next token 24
    lo = (24 - 5 + 1) // BS                 # = 5: the window group needs block 5 only
    assert [i[1] for i in ids] == [None] * lo + [bm.block_table("a", 1)[5]]
    assert all(i[0] is not None for i in ids)
    assert bm.block_table("a", 1)[:lo] == [NULL_BLOCK] * lo
    assert bm.group_used_blocks(1) == 1
    assert bm.reserve("a", 30)
    bm.free("a")
    assert bm.cached_prefix_blocks(t) == 6     # block 5 of the window group serves the hit
    with pytest.raises(BrazeError, match="at least one token"):
        bm.allocate("b", t[:8])
        bm.adopt("b", 2)


def test_adopt_takes_fewer_blocks_when_a_window_pool_is_short():
    bm = HybridBlockManager(groups(0, 9), [64, 4], BS, max_chunk=8)
    t = list(range(100))
    assert bm.can_allocate(t)           # room for a first chunk (2 blocks) from the start
    bm.allocate("a", t)
    ids = bm.adopt("a", 14)
    # 3 window blocks allocatable: after 14 loaded blocks the window of the next token
    # (3 blocks) and a chunk (2) do not fit, so fewer are adopted, leaving room for a chunk
    assert 0 < len(ids) < 14
    end = len(ids)
    assert bm.reserve("a", end * BS + 8)


def test_async_order_releases_window_blocks_only_once_committed():
    """With async scheduling the next chunk is scheduled (slide) before the step before it
    is committed: its blocks are released only after the commit, so they reach the prefix
    cache (and KV offload) first."""
    bm = HybridBlockManager(groups(0, 5), [64, 30], BS, max_chunk=8)
    t = list(range(40))
    bm.allocate("a", t)
    assert bm.reserve("a", 8)               # step 1: tokens 0..7
    bm.slide("a", 8)                        # step 2 scheduled before step 1 is committed
    assert bm.reserve("a", 16)
    assert bm.block_table("a", 1)[0] != NULL_BLOCK      # not committed: kept
    bm.commit("a", 8, t)                    # step 1 done
    bm.slide("a", 16)                       # step 3 scheduled; step 2 not committed yet
    lo = (16 - 5 + 1) // BS                 # 3, but only blocks 0, 1 are committed
    assert bm.block_table("a", 1)[:2] == [NULL_BLOCK] * 2
    assert bm.block_table("a", 1)[2] != NULL_BLOCK and lo == 3
    pool = bm.pools[1]
    assert len(pool._cached_free) == 2      # released blocks are in the prefix cache
    bm.commit("a", 16, t)
    bm.slide("a", 16)
    assert bm.block_table("a", 1)[:3] == [NULL_BLOCK] * 3


def _serve(groups_, blocks, prompt_len, chunk=16):
    """(requests of `prompt_len` distinct tokens running at once, each prefilled in chunks;
    after a stream of them served one by one, how many of the latest still hit whole)."""
    prompt = lambda i: [i * 1000 + j for j in range(prompt_len)]      # noqa: E731

    def prefill(bm, sid, t):
        start = 0
        while start < len(t):
            end = min(len(t), start + chunk)
            bm.slide(sid, start)
            if not bm.reserve(sid, end):
                return False
            bm.commit(sid, end, t)
            start = end
        bm.slide(sid, start)
        return True

    bm = HybridBlockManager(groups_, blocks, BS, max_chunk=chunk)
    running = 0
    while bm.can_allocate(prompt(running)):
        bm.allocate(running, prompt(running))
        if not prefill(bm, running, prompt(running)):
            break
        running += 1
    bm = HybridBlockManager(groups_, blocks, BS, max_chunk=chunk)
    served = 2 * running + 8
    for i in range(served):
        bm.allocate(i, prompt(i))
        assert prefill(bm, i, prompt(i))
        bm.free(i)
    cached = 0
    while cached < served and bm.cached_prefix_blocks(prompt(served - 1 - cached) + [0]) \
            == prompt_len // BS:
        cached += 1
    return running, cached


def test_shared_pool_admits_more_and_caches_more_on_the_same_memory():
    """Gemma 3's layout cut to equal groups (one layer each: every block the same bytes).
    On the bytes of the separate pools the runtime sizes (a full pool of 64, window pools
    for 4 sequences), one shared pool runs more short requests at once and keeps more
    prefixes hitting (the separate window pools run out first), and no fewer long ones."""
    from braze.runtime.hybrid_cache import group_pool_blocks
    gs = [KVGroup(0, (1,)), KVGroup(8, (0,)), KVGroup(8, (2,))]
    separate = group_pool_blocks(gs, 64, BS, 4, 16, True)
    assert separate[1] == separate[2] < separate[0]
    pages = sum(separate)           # each group's block is one page: the same bytes
    sep_short, shared_short = _serve(gs, separate, 8), _serve(gs, pages, 8)
    assert shared_short[0] > sep_short[0] and shared_short[1] > sep_short[1]
    sep_long, shared_long = _serve(gs, separate, 60), _serve(gs, pages, 60)
    assert shared_long[0] >= sep_long[0] and shared_long[1] >= sep_long[1]
    print("short", sep_short, shared_short, "long", sep_long, shared_long)


def test_shared_pool_hit_shrinks_when_another_group_evicted_its_window_block():
    """One LRU across groups: when taking blocks evicts a window group's cached block, the
    hit shrinks to the longest prefix every group still holds, as with separate pools."""
    gs = [KVGroup(0, (0,)), KVGroup(5, (1,))]
    bm = HybridBlockManager(gs, 40, BS, max_chunk=8)
    a = list(range(24))
    bm.allocate("a", a)
    start = 0
    while start < 24:
        end = min(24, start + 8)
        run(bm, "a", a, start, end)
        start = end
    bm.free("a")
    assert bm.cached_prefix_blocks(a + [1]) == 6
    # evict the window group's copy of block 5 (the LRU order is the pool's; drop it directly)
    pool = bm.pools[1]
    b5 = pool._cached[bm._key(1, bm._chain(a, [], 6, None)[5])]
    pool._cached_free.move_to_end(b5, last=False)
    plain = bm._take(0, len(pool._plain_free))
    taken = bm._take(0, 1)          # a full-group block: the shared LRU's head, evicted
    assert taken == [b5] and bm.cached_prefix_blocks(a + [1]) == 5
    for b in plain + taken:
        bm._release(0, b)
    # the hit of 6 blocks needs window block 5; 5 blocks need window block 4 only (the
    # window of position 20), still cached
    assert bm.cached_prefix_blocks(a + [1]) == 5
    assert bm.allocate("b", a + [1]) == 20
    assert bm.block_table("b", 1)[:4] == [NULL_BLOCK] * 4


def test_shared_max_tokens_is_a_length_one_sequence_can_hold():
    from braze.runtime.hybrid_cache import shared_max_tokens
    gs = [KVGroup(0, (1,)), KVGroup(8, (0,)), KVGroup(8, (2,))]
    for pages in (12, 40, 200):
        n = shared_max_tokens(gs, pages, BS, 8)
        per_window = window_blocks(8, BS, 16)
        assert n == (pages - 1 - 2 * per_window) * BS or n < 2 * per_window * BS
        t = list(range(n))
        bm = HybridBlockManager(gs, pages, BS, max_chunk=8)
        assert bm.can_allocate(t)
        bm.allocate("a", t)
        for start in range(0, n, 8):
            run(bm, "a", t, start, min(n, start + 8))
    assert shared_max_tokens(gs, 4, BS, 8) == BS     # the null block and one per group
    assert shared_max_tokens(gs, 3, BS, 8) == 0
    # async order: the next chunk slid before the last one committed
    n = shared_max_tokens(gs, 40, BS, 8)
    t = list(range(n))
    bm = HybridBlockManager(gs, 40, BS, max_chunk=8)
    bm.allocate("a", t)
    assert bm.reserve("a", 8)
    for start in range(8, n, 8):
        bm.slide("a", start)
        assert bm.reserve("a", min(n, start + 8))
        bm.commit("a", start, t)


def test_shared_pool_holds_every_groups_hits_before_taking_new_blocks():
    """A new block for one group may evict the least recently used cached block, which can
    be another group's prefix hit for the same admission: every group's hits are held
    first, so that block is never evicted and handed out while it is being reused."""
    gs = [KVGroup(0, (0,)), KVGroup(5, (1,))]
    bm = HybridBlockManager(gs, 24, BS, max_chunk=8)
    a = list(range(12))
    bm.allocate("a", a)
    run(bm, "a", a, 0, 8)
    run(bm, "a", a, 8, 12)
    bm.free("a")
    c = list(range(100, 120))           # more cached blocks, to evict instead
    bm.allocate("c", c)
    for start in range(0, 20, 8):
        run(bm, "c", c, start, min(20, start + 8))
    bm.free("c")
    pool = bm.pools[0]
    # a sequence holding every plain block (its window group takes one now)
    bm.allocate("filler", [99] * (4 * (len(pool._plain_free) - 1)))
    assert not pool._plain_free
    h2 = bm._chain(a, [], 3, None)[2]
    w2 = pool._cached[bm._key(1, h2)]          # the window group's block 2: a hit for b
    pool._cached_free.move_to_end(w2, last=False)   # and the first an eviction takes
    b = a + [7] * 5
    assert bm.can_allocate(b)
    assert bm.allocate("b", b) == 12
    full, window = bm.block_table("b", 0), bm.block_table("b", 1)
    assert window[2] == w2 and w2 not in full
    assert pool.ref_count(w2) == 1
