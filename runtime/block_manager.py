"""A paged KV block manager with prefix caching (in the style of vLLM's).

Each sequence owns a block table: block `i` holds its tokens `[i*bs, (i+1)*bs)`.
Blocks carry reference counts; a block with count 0 is free. Full blocks are
hashed by chaining: `hash(block i) = hash((hash(block i-1), tuple(tokens of i)))`,
so equal hashes mean equal whole prefixes. A hashed block stays in the prefix
cache after it is freed ("cached free") and a later prompt with the same prefix
reuses it (ref count +1, out of the free queue) instead of recomputing it.
Free blocks live in two pools: plain ones (no hash), used first, and cached ones
in an LRU queue ordered by the time they were freed; when no plain block is left
the least recently freed cached block is evicted (its hash dropped) and reused.
A sequence's table is freed tail first, so a prefix's later blocks are evicted
before its head. Only full blocks are cached or shared, so a sequence's last,
partial block is always private and appending never writes a shared block.

A block's hash is registered only once its tokens are in the cache: the engine
calls `commit(seq_id, num_computed)` after each step. A prompt prefilled in
chunks over several steps holds blocks whose contents are not written yet, and
another sequence must never hit those. Pure Python; no torch.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from braze.ir.errors import BrazeError


class _Seq:
    __slots__ = ("table", "num_tokens", "hashes", "registered", "salt")

    def __init__(self, salt=None):
        self.salt = salt                 # the first block's hash chains from it (LoRA adapter)
        self.table: list[int] = []
        self.num_tokens = 0
        self.hashes: list[int] = []      # chained hashes of the sequence's full blocks
        self.registered = 0              # leading blocks whose hashes are in the prefix cache


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True):
        if not isinstance(num_blocks, int) or num_blocks <= 0:
            raise BrazeError(f"num_blocks must be a positive integer, got {num_blocks!r}")
        if not isinstance(block_size, int) or block_size <= 0:
            raise BrazeError(f"block_size must be a positive integer, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._plain_free: deque[int] = deque(range(num_blocks))
        self._cached_free: OrderedDict[int, None] = OrderedDict()   # LRU: oldest freed first
        self._block_hash: dict[int, int] = {}     # block -> hash, for cached blocks
        self._cached: dict[int, int] = {}         # hash -> block
        self._seqs: dict[object, _Seq] = {}
        self._hit_tokens = 0
        self._query_tokens = 0
        self._evictions = 0
        # when a list: (seq_id, block index, block) of each block `commit` puts into the
        # prefix cache, for the engine to offload (runtime/kv_offload.py)
        self.registrations: list | None = None

    # ----------------------------------------------------------------- queries

    @property
    def num_free_blocks(self) -> int:
        """Blocks available to allocate: plain free plus evictable cached ones."""
        return len(self._plain_free) + len(self._cached_free)

    def block_table(self, seq_id) -> list[int]:
        return list(self._seq(seq_id).table)

    def table_len(self, seq_id) -> int:
        return len(self._seqs[seq_id].table)

    def table_since(self, seq_id, start: int) -> list[int]:
        """The sequence's blocks from index `start` on (what a device copy of its table lacks)."""
        return self._seq(seq_id).table[start:]

    def num_tokens(self, seq_id) -> int:
        return self._seq(seq_id).num_tokens

    def num_registered(self, seq_id) -> int:
        """Leading blocks of the sequence that are in the prefix cache (0 when unknown)."""
        seq = self._seqs.get(seq_id)
        return 0 if seq is None else seq.registered

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    def is_cached(self, block: int) -> bool:
        return block in self._block_hash

    def free_blocks(self) -> list[int]:
        """The free blocks: plain ones, then cached ones in eviction (LRU) order."""
        return list(self._plain_free) + list(self._cached_free)

    def seq_ids(self) -> list:
        return list(self._seqs)

    def __contains__(self, seq_id) -> bool:
        return seq_id in self._seqs

    def stats(self) -> dict:
        return {
            "kv_blocks_total": self.num_blocks,
            "kv_blocks_free": self.num_free_blocks,
            "prefix_cache_hit_tokens": self._hit_tokens,
            "prefix_cache_queries": self._query_tokens,
            "evictions": self._evictions,
        }

    # ----------------------------------------------------------------- hashing

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _chain(self, token_ids, start_hashes: list[int], upto_blocks: int,
               salt=None) -> list[int]:
        """Extend `start_hashes` to the hashes of the first `upto_blocks` full blocks. A
        `salt` (a LoRA adapter's identity) starts the chain, so the same tokens under
        different adapters never share a block."""
        hashes = list(start_hashes)
        bs = self.block_size
        for i in range(len(hashes), upto_blocks):
            prev = hashes[-1] if hashes else salt
            hashes.append(hash((prev, tuple(token_ids[i * bs:(i + 1) * bs]))))
        return hashes

    def _hits(self, token_ids, use_cache: bool = True, salt=None) -> tuple[list[int], list[int]]:
        """(hashes of the prompt's full blocks, the cached blocks of its longest cached
        prefix, capped so at least one token is left to compute; none if not use_cache)."""
        n = len(token_ids)
        hashes = self._chain(token_ids, [], n // self.block_size, salt)
        hits: list[int] = []
        if self.enable_prefix_caching and use_cache:
            for h in hashes[: (n - 1) // self.block_size]:
                b = self._cached.get(h)
                if b is None:
                    break
                hits.append(b)
        return hashes, hits

    def _register(self, block: int, h: int) -> bool:
        if self.enable_prefix_caching and h not in self._cached and block not in self._block_hash:
            self._cached[h] = block
            self._block_hash[block] = h
            return True
        return False

    def cached_prefix_blocks(self, token_ids, salt=None) -> int:
        """How many leading blocks of this prompt the prefix cache holds (what `allocate`
        would reuse)."""
        return len(self._hits(token_ids, salt=salt)[1])

    def adopt(self, seq_id, num_blocks: int, register: bool = True) -> list[int]:
        """The sequence's next `num_blocks` blocks after those already in the prefix cache
        are filled from elsewhere (a lower KV tier). Returns their block ids, for the caller
        to fill before a step reads them. With `register` they enter the prefix cache as
        computed now; without, they stay the sequence's own until `commit` (once their copy
        has landed: another prompt must not hit blocks still being written)."""
        seq = self._seq(seq_id)
        first = seq.registered
        if num_blocks < 0 or first + num_blocks > (seq.num_tokens - 1) // self.block_size:
            raise BrazeError(f"sequence {seq_id!r}: cannot adopt {num_blocks} block(s) after "
                             f"{first}: at least one token of its {seq.num_tokens} must be left "
                             f"to compute")
        if register:
            for i in range(first, first + num_blocks):
                self._register(seq.table[i], seq.hashes[i])
            seq.registered = first + num_blocks
        return seq.table[first:first + num_blocks]

    # -------------------------------------------------------------- allocation

    def _take(self, n: int) -> list[int]:
        """Pop `n` free blocks (the caller checked there are enough), plain ones first,
        then evicting the least recently freed cached ones."""
        out = []
        for _ in range(n):
            if self._plain_free:
                b = self._plain_free.popleft()
            else:
                b, _ = self._cached_free.popitem(last=False)
                del self._cached[self._block_hash.pop(b)]
                self._evictions += 1
            self._ref[b] = 1
            out.append(b)
        return out

    def _fits(self, need: int, hits: list[int], watermark: int) -> bool:
        reclaimed = sum(1 for b in hits if self._ref[b] == 0)   # hits leave the free pool
        return need <= self.num_free_blocks - reclaimed - watermark

    def can_allocate(self, token_ids, watermark: int = 0, use_cache: bool = True,
                     salt=None) -> bool:
        """Whether `allocate` would succeed for this prompt now, keeping `watermark`
        free blocks in reserve (for running sequences' decode steps)."""
        if len(token_ids) == 0:
            return False
        _, hits = self._hits(token_ids, use_cache, salt)
        need = self._blocks_for(len(token_ids)) - len(hits)
        return self._fits(need, hits, watermark)

    def allocate(self, seq_id, token_ids, use_cache: bool = True, salt=None) -> int:
        """Give a new sequence blocks for its prompt, reusing cached prefix blocks (unless
        not `use_cache`: a request that needs every prompt position computed).
        Returns the number of cached tokens (a multiple of block_size, < len(token_ids))."""
        if seq_id in self._seqs:
            raise BrazeError(f"sequence {seq_id!r} already has blocks; free it first")
        n = len(token_ids)
        if n == 0:
            raise BrazeError(f"sequence {seq_id!r} has an empty prompt")
        hashes, hits = self._hits(token_ids, use_cache, salt)
        need = self._blocks_for(n) - len(hits)
        if not self._fits(need, hits, 0):
            raise BrazeError(
                f"KV cache exhausted: sequence {seq_id!r} needs {need} more block(s) for "
                f"{n} tokens, {self.num_free_blocks} free of {self.num_blocks}; check "
                f"can_allocate() before admitting, or give the cache more blocks")
        for b in hits:
            if self._ref[b] == 0:
                del self._cached_free[b]
            self._ref[b] += 1
        seq = _Seq(salt)
        seq.table = hits + self._take(need)
        seq.num_tokens = n
        seq.hashes = hashes
        seq.registered = len(hits)
        self._seqs[seq_id] = seq
        if self.enable_prefix_caching:
            self._query_tokens += n
            self._hit_tokens += len(hits) * self.block_size
        return len(hits) * self.block_size

    def append_slots(self, seq_id, num_new_tokens: int) -> bool:
        """Grow a running sequence by `num_new_tokens` (their values need not be known yet:
        a token still being sampled on the device counts). Returns False (changing
        nothing) when the blocks run out: the caller preempts something and retries."""
        seq = self._seq(seq_id)
        if num_new_tokens < 0:
            raise BrazeError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        total = seq.num_tokens + num_new_tokens
        if total <= len(seq.table) * self.block_size:      # room in its last block
            seq.num_tokens = total
            return True
        need = self._blocks_for(total) - len(seq.table)
        if need > self.num_free_blocks:
            return False
        seq.table.extend(self._take(need))
        seq.num_tokens = total
        return True

    def reserve(self, seq_id, total: int) -> bool:
        """Hold slots for the sequence's first `total` tokens (no-op if it already does):
        `append_slots` of the difference, as one cheap call for the decode hot path."""
        seq = self._seqs[seq_id]
        if total <= seq.num_tokens:
            return True
        if total <= len(seq.table) * self.block_size:
            seq.num_tokens = total
            return True
        return self.append_slots(seq_id, total - seq.num_tokens)

    def commit(self, seq_id, num_computed: int, token_ids=None) -> None:
        """The first `num_computed` tokens of the sequence are now in the cache: put its
        full blocks among them into the prefix cache. `token_ids` (at least
        `num_computed` of them) is needed once decoding has filled blocks past the prompt."""
        seq = self._seq(seq_id)
        upto = hash_computed(self._chain, self.block_size, seq_id, seq, num_computed, token_ids)
        log = self.registrations
        for i in range(seq.registered, upto):
            if self._register(seq.table[i], seq.hashes[i]) and log is not None:
                log.append((seq_id, i, seq.table[i]))
        seq.registered = max(seq.registered, upto)

    def free(self, seq_id) -> None:
        """Release a sequence's blocks; those no longer referenced become free, hashed
        ones staying in the prefix cache until evicted. Tail blocks are freed first."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            raise BrazeError(f"sequence {seq_id!r} has no blocks to free")
        for b in reversed(seq.table):
            self._release(b)

    def _release(self, b: int) -> None:
        """Drop one reference to block b; unreferenced, it becomes free (a hashed one
        stays in the prefix cache until evicted)."""
        self._ref[b] -= 1
        if self._ref[b] == 0:
            if b in self._block_hash:
                self._cached_free[b] = None
            else:
                self._plain_free.append(b)

    def truncate(self, seq_id, num_tokens: int) -> None:
        """Shrink a running sequence to its first `num_tokens` tokens, freeing the blocks
        past them: the slots of speculative tokens the verification rejected. Blocks
        already in the prefix cache are never cut (they hold computed tokens)."""
        seq = self._seq(seq_id)
        if not seq.registered * self.block_size <= num_tokens <= seq.num_tokens:
            raise BrazeError(f"sequence {seq_id!r}: cannot truncate to {num_tokens} tokens "
                             f"(it holds {seq.num_tokens}, {seq.registered} blocks cached)")
        keep = self._blocks_for(num_tokens)
        for b in reversed(seq.table[keep:]):
            self._release(b)
        del seq.table[keep:]
        del seq.hashes[keep:]
        seq.num_tokens = num_tokens

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash: cached free blocks become plain free blocks, and
        blocks in use will not be cached when freed."""
        for b in self._cached_free:
            self._plain_free.append(b)
        self._cached_free.clear()
        self._cached.clear()
        self._block_hash.clear()

    def _seq(self, seq_id) -> _Seq:
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise BrazeError(f"unknown sequence {seq_id!r}")
        return seq


def hash_computed(chain, block_size: int, seq_id, seq, num_computed: int, token_ids) -> int:
    """Check a commit of `num_computed` tokens against what `seq` holds, extend its block
    hashes through the full blocks among them with `chain`, and return how many there are."""
    if not 0 <= num_computed <= seq.num_tokens:
        raise BrazeError(f"sequence {seq_id!r}: {num_computed} computed tokens, but it "
                         f"holds {seq.num_tokens}")
    upto = num_computed // block_size
    if upto > len(seq.hashes):
        if token_ids is None or len(token_ids) < upto * block_size:
            raise BrazeError(f"sequence {seq_id!r}: committing {num_computed} tokens "
                             f"needs their ids to hash its blocks")
        seq.hashes = chain(token_ids, seq.hashes, upto, seq.salt)
    return upto
