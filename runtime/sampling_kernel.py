"""One Triton launch for a sampling step: the work of runtime/sampler.py `sample_batch`,
which takes ~116 torch ops a step (~139 with top-p, and a sort of every row).

Loaded as source text (braze/kernel_modules.py `load_source`), never imported: the runtime
JIT-compiles it on the GPU at first use, or runs it under the interpreter on the CPU.

Program r takes logits row r, the sampling slot rows[r] (its temperature, seed, and with
FILTER its top-k, top-p and min-p) and the output counter counters[r], and writes one token:
    temperature <= 0: the index of the row's first maximum (greedy);
    else:             the first maximum of s + Gumbel noise over the row's kept set, where
                      s = logits / temperature,
where the noise of vocab entry v is exactly sampler.py's `gumbel_noise`:
-log(-log(u)), u = ((h >> 9) + 1/2) * 2^-23, h = lowbias32(key ^ lowbias32(v ^ salt)) and
key the row's `row_keys(seed, counter)`: the same 32-bit integers, so the same tokens but
where two scores tie to within the last bits of a float32 log.

The kept set is sampler.py `_restrict`'s, found without sorting (the reference sorts every
row). It is a value threshold: {v : s_v >= floor} after min-p, then every entry at or above
the k-th largest (ties kept), then the entries whose rank r has r == 0 or a probability mass
ranked strictly above it (softmax over the top-k) below top_p. Per row:
  1. one pass for the max m; min-p's floor is m + log(min_p);
  2. top-k: the k-th largest value by a radix select on the floats' ordered bit patterns,
     four passes of 256-bin histograms (8 bits each);
  3. top-p: Z, the softmax denominator over the top-k (ties at the k-th value counted only
     as often as the sort would keep them), in the same pass as
  4. the draw: the first maximum of s + noise over the entries at or above the thresholds.
     With top-p < 1 the candidate c is checked in one pass: it is kept when nothing ranks
     above it or the mass above it, S(s_c) / Z, is below top_p. A rejected c raises a strict
     lower bound to s_c (the kept set is a prefix by value, so nothing at or below s_c is
     kept) and the draw is repeated over what is left. The first accepted candidate is the
     maximum over the kept set, because the kept set lies inside each set drawn from.
  5. a draw still rejected after ROUNDS rounds (a small top_p over a flat row) ends the
     loop: "kept" is monotone in the value, so the boundary is bisected over the ordered
     bit patterns between the last rejected value and the max (32 passes at most), and one
     draw over what is at or above it follows. No row loops without bound, whatever its
     numbers (a kernel that never ends would hang the GPU).
The masses are summed in another order than the reference's cumulative sum, so a token may
differ only where a candidate's mass above it equals top_p to within float32 rounding.
"""

import triton
import triton.language as tl
# tl.max / tl.argmax / tl.cumsum / tl.zeros are @jit functions of triton.language, which the
# interpreter does not patch in a process that imported triton without TRITON_INTERPRET
# (codegen/kernels/attention.py): tl.reduce / tl.associative_scan with the standard
# library's combine functions, and tl.full, are the same code
from triton.language.standard import _elementwise_max, _elementwise_min, _sum_combine


