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
from braze.launch import specialised_source


_MODULES: dict[str, object] = {}


def kernel_fn(kernel_dir: Path, launch: dict, sources: dict | None = None):
    """The @triton.jit function of a launch, loaded (once per process) the way the runtime
    loads it: templates from `kernel_dir`, generated modules from `sources`."""
    mods = _MODULES.setdefault(str(kernel_dir), KernelModules(Path(kernel_dir), interpret=False))
    mods.sources.update(sources or {})
    return mods.get(launch["module"], launch["fn"])


def pointers_only_key(launch: dict) -> str:
    """The spec key that assumes only 16-byte aligned pointers (braze/launch.py)."""
    return "".join("D" if a["ty"].startswith("*") else "-" for a in launch["args"])


def compile_launch(kernel_dir: Path, launch: dict, target: str, sources: dict | None = None,
                   key: str | None = None):
    """-> the triton CompiledKernel of one launch's variant for `target` ("sm_90"),
    specialised for spec `key` (default: aligned pointers, nothing else assumed).

    `sources` holds generated modules (name -> source) not in `kernel_dir`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = kernel_fn(kernel_dir, launch, sources)
    sig, constexprs, attrs = specialised_source(launch, fn.arg_names,
                                                key or pointers_only_key(launch))
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    cap = int(target.removeprefix("sm_"))
    try:
        return triton.compile(src, target=GPUTarget("cuda", cap, 32),
                              options={"num_warps": launch["num_warps"],
                                       "num_stages": launch["num_stages"]})
    except Exception as e:  # triton raises many types; name the kernel and target
        raise BrazeError(f"kernel {launch['module']}.{launch['fn']} (spec {key}) does not "
                         f"compile for {target}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
