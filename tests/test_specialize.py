"""Kernel specialisation: the cubins codegen compiles are what Triton's JIT would build.

Two halves, both checked without a GPU: the spec keys compiled for each kernel variant
include the key of every launch the runtime binds (codegen/specialize.py foresees the
argument values), and a key turns into the same Triton source (signature, constants,
divisibility hints) that Triton's own JIT derives from argument values with that key."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from braze.ir.types import torch_dtype
from braze.launch import specialised_source

_TRITON_TO_IR = {"fp32": "f32", "fp16": "f16", "bf16": "bf16", "fp64": "f64", "i64": "i64",
                 "i32": "i32", "i16": "i16", "i8": "i8", "u8": "u8", "i1": "bool"}


@pytest.mark.parametrize("case", ["llama", "qwen3_moe-dense-middle", "qwen3-headdim24-tied",
                                  "phi3-longrope-partial-tied", "gemma4-ple-kvshare-moe"])
def test_compiled_specs_foresee_every_bound_launch(store, case):
    """The spec keys codegen compiles each kernel for (codegen/specialize.py) include the key
    of every launch the runtime binds, at every default bucket: on a GPU each launch then
    runs a cubin built for exactly what Triton's JIT would have built. Pointers count as
    aligned as they would be on a GPU: by their byte offset into their storage (a CUDA
    allocation starts 256-byte aligned; the CPU's mmapped weights promise less), so a view
    at an odd offset (a slice of a merged projection, say) is seen here as Triton's JIT
    would see it there."""
    from braze.ir.contract import default_buckets
    from braze.runtime import Executor, open_artifact
    from braze.runtime.graph_runner import GraphRunner
    from braze.runtime.input_batch import static_buffers
    max_t, max_s = 48, 8
    art = open_artifact(store.artifact(case, opt_level=2, dtype="bfloat16", max_num_tokens=max_t,
                                       max_num_seqs=max_s, max_model_len=64))
    ex = Executor(art, backend="interpret", num_blocks=8)
    runner = GraphRunner(ex, static_buffers(max_t, max_s, ex.max_blocks, ex.device), None,
                         max_s, mode="piecewise")
    runner.capture()
    kernels = art.manifest["kernels"]
    seen = 0
    assert runner.buckets == default_buckets(max_t)
    for bucket in runner.buckets:
        for call in runner._buckets[bucket].plan.calls:
            if call.spec is None:
                continue
            ptr = [i for i, t in enumerate(kernels[call.name]["signature"]) if t.startswith("*")]
            key = list(call.spec)
            assert len(ptr) == len(call.tensors), call.name
            for i, (_, t) in zip(ptr, call.tensors):
                key[i] = "D" if (t.data_ptr() - t.untyped_storage().data_ptr()) % 16 == 0 else "-"
            key = "".join(key)
            assert key in kernels[call.name]["specs"], (bucket, call.name, key)
            seen += 1
    assert seen and any("1" in k for v in kernels.values() for k in v["specs"])


def _value_for(ty: str, c: str):
    """An argument value of Triton type `ty` whose spec char is `c`."""
    if ty.startswith("*"):
        t = torch.empty(64, dtype=torch_dtype(_TRITON_TO_IR[ty[1:]]))
        assert t.data_ptr() % 16 == 0
        return t if c == "D" else t[1:]
    if ty.startswith("fp"):
        return 0.5
    return {"1": 1, "D": 48, "-": 7}[c]


def _jit_source(fn, launch: dict, args: list):
    """(signature, constexprs by name, non-empty attrs) that Triton's JIT derives for a
    launch with these argument values, through its own binder, for an sm_90 target."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    backend = make_backend(GPUTarget("cuda", 90, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch["constexprs"], num_warps=launch["num_warps"],
                  num_stages=launch["num_stages"])
    bound, specialization, options = binder(*args, **kwargs)
    _, sig, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    constexprs = {fn.arg_names[path[0]]: v for path, v in constexprs.items()}
    return sig, constexprs, {k: v for k, v in attrs.items() if v}


@pytest.mark.parametrize("case", ["llama", "qwen3_moe-dense-middle"])
def test_a_spec_key_builds_the_source_the_jit_builds(store, case):
    from braze.codegen.aot import kernel_fn
    from braze.runtime import open_artifact
    art = open_artifact(store.artifact(case, opt_level=2))
    kernels = art.manifest["kernels"]
    launches = {l["kernel"]: l for s in art.manifest["plan"]["segments"] for l in s["launches"]
                if "kernel" in l}
    checked = 0
    for vid, launch in launches.items():
        fn = kernel_fn(art.root / "kernels", launch)
        for key in kernels[vid]["specs"] + ["".join("D" if t.startswith("*") else "-"
                                                    for t in kernels[vid]["signature"])]:
            args = [_value_for(a["ty"], c) for a, c in zip(launch["args"], key)]
            ours = specialised_source(launch, fn.arg_names, key)
            assert ours == _jit_source(fn, launch, args), (vid, key)
            checked += 1
    assert checked > len(launches)


@given(st.integers(min_value=-(2 ** 31), max_value=2 ** 31 - 1), st.sampled_from("1D-"))
def test_a_cubin_admits_only_values_it_was_built_for(v, compiled):
    """A cubin's assumption about an int argument holds for every value whose launch it
    admits: built for 1, it gets 1; built for multiples of 16, it gets one."""
    from braze.launch import admits, spec_char
    if admits(compiled, spec_char(v)):
        assert (compiled != "1" or v == 1) and (compiled != "D" or v % 16 == 0)
    assert admits("-", spec_char(v))


def _cache(stored: dict, built_with: str, targets=("sm_90",)):
    import triton

    from braze.runtime.cubins import CubinCache
    manifest = {"versions": {"triton": built_with or triton.__version__},
                "targets": list(targets), "files": {},
                "kernels": {"k#0": {"cubins": {"sm_90": stored}}}}
    cache = CubinCache("/nonexistent", manifest, modules=None)
    cache.target = "sm_90"                     # as on an H100 (this machine has no GPU)
    cache._load = lambda vid, launch, key: f"cubin {key}"
    return cache


def test_a_launch_takes_its_own_cubin_else_the_most_specialised_that_admits_it():
    import triton
    cache = _cache({"DD-": {}, "DD1": {}, "D--": {}}, triton.__version__)
    cache.usable = True
    assert cache.get("k#0", {}, "DD1") == "cubin DD1"        # its own
    assert cache.get("k#0", {}, "DDD") == "cubin DD-"        # DD- admits it, D-- too: DD- wins
    assert cache.get("k#0", {}, "D1-") == "cubin D--"
    assert cache.get("k#0", {}, "-D-") is None              # an unaligned pointer: none fits
    assert cache.counts() == {"cubin": 1, "cubin_less_specialised": 2, "jit": 1}


def test_cubins_from_another_triton_are_refused_loudly(caplog):
    from braze.runtime.cubins import unusable_reason
    with caplog.at_level("WARNING", logger="braze.runtime"):
        cache = _cache({"DD-": {}}, "0.0.1")
    assert not cache.usable and cache.get("k#0", {}, "DD-") is None
    assert cache.counts()["jit"] == 1
    import triton
    (record,) = [r for r in caplog.records if "cubins not used" in r.getMessage()]
    assert "triton 0.0.1" in record.getMessage() and f"triton {triton.__version__}" in record.getMessage()
    m = {"versions": {"triton": triton.__version__}, "targets": ["sm_80"]}
    assert "--targets sm_90" in unusable_reason(m, triton.__version__, "sm_90")
    assert unusable_reason(m, triton.__version__, "sm_80") is None
