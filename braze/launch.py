"""Launch plans: the artifact schema for how a graph runs on kernels (shared by codegen and runtime).

Each IR node lowers to an ordered list of launches. A launch is plain JSON:

    {"node": 12, "kernel": "rms_norm.rms_norm_kernel#3", "grid": ["T", 1, 1],
     "args": [{"buf": "%11"}, {"buf": "@model.norm.weight"}, {"buf": "%12"},
              {"expr": "T"}, {"int": 64}, {"float": 1e-06}, {"stride": ["%11", 0]}],
     "constexprs": {"BLOCK": 64}, "num_warps": 4}

or an extern call that runs the IR op's torch implementation (GEMMs through cuBLAS, views):

    {"node": 13, "extern": "linear", "args": [{"buf": "%12"}, {"buf": "@w"}],
     "attrs": {}, "results": ["%13"]}

A launch may carry a guard, `"when": {"T": [1, 16]}`: it runs only at step sizes with
1 <= T <= 16 (`[17, null]`: T >= 17; any size of SIZES may be named). Two launch sets
for one node with complementary guards choose per batch bucket (`--small-m-gemm
triton`: a Triton GEMM at T <= 16, the cuBLAS call above). The runtime resolves guards
when it binds a plan for a bucket, so a bound plan (and its CUDA graph) holds only the
launches of its bucket and replay never tests one; the eager path tests each launch's
compiled guard per step. A workspace spec may carry the same guard: it is sized only
for the step sizes its launches run at.

A kernel launch may say `"decode_idle": true`: a decode-only step (one new token per
sequence) padded to T == S gives it nothing to do, because another launch of its node
covers that step whole (attention's prefill path, whose decode path then zeroes the
padding tokens). The runtime leaves such launches out of what a decode-only step runs:
the whole-step graph of mode full, and the eager break segments of the other modes.

Argument kinds: `buf` a graph value, param or input by reference; `ws` a
workspace buffer (declared by name with shape expressions and dtype, allocated
once for the largest batch; `"zero": true` allocates it zeroed, for a count that the
launches using it reset themselves, such as attention's split arrivals); `expr` an integer expression over the step sizes
T, S, MB (evaluated when a batch size is bound, never on the device); `int`,
`float` literals; `stride` a buffer's stride along a dim. Grid entries are
expressions too. Kernel ids name a variant (module, function, signature,
constexprs) in the manifest's kernel table; the same variant serves every launch
that shares them.
"""

from __future__ import annotations

from braze.ir.errors import BrazeError
from braze.launch_expr import SIZES
from braze.launch_expr import compile_expr  # noqa: F401  (the expression grammar's home)


def compile_guard(when):
    """A launch's or workspace's `when` (None, or {size: [lo, hi or None]}) -> a predicate on
    step sizes; an ill-formed guard (a plan is data from an artifact) is a BrazeError."""
    if when is None:
        return _always
    if not isinstance(when, dict) or not when:
        raise BrazeError(f"launch guard {when!r} is not a mapping of step sizes to [lo, hi]")
    bounds = []
    for name, rng in when.items():
        ok = (name in SIZES and isinstance(rng, list) and len(rng) == 2
              and all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in rng)
              and rng[0] is not None)
        if not ok:
            raise BrazeError(f"launch guard {when!r}: {name!r} must be a step size "
                             f"({', '.join(SIZES)}) bound to [lo, hi] (hi null: no bound)")
        bounds.append((name, rng[0], rng[1]))

    def holds(sizes) -> bool:
        for name, lo, hi in bounds:
            v = sizes[name]
            if v < lo or (hi is not None and v > hi):
                return False
        return True
    return holds


def _always(sizes) -> bool:
    return True


# How Triton's JIT specialises a kernel's runtime arguments, one character each, so that
# cubins compiled ahead of time are built for what the JIT would build at the launch site:
#   "1"  an int equal to 1: compiled in as a constant
#   "D"  an int divisible by 16, or a pointer aligned to 16 bytes (`tt.divisibility` 16)
#   "-"  neither; floats are never specialised
# A cubin built for key K runs any launch whose own key A it admits: where K says "1" or
# "D", A says the same (a "-" in K assumes nothing).

def spec_char(value) -> str:
    if isinstance(value, (bool, float)):
        return "-"
    if isinstance(value, int):
        return "1" if value == 1 else ("D" if value % 16 == 0 else "-")
    return "D" if value.data_ptr() % 16 == 0 else "-"


def spec_key(values) -> str:
    return "".join(spec_char(v) for v in values)


def admits(compiled: str, actual: str) -> bool:
    return len(compiled) == len(actual) and all(c == "-" or c == a for c, a in zip(compiled, actual))


def specialised_source(launch: dict, arg_names: list[str], key: str) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of Triton's ASTSource for a launch's kernel compiled
    for spec `key`: each parameter's type (constexprs, and ints specialised to 1, marked
    constexpr), the constexpr values, and the divisibility attributes by parameter index."""
    types = [a["ty"] for a in launch["args"]]
    runtime = [n for n in arg_names if n not in launch["constexprs"]]
    if len(runtime) != len(types):
        raise BrazeError(f"kernel {launch['fn']} takes {len(runtime)} runtime args, the launch "
                         f"gives {len(types)}")
    if len(key) != len(types):
        raise BrazeError(f"kernel {launch['fn']}: spec key {key!r} has {len(key)} entries for "
                         f"{len(types)} runtime args")
    sig, constexprs, attrs = {}, dict(launch["constexprs"]), {}
    by_name = dict(zip(runtime, zip(types, key)))
    for i, n in enumerate(arg_names):
        if n not in by_name:
            sig[n] = "constexpr"
            continue
        ty, c = by_name[n]
        if c == "1":
            if ty.startswith("*") or ty.startswith("fp"):
                raise BrazeError(f"kernel {launch['fn']}: argument {n} of type {ty} cannot be "
                                 f"specialised to 1")
            sig[n], constexprs[n] = "constexpr", 1
        else:
            sig[n] = ty
            if c == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, constexprs, attrs