@triton.jit
def _mix32(x):
    """lowbias32 on uint32: a bijective 32-bit mix (multiplications wrap mod 2^32)."""
    x = x ^ (x >> 16)
    x = x * tl.full(x.shape, 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _scaled(base, v, V, t, floor):
    """s = logits / t for one block, -inf below the min-p floor and past the vocabulary."""
    x = tl.load(base + v, mask=v < V, other=float("-inf")).to(tl.float32)
    s = tl.math.div_rn(x, t)
    return tl.where((v < V) & (s >= floor), s, float("-inf"))


@triton.jit
def _ordered(s):
    """float32 -> uint32 with the same order (negative floats flipped, positive ones
    lifted above them)."""
    b = s.to(tl.uint32, bitcast=True)
    top = tl.full(b.shape, 0x80000000, tl.uint32)
    # b ^ all-ones, not ~b: Triton 3.6's interpreter inverts a uint32 by xor with -1
    return tl.where((b & top) != 0, b ^ tl.full(b.shape, 0xFFFFFFFF, tl.uint32), b | top)


@triton.jit
def _from_ordered(key):
    """_ordered's inverse: the float32 whose ordered bit pattern is `key`."""
    top = tl.full(key.shape, 0x80000000, tl.uint32)
    bits = tl.where((key & top) != 0, key & 0x7FFFFFFF,
                    key ^ tl.full(key.shape, 0xFFFFFFFF, tl.uint32))
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _mass_above(base, V, t, floor, c, m, BLOCK_V: tl.constexpr):
    """How many s are above c, and their exp(s - m) summed: one pass."""
    n_gt = tl.full((), 0, tl.int32)
    mass = tl.full((), 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        v = start + tl.arange(0, BLOCK_V)
        s = _scaled(base, v, V, t, floor)
        over = s > c
        n_gt += tl.reduce(over.to(tl.int32), 0, _sum_combine)
        mass += tl.reduce(tl.where(over, tl.exp(s - m), 0.0), 0, _sum_combine)
    return n_gt, mass


@triton.jit
def _kth_largest(base, V, t, floor, k, BLOCK_V: tl.constexpr):
    """The k-th largest s (0 < k < V, -inf entries included): a radix select, 8 bits at a
    time from the top, each a pass that counts the entries matching the bits found so far."""
    bins = tl.arange(0, 256)
    prefix = tl.full((), 0, tl.uint32)
    rem = k
    for d in tl.static_range(4):
        hist = tl.full((256,), 0, tl.int32)
        for start in range(0, V, BLOCK_V):
            v = start + tl.arange(0, BLOCK_V)
            key = _ordered(_scaled(base, v, V, t, floor))
            digit = ((key >> (24 - 8 * d)) & 0xFF).to(tl.int32)
            live = v < V
            if d > 0:
                live = live & ((key >> (32 - 8 * d)) == (prefix >> (32 - 8 * d)))
            hist += tl.histogram(digit, 256, mask=live)
        # entries in bin b or above: the total less the (inclusive) prefix sum, plus bin b
        at_or_above = (tl.reduce(hist, 0, _sum_combine)
                       - tl.associative_scan(hist, 0, _sum_combine) + hist)
        b = tl.reduce(tl.where(at_or_above >= rem, bins, 0), 0, _elementwise_max)
        rem -= tl.reduce(tl.where(bins > b, hist, 0), 0, _sum_combine)
        prefix = prefix | (b.to(tl.uint32) << (24 - 8 * d))
    return _from_ordered(prefix)


@triton.jit
def _draw(base, V, t, floor, tau, above, key, greedy, m, k, BLOCK_V: tl.constexpr,
          WITH_Z: tl.constexpr):
    """One pass: the first maximum of s + noise over {s >= tau, s > above} (of the raw
    logits for a greedy row), and, WITH_Z, Z = the softmax denominator over the top-k
    (threshold tau: the k-th largest s, or -inf with no top-k) relative to the max m."""
    best = tl.full((), float("-inf"), tl.float32)
    best_i = tl.full((), 0, tl.int32)
    z = tl.full((), 0.0, tl.float32)
    n_gt = tl.full((), 0, tl.int32)
    for start in range(0, V, BLOCK_V):
        v = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + v, mask=v < V, other=float("-inf")).to(tl.float32)
        s = tl.math.div_rn(x, t)
        s = tl.where((v < V) & (s >= floor), s, float("-inf"))
        h = _mix32(key ^ _mix32(v.to(tl.uint32) ^ tl.full((BLOCK_V,), 0x85EBCA6B, tl.uint32)))
        u = ((h >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
        g = -tl.log(-tl.log(u))
        score = tl.where((s >= tau) & (s > above), s + g, float("-inf"))
        score = tl.where(greedy, x, score)
        score = tl.where(v < V, score, float("-inf"))
        mx = tl.reduce(score, 0, _elementwise_max)
        i = tl.reduce(tl.where(score == mx, v - start, BLOCK_V), 0, _elementwise_min)
        take = mx > best                       # strictly: an earlier block keeps a tie
        best_i = tl.where(take, start + i, best_i)
        best = tl.where(take, mx, best)
        if WITH_Z:
            over = s > tau
            z += tl.reduce(tl.where(over, tl.exp(s - m), 0.0), 0, _sum_combine)
            n_gt += tl.reduce(over.to(tl.int32), 0, _sum_combine)
    if WITH_Z:
        # the sort keeps k entries: ties at the k-th value count as often as it keeps them
        z += tl.where(k > 0, (k - n_gt).to(tl.float32) * tl.exp(tau - m), 0.0)
    return best_i, z


@triton.jit
def sample_rows_kernel(logits_ptr, rows_ptr, temperature_ptr, seeds_ptr, counters_ptr, out_ptr,
                       top_k_ptr, top_p_ptr, min_p_ptr, V, stride_l,
                       BLOCK_V: tl.constexpr, FILTER: tl.constexpr, ROUNDS: tl.constexpr):
    r = tl.program_id(0)
    row = tl.load(rows_ptr + r)
    t = tl.load(temperature_ptr + row).to(tl.float32)
    greedy = t <= 0.0
    t = tl.where(greedy, 1.0, t)
    seed = tl.load(seeds_ptr + row).to(tl.int64)
    counter = tl.load(counters_ptr + r).to(tl.int64)
    m32 = 0xFFFFFFFF
    key = _mix32((seed & m32).to(tl.uint32) ^ tl.full((), 0x9E3779B9, tl.uint32))
    key = _mix32(key ^ ((seed >> 32) & m32).to(tl.uint32))
    key = _mix32(key ^ (counter & m32).to(tl.uint32))
    key = _mix32(key ^ ((counter >> 32) & m32).to(tl.uint32))
    base = logits_ptr + r.to(tl.int64) * stride_l
    neg = tl.full((), float("-inf"), tl.float32)
    floor = neg                   # min-p: s below it is dropped
    tau = neg                     # top-k: s below the k-th largest is dropped
    m = tl.full((), 0.0, tl.float32)
    k = tl.full((), 0, tl.int32)
    p = tl.full((), 1.0, tl.float32)
    if FILTER:
        k = tl.load(top_k_ptr + row).to(tl.int32)
        k = tl.where(greedy | (k >= V), 0, k)             # k >= V keeps every entry
        p = tl.where(greedy, 1.0, tl.load(top_p_ptr + row).to(tl.float32))
        min_p = tl.where(greedy, 0.0, tl.load(min_p_ptr + row).to(tl.float32))
        if (k > 0) | (p < 1.0) | (min_p > 0.0):
            m = neg
            for start in range(0, V, BLOCK_V):
                v = start + tl.arange(0, BLOCK_V)
                s = _scaled(base, v, V, t, neg)
                m = tl.maximum(m, tl.reduce(s, 0, _elementwise_max))
            floor = tl.where(min_p > 0.0, m + tl.log(min_p), neg)
            if k > 0:
                tau = _kth_largest(base, V, t, floor, k, BLOCK_V)
    best_i, z = _draw(base, V, t, floor, tau, neg, key, greedy, m, k, BLOCK_V, FILTER)
    if FILTER:
        busy = p < 1.0
        above = neg
        rounds = 0
        while busy:
            c = tl.math.div_rn(tl.load(base + best_i).to(tl.float32), t)
            n_gt, mass = _mass_above(base, V, t, floor, c, m, BLOCK_V)
            rejected = (n_gt > 0) & (mass / z >= p)
            if rejected:             # c is not kept, nor anything at or below it
                above = c
            rounds += 1
            busy = rejected & (rounds <= ROUNDS)
            if busy:                 # draw again, above c
                best_i, _ = _draw(base, V, t, floor, tau, above, key, greedy, m, k, BLOCK_V,
                                  False)
            if rejected & (rounds > ROUNDS):
                # bisect the boundary: `above` is not kept and the max is, and kept is
                # monotone in the value; then draw over what is at or above it
                lo = _ordered(above)
                hi = _ordered(m)
                for _ in range(32):
                    mid = lo + (hi - lo) // 2
                    n_gt, mass = _mass_above(base, V, t, floor, _from_ordered(mid), m, BLOCK_V)
                    step = hi - lo > 1
                    hi = tl.where(step & ((n_gt == 0) | (mass / z < p)), mid, hi)
                    lo = tl.where(step & (n_gt > 0) & (mass / z >= p), mid, lo)
                best_i, _ = _draw(base, V, t, floor, tl.maximum(tau, _from_ordered(hi)), neg,
                                  key, greedy, m, k, BLOCK_V, False)
    tl.store(out_ptr + r, best_i.to(tl.int64))
