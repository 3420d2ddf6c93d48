"""Ahead-of-time compilation of kernel variants to cubin, with no GPU.

`triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32))`
produces the same binary a GPU machine would JIT, so every kernel of an artifact
is proven to compile for each --targets entry (this catches what the interpreter
accepts but hardware rejects: bf16 tl.dot with K < 16, too much shared memory).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from braze.ir.errors import BrazeError
from braze.launch import aligned_attrs, kernel_signature


os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")    # as runtime/launcher.py: one default


def _load(path: Path):
    name = f"braze_aot_{abs(hash(str(path)))}_{path.stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


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
    sig = kernel_signature(launch, fn.arg_names)
    src = ASTSource(fn=fn, signature=sig, constexprs=launch["constexprs"],
                    attrs=aligned_attrs(fn.arg_names, sig))
    cap = int(target.removeprefix("sm_"))
    try:
        return triton.compile(src, target=GPUTarget("cuda", cap, 32),
                              options={"num_warps": launch["num_warps"],
                                       "num_stages": launch["num_stages"]})
    except Exception as e:  # triton raises many types; name the kernel and target
        raise BrazeError(f"kernel {launch['module']}.{launch['fn']} does not compile for "
                         f"{target}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
