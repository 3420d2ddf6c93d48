"""The paged KV block manager (runtime/block_manager.py): prefix caching, ref counts,
LRU eviction, and a random-operation state machine checking its invariants."""

from __future__ import annotations

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from braze.ir.errors import BrazeError
from braze.runtime.block_manager import BlockManager

BS = 4


def toks(n, start=0):
    return list(range(start, start + n))


def check_invariants(bm: BlockManager, lengths: dict | None = None):
    owners = [0] * bm.num_blocks
    for sid in bm.seq_ids():
        table = bm.block_table(sid)
        assert len(set(table)) == len(table), "a block twice in one table"
        assert len(table) == -(-bm.num_tokens(sid) // bm.block_size)
        if lengths is not None:
            assert bm.num_tokens(sid) == lengths[sid]
        for b in table:
            owners[b] += 1
    free = bm.free_blocks()
    assert len(set(free)) == len(free), "a block twice in the free queue"
    for b in range(bm.num_blocks):
        assert bm.ref_count(b) == owners[b]
        assert (b in free) == (owners[b] == 0)
    used = sum(1 for o in owners if o)
    assert len(free) + used == bm.num_blocks
    assert bm.num_free_blocks == len(free) == bm.stats()["kv_blocks_free"]
    # the prefix cache maps hashes to blocks one to one
    assert len(bm._cached) == len(bm._block_hash)
    assert all(bm._block_hash[b] == h for h, b in bm._cached.items())
    assert set(bm._cached_free) <= set(bm._block_hash)


def admit(bm, sid, prompt):
    """Allocate a prompt and mark it all computed (as a step that prefills it whole does)."""
    cached = bm.allocate(sid, prompt)
    bm.commit(sid, len(prompt))
    return cached


def grow(bm, sid, n, seq):
    ok = bm.append_slots(sid, n)
    if ok:
        bm.commit(sid, len(seq), seq)
    return ok


# ------------------------------------------------------------------- unit tests

def test_shared_prefix_hits_and_shares_blocks():
    bm = BlockManager(16, BS)
    a = toks(10)                       # 2 full blocks + 2 tokens
    assert admit(bm, "a", a) == 0
    b = toks(8) + [100, 101, 102]      # same 2 full blocks, different tail
    assert admit(bm, "b", b) == 8
    ta, tb = bm.block_table("a"), bm.block_table("b")
    assert ta[:2] == tb[:2] and ta[2] != tb[2]
    assert [bm.ref_count(x) for x in ta[:2]] == [2, 2]
    assert bm.ref_count(ta[2]) == 1 and bm.ref_count(tb[2]) == 1
    # a different first block breaks the chain: no hit on block 1 alone
    assert admit(bm, "c", [99] + toks(7, 1) + [5]) == 0
    s = bm.stats()
    assert s["prefix_cache_hit_tokens"] == 8
    assert s["prefix_cache_queries"] == 10 + 11 + 9
    check_invariants(bm)


def test_equal_block_after_another_prefix_does_not_hit():
    """A block's KV depends on every token before it: the same 4 tokens that were block 1
    of one prompt must not serve block 0 of another."""
    bm = BlockManager(16, BS)
    admit(bm, "a", toks(8) + [9])           # blocks [0..3] and [4..7] cached
    assert admit(bm, "b", toks(4, 4) + [9]) == 0
    assert bm.block_table("b")[0] != bm.block_table("a")[1]
    check_invariants(bm)


def test_last_block_never_served_from_cache():
    bm = BlockManager(16, BS)
    p = toks(8)                        # exactly 2 full blocks
    admit(bm, "a", p)
    assert admit(bm, "b", p) == 4    # at most len-1 tokens' worth: one block
    assert bm.block_table("a")[0] == bm.block_table("b")[0]
    assert bm.block_table("a")[1] != bm.block_table("b")[1]
    assert admit(bm, "c", toks(9)) == 8   # one extra token: both blocks hit
    assert admit(bm, "d", toks(1)) == 0
    check_invariants(bm)


def test_freed_blocks_stay_cached_and_hit_later():
    bm = BlockManager(8, BS)
    admit(bm, "a", toks(9))
    table = bm.block_table("a")
    bm.free("a")
    assert bm.num_free_blocks == 8
    assert admit(bm, "b", toks(9)) == 8
    assert bm.block_table("b")[:2] == table[:2]
    assert bm.num_free_blocks == 5
    check_invariants(bm)


def test_plain_blocks_preferred_and_eviction_is_lru():
    bm = BlockManager(4, BS)
    admit(bm, "x", toks(4, 0) + [0])      # full block X cached + 1 partial
    admit(bm, "y", toks(4, 50) + [0])     # full block Y cached + 1 partial
    bx, by = bm.block_table("x")[0], bm.block_table("y")[0]
    bm.free("x")                            # X freed first (older)
    bm.free("y")
    assert bm.stats()["evictions"] == 0
    # two plain free blocks (the partials) are used before evicting anything
    admit(bm, "p", toks(8, 200))
    assert bm.stats()["evictions"] == 0
    assert bm.is_cached(bx) and bm.is_cached(by)
    admit(bm, "q", toks(2, 300))          # evicts X, the least recently freed
    assert bm.block_table("q") == [bx]
    assert bm.stats()["evictions"] == 1
    assert not bm.is_cached(bx) and bm.is_cached(by)
    bm.free("q")
    assert admit(bm, "r", toks(4, 50) + [1]) == 4   # Y still hits
    assert bm.block_table("r")[0] == by
    check_invariants(bm)


def test_hit_refreshes_lru_position():
    bm = BlockManager(4, BS)
    admit(bm, "x", toks(4, 0) + [0])
    admit(bm, "y", toks(4, 50) + [0])
    bx, by = bm.block_table("x")[0], bm.block_table("y")[0]
    bm.free("x")
    bm.free("y")
    admit(bm, "x2", toks(4, 0) + [7])     # hit X: out of the free queue
    bm.free("x2")                           # X now the most recently freed
    admit(bm, "p", toks(8, 100))          # the two plain blocks (the partials)...
    assert bm.stats()["evictions"] == 0
    admit(bm, "q", toks(1, 300))          # then evict Y, not X
    assert bm.block_table("q") == [by]
    assert bm.is_cached(bx)


def test_append_slots_grows_and_registers_full_blocks():
    bm = BlockManager(8, BS)
    seq = toks(3)
    admit(bm, "a", seq)
    for t in range(3, 10):
        seq.append(t)
        assert grow(bm, "a", 1, seq)
        assert len(bm.block_table("a")) == -(-len(seq) // BS)
    # the blocks filled by decoding are now cached: a new prompt hits them
    assert admit(bm, "b", toks(9)) == 8
    assert bm.block_table("b")[:2] == bm.block_table("a")[:2]
    # multi-token append (chunked prefill / speculative)
    seq += [50, 51, 52, 53, 54, 55]
    assert grow(bm, "a", 6, seq)
    assert len(bm.block_table("a")) == 4
    check_invariants(bm)
    with pytest.raises(BrazeError):
        bm.commit("a", 17)                  # more than it holds
    assert bm.append_slots("a", 4)          # tokens still being sampled: no ids yet
    with pytest.raises(BrazeError):
        bm.commit("a", 20, seq)             # 16 ids cannot hash a 5th block


def test_out_of_blocks():
    bm = BlockManager(3, BS)
    assert bm.can_allocate(toks(12))
    assert not bm.can_allocate(toks(13))
    assert not bm.can_allocate([])
    admit(bm, "a", toks(8))
    assert bm.can_allocate(toks(4, 100))
    assert not bm.can_allocate(toks(4, 100), watermark=1)
    assert not bm.can_allocate(toks(5, 100))
    with pytest.raises(BrazeError, match="exhausted"):
        admit(bm, "b", toks(5, 100))
    check_invariants(bm)
    seq = toks(8)
    seq.append(8)
    assert grow(bm, "a", 1, seq)     # takes the last block
    seq.extend(range(9, 13))
    before = bm.block_table("a")
    assert not grow(bm, "a", 4, seq)  # needs a 4th block: caller preempts
    assert bm.block_table("a") == before and bm.num_tokens("a") == 9
    check_invariants(bm)


def test_can_allocate_counts_hits_and_evictable_blocks():
    bm = BlockManager(3, BS)
    admit(bm, "a", toks(9))               # all 3 blocks in use
    assert not bm.can_allocate(toks(2, 100))
    assert not bm.can_allocate(toks(5))     # a hit on block 0, but no block for the tail
    bm.free("a")                            # 2 cached free + 1 plain free
    assert bm.num_free_blocks == 3
    assert bm.can_allocate(toks(12, 100))   # evicting both cached blocks
    # hits on free cached blocks take them out of the pool
    assert bm.can_allocate(toks(12))
    assert admit(bm, "b", toks(12)) == 8
    check_invariants(bm)


def test_free_returns_everything_and_stats():
    bm = BlockManager(10, BS)
    admit(bm, "a", toks(10))
    admit(bm, "b", toks(10))
    admit(bm, "c", toks(7, 40))
    s = bm.stats()
    assert s["kv_blocks_total"] == 10
    assert s["kv_blocks_free"] == 10 - 3 - 1 - 2
    for sid in "abc":
        bm.free(sid)
    assert bm.stats()["kv_blocks_free"] == 10
    assert bm.stats()["prefix_cache_hit_tokens"] == 8
    assert bm.stats()["prefix_cache_queries"] == 27
    check_invariants(bm)
    with pytest.raises(BrazeError):
        bm.free("a")
    with pytest.raises(BrazeError):
        bm.block_table("a")


def test_reset_prefix_cache_and_disabled_caching():
    bm = BlockManager(8, BS)
    admit(bm, "a", toks(9))
    bm.free("a")
    bm.reset_prefix_cache()
    assert admit(bm, "b", toks(9)) == 0
    check_invariants(bm)
    off = BlockManager(8, BS, enable_prefix_caching=False)
    admit(off, "a", toks(9))
    assert admit(off, "b", toks(9)) == 0
    off.free("a")
    off.free("b")
    assert off.stats()["prefix_cache_queries"] == 0
    assert off.stats()["evictions"] == 0
    check_invariants(off)


def test_bad_arguments():
    with pytest.raises(BrazeError):
        BlockManager(0)
    with pytest.raises(BrazeError):
        BlockManager(4, 0)
    bm = BlockManager(4, BS)
    admit(bm, "a", [1])
    with pytest.raises(BrazeError):
        admit(bm, "a", [1])
    with pytest.raises(BrazeError):
        admit(bm, "e", [])
    with pytest.raises(BrazeError):
        grow(bm, "zz", 1, [1])


def test_blocks_are_cached_only_once_computed():
    """A prompt prefilled in chunks must not be served to others before it is written."""
    bm = BlockManager(16, BS)
    bm.allocate("a", toks(13))              # 3 full blocks, nothing computed yet
    assert bm.allocate("b", toks(13)) == 0
    bm.commit("a", 6)                       # first chunk: block 0 written, block 1 half
    assert bm.allocate("c", toks(13)) == 4
    bm.commit("a", 13)
    assert bm.allocate("d", toks(13)) == 12
    with pytest.raises(BrazeError):
        bm.commit("a", 14)
    check_invariants(bm)


# ------------------------------------------------------------ state machine

# toks(4, 4) is the second block of toks(8, 0): the same tokens after a different prefix
PREFIXES = [toks(8, 0), toks(6, 0) + [70, 71], toks(5, 100), toks(4, 4), []]


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / append / free / reset, checking the invariants and that a
    cache hit serves exactly what the prompt wants. A 'physical' model of the block
    contents is written as tokens are scheduled: each slot records its position and the
    whole sequence up to and including its token, because a KV entry depends on both
    (equal tokens after another prefix, or at another position, hold other values)."""

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(12, BS)
        self.seqs: dict[int, list[int]] = {}
        self.mem: dict[int, list] = {b: [None] * BS for b in range(12)}
        self.computed: dict[int, int] = {}
        self.next_id = 0
        # a lower KV tier (runtime/kv_offload.py): each computed full block's contents, by
        # the whole prefix up to its end (the key), as the offload stores them
        self.offloaded: dict[tuple, list] = {}
        # loads whose copy has not landed yet (a GPU's load stream): per sequence, the
        # (block, contents) still to be written; the sequence is not computed meanwhile
        self.landing: dict[int, list] = {}

    @rule(prefix=st.sampled_from(PREFIXES), tail=st.lists(st.integers(0, 3), max_size=9),
          use_check=st.booleans(), promote=st.booleans(), data=st.data())
    def allocate(self, prefix, tail, use_check, promote, data):
        prompt = prefix + tail
        if not prompt:
            return
        ok = self.bm.can_allocate(prompt)
        sid = self.next_id
        self.next_id += 1
        if not ok:
            if not use_check:
                with pytest.raises(BrazeError):
                    self.bm.allocate(sid, prompt)
            return
        cached = self.bm.allocate(sid, prompt)
        assert cached % BS == 0 and 0 <= cached < len(prompt)
        self.seqs[sid] = list(prompt)
        table = self.bm.block_table(sid)
        for p in range(cached):                # the hit blocks hold exactly this prefix
            assert self.mem[table[p // BS]][p % BS] == (p, tuple(prompt[:p + 1]))
        late = promote and data.draw(st.booleans())
        if promote:       # the blocks after the hits that the lower tier holds come back
            n, first = 0, cached // BS
            while first + n < (len(prompt) - 1) // BS and \
                    tuple(prompt[:(first + n + 1) * BS]) in self.offloaded:
                n += 1
            copies = []
            for i, b in enumerate(self.bm.adopt(sid, n, register=not late), start=first):
                assert self.bm.ref_count(b) == 1, "loading into a shared block"
                copies.append((b, list(self.offloaded[tuple(prompt[:(i + 1) * BS])])))
            cached += n * BS
            if late and copies:     # in flight: other prompts must not hit these blocks yet
                for b, _ in copies:     # (whatever they hold until the copy lands)
                    self.mem[b] = [("being copied", b)] * BS
                self.seqs[sid], self.computed[sid], self.landing[sid] = list(prompt), cached, copies
                return
            for b, kv in copies:
                self.mem[b] = kv
            table = self.bm.block_table(sid)
            for p in range(cached):            # what was loaded is exactly this prefix's KV
                assert self.mem[table[p // BS]][p % BS] == (p, tuple(prompt[:p + 1]))
        # chunked prefill: only a first chunk may be computed in this step
        self.computed[sid] = cached
        self._compute(sid, data.draw(st.integers(cached, len(prompt))))

    def _compute(self, sid, upto):
        """Write the sequence's tokens [computed, upto) into its blocks, then commit."""
        seq, table = self.seqs[sid], self.bm.block_table(sid)
        for p in range(self.computed[sid], upto):
            b = table[p // BS]
            assert self.bm.ref_count(b) == 1, "writing a shared block"
            self.mem[b][p % BS] = (p, tuple(seq[:p + 1]))
        self.computed[sid] = upto
        self.bm.commit(sid, upto, seq)
        for i in range(upto // BS):            # offload: every computed full block
            self.offloaded[tuple(seq[:(i + 1) * BS])] = list(self.mem[table[i]])

    @precondition(lambda self: self.landing)
    @rule(data=st.data())
    def land(self, data):
        """A load's copy has landed: its blocks enter the prefix cache (the scheduler's
        commit of the loaded tokens)."""
        self._land(data.draw(st.sampled_from(sorted(self.landing))))

    def _land(self, sid):
        for b, kv in self.landing.pop(sid):
            self.mem[b] = kv
        self.bm.commit(sid, self.computed[sid], self.seqs[sid])

    @precondition(lambda self: any(self.computed[s] < len(q) and s not in self.landing
                                   for s, q in self.seqs.items()))
    @rule(data=st.data())
    def compute_chunk(self, data):
        sid = data.draw(st.sampled_from(sorted(s for s, q in self.seqs.items()
                                               if self.computed[s] < len(q) and s not in self.landing)))
        self._compute(sid, data.draw(st.integers(self.computed[sid] + 1, len(self.seqs[sid]))))

    @precondition(lambda self: any(self.computed[s] == len(q) for s, q in self.seqs.items()))
    @rule(data=st.data(), new=st.lists(st.integers(0, 3), min_size=1, max_size=6))
    def append(self, data, new):
        sid = data.draw(st.sampled_from(sorted(s for s, q in self.seqs.items()
                                               if self.computed[s] == len(q))))
        old = len(self.seqs[sid])
        need = -(-(old + len(new)) // BS) - len(self.bm.block_table(sid))
        free_before = self.bm.num_free_blocks
        grown = self.seqs[sid] + new
        ok = self.bm.append_slots(sid, len(new))
        assert ok == (need <= free_before)
        if ok:
            assert self.bm.num_free_blocks == free_before - need
            self.seqs[sid] = grown
            self._compute(sid, len(grown))
        else:
            assert self.bm.num_tokens(sid) == old

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free(self, data):
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        self._free(sid)

    def _free(self, sid):
        if sid in self.landing:     # abandoned mid-copy: the copy ends before any reuse
            for b, kv in self.landing.pop(sid):
                self.mem[b] = kv
        self.bm.free(sid)
        del self.seqs[sid]

    @rule()
    def reset(self):
        self.bm.reset_prefix_cache()

    @rule()
    def free_all(self):
        for sid in list(self.seqs):
            self._free(sid)
        assert self.bm.stats()["kv_blocks_free"] == self.bm.stats()["kv_blocks_total"]

    @invariant()
    def consistent(self):
        check_invariants(self.bm, {sid: len(s) for sid, s in self.seqs.items()})
        s = self.bm.stats()
        assert s["prefix_cache_hit_tokens"] <= s["prefix_cache_queries"]

    def teardown(self):
        for sid in list(self.seqs):
            self._free(sid)
        assert self.bm.stats()["kv_blocks_free"] == self.bm.stats()["kv_blocks_total"]
        check_invariants(self.bm, {})


BlockManagerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                                 deadline=None)
TestBlockManagerMachine = BlockManagerMachine.TestCase
