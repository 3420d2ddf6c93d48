"""Skinny GEMMs: y[M, N] = x[M, K] @ W[N, K]^T (+ bias) for decode-sized M (a few tokens).

The `linear` op stays an extern cuBLAS call by default (ir/op_linalg.py registers it
`extern`, so this module lowers no op by itself: OPS is empty). `braze compile
--small-m-gemm triton` asks codegen/plan.py to lower each eligible `linear` here as
well, guarded to the batch buckets with T <= MAX_TOKENS (braze/launch.py `when`);
larger buckets keep the cuBLAS call. Which one is faster is for a GPU to measure
(benchmarks/kernel_bench.py, the `skinny_gemm` kernels); this is the candidate.

Why a kernel can win at small M: a decode step's GEMM reads all of W (N x K) to make
M x N outputs, so it is bound by streaming W from HBM; cuBLAS picks tiles for large
M and at M <= 16 may launch too few CTAs to keep every SM's loads in flight (a
2048 x 2048 projection is 32 tiles of 64 x 64 on a 132-SM GPU), or split K with a
separate reduction of its own. Here the grid is sized to the GPU instead.

Launch (the grid depends only on the rows M, an expression of T / S / R):
    skinny_gemm_kernel, grid (cdiv(N, BLOCK_N), SPLIT_K, cdiv(M, BLOCK_M)).
       Program (n, s, m) owns output columns [n * BLOCK_N, +BLOCK_N) of rows
       [m * BLOCK_M, +BLOCK_M) over the K range [s * K_PER_SPLIT, +K_PER_SPLIT), in
       BLOCK_K steps: x[BLOCK_M, BLOCK_K] @ W[BLOCK_N, BLOCK_K]^T with `tl.dot`, fp32
       accumulation. BLOCK_M = 16 (the smallest tile a 16-bit mma takes; padded rows
       cost tensor-core work, not bandwidth: their loads are masked off). At M = 1
       (bucket 1, the commonest decode step) a GEMV branch runs instead: W tiles times
       the broadcast x row on the CUDA cores into fp32 partials, one reduction over K
       at the end; Triton compiles an int argument equal to 1 in as a constant, so the
       bucket-1 cubin holds only that branch and larger buckets' only the mma one.
       With SPLIT_K = 1 it adds the bias and stores y in x's dtype; else it stores its
       fp32 partial sums to the workspace ws[SPLIT_K, M, N] and counts itself in
       `arrived[m, n]` (one acq_rel atomic after a barrier, as attention's decode path
       does); the split that arrives last sums the SPLIT_K partials of its tile in a
       fixed order (deterministic whichever split is last; read past L1), adds the bias
       in fp32, applies the gated epilogue, stores y once, rounded once, and sets the
       count back to 0 (`arrived` is a zeroed workspace, braze/launch.py). One launch
       either way: no reduce kernel follows.

Block choice (`plan`, static per (N, K, dtype)): the widest BLOCK_N of 64, 32, 16 that
still gives TARGET_PROGRAMS column blocks (two CTAs per SM of an H100/H200); when even
16 gives fewer than half of that (under one CTA per SM), SPLIT_K multiplies the programs
up to the target, keeping at least MIN_K_STEPS BLOCK_K steps per split. BLOCK_K makes each W tile TILE_BYTES (16 KB):
BLOCK_K = TILE_BYTES / (BLOCK_N * itemsize), at most K rounded up to a power of two, at
least 16 (a 16-bit mma's K). num_stages = 3 keeps ~48 KB of W loads in flight per CTA.
Llama-3-8B, bf16: qkv (N 6144) BLOCK_N 16 -> 384 programs; o (4096 x 4096) 256;
gate_up (28672) BLOCK_N 64 -> 448; down (4096 x 14336) 256; lm_head 2004; no split.
Llama-3.2-1B: down (2048 x 8192) splits K in 3 (128 -> 384 programs); qkv (3072: 192
programs) does not, nor o (2048 x 2048: K too short for 4 steps per split), gate_up, lm_head.
These are first guesses for a GPU session to tune (TARGET_PROGRAMS, TILE_BYTES,
NUM_WARPS, GEMV_STAGES): `benchmarks/kernel_bench.py --kernels skinny_gemm --gemm-configs sweep`
times each projection under a grid of them (device suite part 8).

Addressing: W is a parameter, a contiguous row-major [N, K] tensor (torch's linear
weight), so its row stride is the constexpr K and K-contiguous tiles load as 16-byte
vectors. x may be any strided [M, K] view (both strides are arguments; a stride of 1
is specialised to a constant by Triton). Offsets of W rows are int64 (an lm_head
passes 2^31 elements). Correct for any M (the grid's third axis tiles M); efficient
for M <= 16, where one program covers every row.

f32 models use input_precision="ieee" (tf32 would miss the reference by ~1e-3).
"""

