"""One Triton launch for a sampling step without top-k / top-p / min-p: the work of
runtime/sampler.py `sample_batch(..., filter=False)`, which takes ~116 torch ops a step.

Loaded as source text (braze/kernel_modules.py `load_source`), never imported: the runtime
JIT-compiles it on the GPU at first use, or runs it under the interpreter on the CPU.

Program r takes logits row r, the sampling slot rows[r] (its temperature, seed) and the
output counter counters[r], and writes one token:
    temperature <= 0: the index of the row's first maximum (greedy);
    else:             the first maximum of logits / temperature + Gumbel noise,
where the noise of vocab entry v is exactly sampler.py's `gumbel_noise`:
-log(-log(u)), u = ((h >> 9) + 1/2) * 2^-23, h = lowbias32(key ^ lowbias32(v ^ salt)) and
key the row's `row_keys(seed, counter)`: the same 32-bit integers, so the same tokens but
where two scores tie to within the last bits of a float32 log.
"""

import triton
import triton.language as tl
# tl.max / tl.argmax are @jit functions of triton.language, which the interpreter does not
# patch in a process that imported triton without TRITON_INTERPRET (codegen/kernels/
# attention.py): tl.reduce with the standard library's combine functions is the same code
from triton.language.standard import _elementwise_max, _elementwise_min


@triton.jit
def _mix32(x):
    """lowbias32 on uint32: a bijective 32-bit mix (multiplications wrap mod 2^32)."""
    x = x ^ (x >> 16)
    x = x * tl.full(x.shape, 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def sample_rows_kernel(logits_ptr, rows_ptr, temperature_ptr, seeds_ptr, counters_ptr, out_ptr,
                       V, stride_l, BLOCK_V: tl.constexpr):
    r = tl.program_id(0)
    row = tl.load(rows_ptr + r)
    t = tl.load(temperature_ptr + row).to(tl.float32)
    greedy = t <= 0.0
    t = tl.where(greedy, 1.0, t)
    seed = tl.load(seeds_ptr + row).to(tl.int64)
    counter = tl.load(counters_ptr + r).to(tl.int64)
    m32 = 0xFFFFFFFF
    k = _mix32((seed & m32).to(tl.uint32) ^ tl.full((), 0x9E3779B9, tl.uint32))
    k = _mix32(k ^ ((seed >> 32) & m32).to(tl.uint32))
    k = _mix32(k ^ (counter & m32).to(tl.uint32))
    k = _mix32(k ^ ((counter >> 32) & m32).to(tl.uint32))
    best = tl.full((), float("-inf"), tl.float32)
    best_i = tl.full((), 0, tl.int32)
    base = logits_ptr + r.to(tl.int64) * stride_l
    for start in range(0, V, BLOCK_V):
        v = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + v, mask=v < V, other=float("-inf")).to(tl.float32)
        h = _mix32(k ^ _mix32(v.to(tl.uint32) ^ tl.full((BLOCK_V,), 0x85EBCA6B, tl.uint32)))
        u = ((h >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
        g = -tl.log(-tl.log(u))
        score = tl.where(greedy, x, tl.math.div_rn(x, t) + g)
        score = tl.where(v < V, score, float("-inf"))
        m = tl.reduce(score, 0, _elementwise_max)
        i = tl.reduce(tl.where(score == m, v - start, BLOCK_V), 0, _elementwise_min)
        take = m > best                       # strictly: an earlier block keeps a tie
        best_i = tl.where(take, start + i, best_i)
        best = tl.where(take, m, best)
    tl.store(out_ptr + r, best_i.to(tl.int64))
