"""Ahead-of-time compilation of kernel variants to cubin, with no GPU.

`triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32))`
produces the same binary a GPU machine would JIT, so every kernel of an artifact
is proven to compile for each --targets entry (this catches what the interpreter
accepts but hardware rejects: bf16 tl.dot with K < 16, too much shared memory).
"""

from __future__ import annotations

from pathlib import Path

from braze.ir.errors import BrazeError
from braze.kernel_modules import KernelModules
from braze.launch import aligned_attrs, kernel_signature


_MODULES: dict[str, object] = {}


def kernel_fn(kernel_dir: Path, launch: dict, sources: dict | None = None):
    """The @triton.jit function of a launch, loaded (once per process) the way the runtime
    loads it: templates from `kernel_dir`, generated modules from `sources`."""
    mods = _MODULES.setdefault(str(kernel_dir), KernelModules(Path(kernel_dir), interpret=False))
    mods.sources.update(sources or {})
    return mods.get(launch["module"], launch["fn"])


def compile_launch(kernel_dir: Path, launch: dict, target: str, sources: dict | None = None):
    """-> the triton CompiledKernel of one launch's variant for `target` ("sm_90").

    `sources` holds generated modules (name -> source) not in `kernel_dir`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = kernel_fn(kernel_dir, launch, sources)
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