import triton
import triton.language as tl
# tl.sum is a @jit function the interpreter does not patch when triton was imported first
# (codegen/kernels/norm.py): reduce with the builtin tl.reduce and tl.sum's combine function
from triton.language.standard import _sum_combine

OPS = ()                     # `linear` is extern; codegen/plan.py calls lower_linear

MAX_TOKENS = 16              # the buckets (T <= this) that run the kernel under --small-m-gemm triton
BLOCK_M = 16
TARGET_PROGRAMS = 264        # two CTAs per SM of a 132-SM H100 / H200
TILE_BYTES = 16 * 1024       # one W tile per pipeline stage
MIN_K_STEPS = 4              # a K split keeps at least this many BLOCK_K steps
MAX_SPLIT_K = 8
NUM_WARPS = 4
NUM_STAGES = 3               # mma branch: W tiles in flight per CTA (cp.async pipeline)
# GEMV branch (bucket 1): W tiles in flight per CTA. 1: none, a plain loop (each CTA loads a
# tile, multiplies, loads the next; 163 registers at 16 KiB tiles); 2+: Triton pipelines the
# loop through shared memory with cp.async (`tl.range(num_stages=)`; 118 registers, 17 KiB
# of shared memory per extra stage). Which is faster is device suite part 8's to measure.
GEMV_STAGES = 1
_ITEMSIZE = {"f32": 4, "f16": 2, "bf16": 2}


@triton.jit
def _glu(gate, up, ACT: tl.constexpr):
    """act(gate) * up in fp32, in the forms the pointwise kernels use (ACT 1 silu, 2 GeLU
    tanh, 3 GeLU erf); ACT 0: gate alone (no epilogue)."""
    if ACT == 1:
        return tl.div_rn(gate, 1.0 + tl.exp(-gate)) * up
    elif ACT == 2:
        z = 0.7978845608028654 * (gate + 0.044715 * (gate * gate * gate))
        tanh = 1.0 - tl.div_rn(2.0, tl.exp(2.0 * z) + 1.0)
        return 0.5 * gate * (1.0 + tanh) * up
    elif ACT == 3:
        return gate * 0.5 * (1.0 + tl.erf(gate * 0.7071067811865476)) * up
    else:
        return gate


@triton.jit
def _finish(y, y2, b_ptr, out, mask, rn, n_ok, N_OUT: tl.constexpr, HAS_BIAS: tl.constexpr,
            ACT: tl.constexpr):
    """The fp32 sums of a tile ([BLOCK_N], or [BLOCK_M, BLOCK_N]) -> + bias, the gated
    epilogue, one rounding to the output's dtype, stored at the pointers `out`."""
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        if ACT > 0:
            y2 += tl.load(b_ptr + N_OUT + rn, mask=n_ok, other=0.0).to(tl.float32)
    y = _glu(y, y2, ACT)
    tl.store(out, y.to(out.dtype.element_ty), mask=mask)


