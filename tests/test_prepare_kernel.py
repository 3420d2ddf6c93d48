"""runtime/prepare_kernel.py: one launch writes a step's inputs exactly as the torch path of
`PersistentBatch.prepare` does (interpreted on the CPU), and an engine gives the same
tokens with it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from braze.runtime.input_batch import KernelPrepare, PersistentBatch, static_buffers
from braze.runtime.scheduler import ScheduledChunk

S_MAX, T_MAX, MB, BS, MAX_LEN = 6, 96, 7, 4, 27


class _Req:
    class metrics:
        num_preemptions = 0

    def __init__(self, row: int):
        self.row, self.request_id = row, f"r{row}"


def _batch(seed: int, lora: bool, device: str = "cpu") -> PersistentBatch:
    gen = torch.Generator().manual_seed(seed)
    static = static_buffers(T_MAX, S_MAX, MB, device)
    if lora:
        static["lora_slots"] = torch.full((T_MAX,), -1, dtype=torch.int32, device=device)
    for t in static.values():        # garbage: whatever a step leaves unwritten shows
        t.copy_(torch.randint(-9, 99, t.shape, generator=gen).to(t.dtype))
    b = PersistentBatch(S_MAX, MAX_LEN, MB, BS, device, static)
    b.token_ids.copy_(torch.randint(0, 1000, b.token_ids.shape, generator=gen))
    b.block_table.copy_(torch.randint(0, 500, b.block_table.shape, generator=gen,
                                      dtype=torch.int32))
    if lora:
        b.lora_slot.copy_(torch.randint(-1, 4, b.lora_slot.shape, generator=gen,
                                        dtype=torch.int32))
    b._blocks_sent = [MB] * S_MAX     # every block-table entry is on the device already
    return b


@st.composite
def steps(draw):
    S = draw(st.integers(1, S_MAX))
    rows = draw(st.permutations(range(S_MAX)))[:S]
    decode = draw(st.booleans())
    chunks = []
    for r in rows:
        n = 1 if decode else draw(st.integers(1, 16))
        start = draw(st.integers(0, MAX_LEN - n))
        chunks.append(ScheduledChunk(_Req(r), n, start, draw(st.booleans())))
    T = sum(c.num_new for c in chunks)
    Sp = draw(st.integers(S, S_MAX))
    Tp = draw(st.integers(max(T, Sp), T_MAX))
    Rp = draw(st.one_of(st.none(), st.integers(Sp, min(Tp, S_MAX))))
    return chunks, Tp, Sp, Rp


def _same_step(step, lora: bool, seed: int, device: str) -> None:
    chunks, Tp, Sp, Rp = step
    want_batch, got_batch = _batch(seed, lora, device), _batch(seed, lora, device)
    got_batch.prepare_kernel = KernelPrepare(got_batch, interpret=device == "cpu")
    want = want_batch.prepare(chunks, None, Tp, Sp, Rp)
    got = got_batch.prepare(chunks, None, Tp, Sp, Rp)
    assert got_batch.prepare_kernel.launches == 1
    for name, t in want_batch.static.items():
        assert torch.equal(got_batch.static[name], t), name
    for key in ("rows", "seq_lens", "samples"):
        if want[key] is None:
            assert got[key] is None
        else:
            assert torch.equal(got[key], want[key]) and got[key].dtype == want[key].dtype, key


@settings(max_examples=25, deadline=None)
@given(step=steps(), lora=st.booleans(), seed=st.integers(0, 3))
def test_one_launch_writes_what_the_torch_ops_write(step, lora, seed):
    _same_step(step, lora, seed, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@settings(max_examples=40, deadline=None)
@given(step=steps(), lora=st.booleans(), seed=st.integers(0, 3))
def test_on_the_gpu_one_launch_writes_what_the_torch_ops_write(step, lora, seed):
    """The JIT-compiled kernel (Triton specialises the counts that equal 1 or divide by 16
    differently from the interpreter's one path) against the torch ops, on the GPU."""
    _same_step(step, lora, seed, "cuda")


def test_an_engine_decodes_the_same_tokens_with_the_fused_prepare(store):
    from braze.runtime import Engine, SamplingParams
    art = store.artifact("llama", opt_level=2)
    prompts = [[1, 17, 93, 4, 250, 66, 7], [5, 8, 13, 21, 34], list(range(3, 40))]
    params = SamplingParams(max_tokens=6, temperature=0.0)
    outs = {}
    for fused in (False, True):
        eng = Engine(art, backend="reference", num_kv_blocks=40, max_num_seqs=4,
                     max_num_tokens=64, fused_prepare=fused)
        assert (eng.runner.batch.prepare_kernel is not None) == fused
        for i, p in enumerate(prompts):
            eng.add_request(str(i), p, params)
        done = eng.run_to_completion()
        outs[fused] = [done[str(i)].token_ids for i in range(len(prompts))]
        if fused:     # prefill (mixed) steps and decode steps alike took the kernel
            assert eng.runner.batch.prepare_kernel.launches >= 6
    assert outs[True] == outs[False]


@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
@pytest.mark.parametrize("lora", [False, True])
def test_kernel_compiles_to_cubin(target, lora):
    """The signature the launch gives (int64 buffers, int32 sequence fields and tables)
    compiles for both GPUs, also with the step's counts specialised to the constant 1 as
    Triton does for a batch-1 decode step (S = S_pad = T = T_pad = R_pad = 1)."""
    import triton
    from pathlib import Path
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import braze.runtime.input_batch as input_batch
    from braze.kernel_modules import load_source
    path = Path(input_batch.__file__).with_name("prepare_kernel.py")
    fn = load_source("prepare_kernel", path.read_text(), str(path), False).prepare_step_kernel
    ptr = {"meta_ptr": "*i64", "token_ids_ptr": "*i64", "block_table_ptr": "*i32",
           "lora_slot_ptr": "*i32", "input_ids_ptr": "*i64",
           "positions_ptr": "*i64", "slot_mapping_ptr": "*i64", "qsl_ptr": "*i32",
           "seq_lens_ptr": "*i32", "block_tables_ptr": "*i32", "logits_indices_ptr": "*i64",
           "lora_out_ptr": "*i32" if lora else "*i64"}
    for s_is_one in (False, True):
        sig, constexprs = {}, {"BS": 16, "BLOCK": KernelPrepare.BLOCK, "HAS_LORA": lora}
        for name in fn.arg_names:
            if name in constexprs:
                sig[name] = "constexpr"
            elif name in ("S", "S_pad", "T", "T_pad", "R_pad") and s_is_one:
                sig[name], constexprs[name] = "constexpr", 1
            else:
                sig[name] = ptr.get(name, "i32")
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs={}),
                           target=GPUTarget("cuda", int(target[3:]), 32))
        assert k.asm["cubin"]
