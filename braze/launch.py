"""Launch plans: the artifact schema for how a graph runs on kernels (shared by codegen and runtime).

Each IR node lowers to an ordered list of launches. A launch is plain JSON:

    {"node": 12, "kernel": "rms_norm.rms_norm_kernel#3", "grid": ["T", 1, 1],
     "args": [{"buf": "%11"}, {"buf": "@model.norm.weight"}, {"buf": "%12"},
              {"expr": "T"}, {"int": 64}, {"float": 1e-06}, {"stride": ["%11", 0]}],
     "constexprs": {"BLOCK": 64}, "num_warps": 4}

or an extern call that runs the IR op's torch implementation (GEMMs through cuBLAS, views):

    {"node": 13, "extern": "linear", "args": [{"buf": "%12"}, {"buf": "@w"}],
     "attrs": {}, "results": ["%13"]}

Argument kinds: `buf` a graph value, param or input by reference; `ws` a
workspace buffer (declared by name with shape expressions and dtype, allocated
once for the largest batch); `expr` an integer expression over the step sizes
T, S, MB (evaluated when a batch size is bound, never on the device); `int`,
`float` literals; `stride` a buffer's stride along a dim. Grid entries are
expressions too. Kernel ids name a variant (module, function, signature,
constexprs) in the manifest's kernel table; the same variant serves every launch
that shares them.
"""

from __future__ import annotations

from braze.ir.errors import BrazeError
from braze.launch_expr import compile_expr  # noqa: F401  (the expression grammar's home)


def kernel_signature(launch: dict, arg_names: list[str]) -> dict:
    """Triton's signature of a launch's kernel: each parameter's type, constexprs marked."""
    sig, k = {}, 0
    for n in arg_names:
        if n in launch["constexprs"]:
            sig[n] = "constexpr"
        else:
            if k >= len(launch["args"]):
                raise BrazeError(f"kernel {launch['fn']} takes more runtime args than the launch gives")
            sig[n] = launch["args"][k]["ty"]
            k += 1
    if k != len(launch["args"]):
        raise BrazeError(f"kernel {launch['fn']} takes {k} runtime args, launch gives "
                         f"{len(launch['args'])}")
    return sig


def aligned_attrs(arg_names: list[str], signature: dict) -> dict:
    """Every pointer argument 16-byte aligned, as Triton's JIT would specialise it on a GPU
    for our buffers (arena slots are 256-aligned; torch allocations too). Codegen compiles
    cubins with it and the runtime rebuilds the same source to load them, checking the
    alignment of the pointers it binds before it launches a stored cubin."""
    return {(i,): [["tt.divisibility", 16]] for i, n in enumerate(arg_names)
            if str(signature.get(n, "")).startswith("*")}