@triton.jit
def skinny_gemm_kernel(x_ptr, w_ptr, b_ptr, out_ptr, ws_ptr, arrived_ptr, M, stride_xm, stride_xk,
                       stride_om,
                       N: tl.constexpr, K: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                       K_PER_SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, ACT: tl.constexpr = 0,
                       GEMV_STAGES: tl.constexpr = 1):
    # ACT > 0: a gated epilogue (linear_glu): W's rows [0, N/2) are the gate, [N/2, N) the
    # up projection; program n computes both halves' columns n*BLOCK_N.. and stores
    # act(gate) * up into out[M, N/2] (or both halves' partials into ws[SPLIT_K, M, N])
    N_OUT = N // 2 if ACT > 0 else N
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N_OUT
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * K
    w_up = w_rows + N_OUT * K                     # read only with ACT > 0
    k_first = pid_k * K_PER_SPLIT
    if M == 1:
        # bucket 1: Triton compiles an int argument equal to 1 in as a constant, so its cubin
        # holds only this branch, a GEMV on the CUDA cores: each thread multiplies its W
        # elements by the broadcast x row into fp32 partial sums, reduced across K once at
        # the end; no padded rows, no shared-memory round trip of W into an mma layout
        part1 = tl.full([BLOCK_N, BLOCK_K], 0.0, tl.float32)
        part2 = tl.full([BLOCK_N, BLOCK_K], 0.0, tl.float32)
        for step in tl.range(0, K_PER_SPLIT, BLOCK_K, num_stages=GEMV_STAGES):
            kv = k_first + step + tl.arange(0, BLOCK_K)
            kv_ok = kv < K
            w_ok = n_ok[:, None] & kv_ok[None, :]
            xv = tl.load(x_ptr + kv * stride_xk, mask=kv_ok, other=0.0).to(tl.float32)
            wv = tl.load(w_rows + kv[None, :], mask=w_ok, other=0.0)
            part1 += wv.to(tl.float32) * xv[None, :]
            if ACT > 0:
                wu = tl.load(w_up + kv[None, :], mask=w_ok, other=0.0)
                part2 += wu.to(tl.float32) * xv[None, :]
        y = tl.reduce(part1, 1, _sum_combine)
        y2 = tl.reduce(part2, 1, _sum_combine)
        if SPLIT_K == 1:
            _finish(y, y2, b_ptr, out_ptr + rn, n_ok, rn, n_ok, N_OUT, HAS_BIAS, ACT)
        else:
            tl.store(ws_ptr + pid_k.to(tl.int64) * N + rn, y, mask=n_ok)
            if ACT > 0:
                tl.store(ws_ptr + pid_k.to(tl.int64) * N + N_OUT + rn, y2, mask=n_ok)
            # the split that finishes last sums them (attention.py's decode path does the
            # same: barrier, one acq_rel atomic, partials read past L1, count reset)
            tl.debug_barrier()
            count = arrived_ptr + pid_n
            if tl.atomic_add(count, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1:
                y = tl.full([BLOCK_N], 0.0, tl.float32)
                y2 = tl.full([BLOCK_N], 0.0, tl.float32)
                for s in tl.static_range(SPLIT_K):     # a fixed order: the same sum every run
                    y += tl.load(ws_ptr + s * N + rn, mask=n_ok, other=0.0, cache_modifier=".cg")
                    if ACT > 0:
                        y2 += tl.load(ws_ptr + s * N + N_OUT + rn, mask=n_ok, other=0.0,
                                      cache_modifier=".cg")
                _finish(y, y2, b_ptr, out_ptr + rn, n_ok, rn, n_ok, N_OUT, HAS_BIAS, ACT)
                tl.atomic_xchg(count, 0, sem="relaxed", scope="gpu")
    else:
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = rm < M
        x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
        acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
        acc2 = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
        for step in range(0, K_PER_SPLIT, BLOCK_K):
            k = k_first + step + tl.arange(0, BLOCK_K)
            k_ok = k < K
            w_ok = n_ok[:, None] & k_ok[None, :]
            x = tl.load(x_rows + k[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0)
            w = tl.load(w_rows + k[None, :], mask=w_ok, other=0.0)
            acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
            if ACT > 0:
                wu = tl.load(w_up + k[None, :], mask=w_ok, other=0.0)
                acc2 += tl.dot(x, tl.trans(wu), input_precision=DOT_PRECISION)
        mn_ok = m_ok[:, None] & n_ok[None, :]
        out = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
        if SPLIT_K == 1:
            _finish(acc, acc2, b_ptr, out, mn_ok, rn, n_ok, N_OUT, HAS_BIAS, ACT)
        else:
            part = ws_ptr + (pid_k * M + rm).to(tl.int64)[:, None] * N + rn[None, :]
            tl.store(part, acc, mask=mn_ok)
            if ACT > 0:
                tl.store(part + N_OUT, acc2, mask=mn_ok)
            tl.debug_barrier()
            count = arrived_ptr + pid_m * tl.num_programs(0) + pid_n
            if tl.atomic_add(count, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1:
                acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
                acc2 = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
                for s in tl.static_range(SPLIT_K):
                    part = ws_ptr + (s * M + rm).to(tl.int64)[:, None] * N + rn[None, :]
                    acc += tl.load(part, mask=mn_ok, other=0.0, cache_modifier=".cg")
                    if ACT > 0:
                        acc2 += tl.load(part + N_OUT, mask=mn_ok, other=0.0, cache_modifier=".cg")
                _finish(acc, acc2, b_ptr, out, mn_ok, rn, n_ok, N_OUT, HAS_BIAS, ACT)
                tl.atomic_xchg(count, 0, sem="relaxed", scope="gpu")


@triton.jit
def glu_kernel(h_ptr, out_ptr, M, stride_hm, stride_om, N_OUT: tl.constexpr,
               BLOCK: tl.constexpr, ACT: tl.constexpr):
    """out[m, j] = act(h[m, j]) * h[m, N_OUT + j]: a linear_glu's epilogue on its own, after
    cuBLAS wrote h (the buckets the skinny kernel does not serve). Rounded like the model:
    each half is h's dtype already; act(gate) is rounded to it before the product."""
    rn = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row = tl.program_id(1).to(tl.int64)
    ok = rn < N_OUT
    gate = tl.load(h_ptr + row * stride_hm + rn, mask=ok, other=0.0)
    up = tl.load(h_ptr + row * stride_hm + N_OUT + rn, mask=ok, other=0.0)
    act = _glu(gate.to(tl.float32), 1.0, ACT).to(gate.dtype)
    y = act.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * stride_om + rn, y.to(out_ptr.dtype.element_ty), mask=ok)


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def plan(n: int, k: int, dtype: str, target: int | None = None,
         tile_bytes: int | None = None) -> dict:
    """Static tile sizes for one (N, K, dtype) (also used by tests and benchmarks); `target`
    programs and `tile_bytes` default to the module's TARGET_PROGRAMS and TILE_BYTES, read
    at the call (tests shrink them to reach the split-K path at tiny shapes)."""
    target = target or TARGET_PROGRAMS
    tile_bytes = tile_bytes or TILE_BYTES
    block_n = 16
    for bn in (64, 32, 16):
        if -(-n // bn) >= target:
            block_n = bn
            break
    block_k = max(16, min(tile_bytes // (block_n * _ITEMSIZE[dtype]), _pow2(k)))
    programs = -(-n // block_n)
    split = 1
    if 2 * programs < target:          # under one CTA per SM: split K up to the target
        split = max(1, min(MAX_SPLIT_K, -(-target // programs), k // (block_k * MIN_K_STEPS)))
    k_per_split = -(-(-(-k // split)) // block_k) * block_k
    split = -(-k // k_per_split)                       # no split left without K to sum
    return {"BLOCK_M": BLOCK_M, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split,
            "K_PER_SPLIT": k_per_split,
            "DOT_PRECISION": "ieee" if dtype == "f32" else "tf32",
            "num_warps": NUM_WARPS, "num_stages": NUM_STAGES, "GEMV_STAGES": GEMV_STAGES}


def eligible(node) -> str | None:
    """Why this `linear` node cannot run here (None: it can). The kernel reads a 2-D x and a
    contiguous [N, K] weight parameter of a float dtype, with static N and K."""
    x, w = node.operands[0], node.operands[1]
    if x.type.rank != 2:
        return f"input {x.ref} is {x.type.rank}-D (the kernel takes [M, K] rows)"
    if not w.ref.startswith("@"):
        return f"weight {w.ref} is computed, not a parameter (its layout is unknown)"
    if x.type.dtype not in _ITEMSIZE:
        return f"dtype {x.type.dtype} (the kernel takes f32, f16, bf16)"
    if not all(isinstance(d, int) for d in w.type.shape):
        return f"weight {w.ref} has symbolic shape {w.type}"
    return None


# linear_glu's `act` -> the kernels' ACT (0: a plain linear)
ACTS = {"silu": 1, "gelu_tanh": 2, "gelu": 3}
GLU_BLOCK = 1024


def lower_linear(node, L) -> None:
    """Launches for one `linear` node (x[M, K], W[N, K], optional bias[N]) -> y[M, N], or a
    `linear_glu` node's y[M, N/2] (its h is not written)."""
    from braze.ir.errors import BrazeError

    why = eligible(node)
    if why is not None:
        raise BrazeError(f"{node.op}: cannot use the skinny GEMM kernel: {why}")
    x, w = node.operands[0], node.operands[1]
    bias = node.operands[2] if len(node.operands) > 2 else None
    out = node.results[0]
    act = ACTS[node.attrs["act"]] if node.op == "linear_glu" else 0
    n, k = w.type.shape
    n_out = n // 2 if act else n
    # a gated linear reads two W tiles (gate and up) per K step: half the tile each
    p = plan(n_out, k, x.type.dtype, tile_bytes=TILE_BYTES // 2 if act else None)
    rows = x.type.shape[0]
    M = L.expr(rows)
    m_text = M["expr"]
    split = p["SPLIT_K"]
    ws = L.ws("partials", [split, rows, n], "f32") if split > 1 else L.buf(out)
    # arrivals per output tile: [row tiles (at most rows), column tiles]
    arrived = (L.ws("arrived", [rows, -(-n_out // p["BLOCK_N"])], "i32", zero=True)
               if split > 1 else L.buf(out))
    b = L.buf(bias) if bias is not None else L.buf(w)          # not read without HAS_BIAS
    L.launch(skinny_gemm_kernel, grid=[f"cdiv({n_out}, {p['BLOCK_N']})", str(split),
                                       f"cdiv({m_text}, {p['BLOCK_M']})"],
             args=[L.buf(x), L.buf(w), b, L.buf(out), ws, arrived, M, L.stride(x, 0), L.stride(x, 1),
                   L.stride(out, 0)],
             constexprs={"N": n, "K": k, "BLOCK_M": p["BLOCK_M"], "BLOCK_N": p["BLOCK_N"],
                         "BLOCK_K": p["BLOCK_K"], "SPLIT_K": split,
                         "K_PER_SPLIT": p["K_PER_SPLIT"], "HAS_BIAS": bias is not None,
                         "DOT_PRECISION": p["DOT_PRECISION"], "ACT": act,
                         "GEMV_STAGES": p["GEMV_STAGES"]},
             num_warps=p["num_warps"], num_stages=p["num_stages"])


def lower_glu_epilogue(node, L) -> None:
    """A `linear_glu` node's y from its h (which an extern cuBLAS call wrote): one launch."""
    y, h = node.results
    n_out = y.type.shape[-1]
    rows = L.rows(y)
    L.launch(glu_kernel, grid=[f"cdiv({n_out}, {GLU_BLOCK})", rows],
             args=[L.buf(h), L.buf(y), L.expr(rows), L.stride(h, -2), L.stride(y, -2)],
             constexprs={"N_OUT": n_out, "BLOCK": GLU_BLOCK, "ACT": ACTS[node.attrs["act"]]},
             num_warps=4, num_stages=1)
