"""Ahead-of-time compilation of kernel variants to cubin, with no GPU.

`triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32))`
produces the same binary a GPU machine would JIT, so every kernel of an artifact
is proven to compile for each --targets entry (this catches what the interpreter
accepts but hardware rejects: bf16 tl.dot with K < 16, too much shared memory).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from braze.ir.errors import BrazeError


def _load(path: Path):
    name = f"braze_aot_{abs(hash(str(path)))}_{path.stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def signature_of(launch: dict, fn) -> dict:
    names = list(fn.arg_names)
    sig, k = {}, 0
    for n in names:
        if n in launch["constexprs"]:
            sig[n] = "constexpr"
        else:
            sig[n] = launch["args"][k]["ty"]
            k += 1
    if k != len(launch["args"]):
        raise BrazeError(f"kernel {launch['fn']} takes {k} runtime args, launch gives "
                         f"{len(launch['args'])}")
    return sig


def aligned_attrs(fn, signature: dict) -> dict:
    """Every pointer argument 16-byte aligned, as Triton's JIT would specialise it on a GPU
    for our buffers (arena slots are 256-aligned; torch allocations too): without this the
    cubins fall back to scalar loads and no cp.async pipelining. The runtime checks the
    alignment before it launches a stored cubin (runtime/cubins.py)."""
    return {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
            if str(signature.get(n, "")).startswith("*")}


def compile_launch(kernel_dir: Path, launch: dict, target: str, sources: dict | None = None):
    """-> the triton CompiledKernel of one launch's variant for `target` ("sm_90").

    `sources` holds generated modules (name -> source) not in `kernel_dir`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    path = Path(kernel_dir) / f"{launch['module']}.py"
    if sources and launch["module"] in sources:
        from braze.runtime.launcher import KernelModules
        path = KernelModules(kernel_dir, False, dict(sources))._materialise(launch["module"])
    mod = _load(path)
    fn = getattr(mod, launch["fn"])
    sig = signature_of(launch, fn)
    src = ASTSource(fn=fn, signature=sig, constexprs=launch["constexprs"], attrs=aligned_attrs(fn, sig))
    cap = int(target.removeprefix("sm_"))
    try:
        return triton.compile(src, target=GPUTarget("cuda", cap, 32),
                              options={"num_warps": launch["num_warps"],
                                       "num_stages": launch["num_stages"]})
    except Exception as e:  # triton raises many types; name the kernel and target
        raise BrazeError(f"kernel {launch['module']}.{launch['fn']} does not compile for "
                         f"{target}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
