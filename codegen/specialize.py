"""Which specialisations of each kernel variant to compile ahead of time.

Triton's JIT compiles a kernel for what it sees at the call: ints equal to 1 become
constants, ints divisible by 16 and 16-byte aligned pointers get divisibility hints
(braze/launch.py's spec keys). Those hints are what let it vectorise loads, so a cubin
built without them is slower than the JIT. The runtime binds each launch once per
batch bucket (ir/contract.py's default buckets); here every launch site's runtime
arguments are evaluated at each bucket's step sizes, as the runtime will resolve them:

    buf, ws       pointers into the arena, parameters, static inputs: aligned ("D")
    int           the literal
    expr          the expression at the bucket's T, S, MB, R
    stride        the value's stride along the dim (ir/layout.py), where it is known
                  before run time; "-" otherwise
    float         never specialised

Each variant gets the keys of all its launch sites at all buckets, plus a generic key
in which every argument that varies between buckets assumes nothing: a launch the
compiler did not foresee (other buckets, another --max-num-seqs) runs the most
specialised stored cubin its own key admits, never the JIT. A guarded launch
(braze/launch.py `when`) is evaluated only at the buckets its guard admits.
"""

from __future__ import annotations

import json

import sympy

from braze.ir import Graph
from braze.ir.contract import StepLimits, bucket_sizes, default_buckets
from braze.ir.layout import Layouts
from braze.ir.types import SYMBOLS
from braze.launch import compile_expr, compile_guard, spec_char


def step_sizes(options: dict) -> list[dict[str, int]]:
    """The step symbols of every default bucket the compile options give."""
    lim = StepLimits.from_options(options)
    return [bucket_sizes(t, lim.max_num_seqs, lim.max_blocks, lim.max_logits_rows)
            for t in default_buckets(lim.max_num_tokens)]


def _arg_spec(a: dict, values: dict, layouts: Layouts):
    """One runtime argument: a spec char, or ("expr", text) / ("sym", expr) whose value at
    a bucket's step sizes gives one (hashable, so that launches alike are worked out once)."""
    if "buf" in a or "ws" in a:
        return "D"
    if "float" in a:
        return "-"
    if "int" in a:
        return spec_char(int(a["int"]))
    if "expr" in a:
        if "NB" in str(a["expr"]):
            return "-"                      # NB, the cache size, is chosen at run time
        return ("expr", str(a["expr"]))
    ref, dim = a["stride"]
    v = values.get(ref)
    stride = layouts(v)[dim] if v is not None else None
    if stride is None:
        return "-"
    if isinstance(stride, int):
        return spec_char(stride)
    expr = sympy.sympify(stride)
    if not expr.free_symbols <= {SYMBOLS[k] for k in ("T", "S", "MB", "R")}:
        return "-"
    return ("sym", expr)


def _at(spec, sizes: dict) -> str:
    kind, what = spec
    if kind == "expr":
        return spec_char(compile_expr(what)(sizes))
    return spec_char(int(what.subs({SYMBOLS[k]: n for k, n in sizes.items()})))


def _keys(specs: tuple, sizes_list: list[dict]) -> set[str]:
    """The spec keys of a launch whose arguments are `specs`: one per bucket, and a generic
    one in which every argument that varies between buckets assumes nothing."""
    per_bucket = ["".join(s if isinstance(s, str) else _at(s, sz) for s in specs)
                  for sz in sizes_list]
    if not per_bucket:
        return {"".join(s if isinstance(s, str) else "-" for s in specs)}
    varies = [len({k[i] for k in per_bucket}) > 1 for i in range(len(specs))]
    return set(per_bucket) | {"".join("-" if v else c for v, c in zip(varies, per_bucket[0]))}


def variant_keys(g: Graph, kernels: dict, launches: list[dict], sizes_list: list[dict]) -> dict:
    """-> {variant id: sorted spec keys to compile}, from every launch of the plan."""
    values, layouts = {v.ref: v for v in g.values()}, Layouts()   # by `%name` / `@param`
    keys: dict[str, set] = {vid: set() for vid in kernels}
    seen: dict[tuple, set] = {}          # the layers of a model launch alike: once each
    for launch in launches:
        if "kernel" not in launch:
            continue
        specs = tuple(_arg_spec(a, values, layouts) for a in launch["args"])
        when = launch.get("when")
        seen_key = (specs, json.dumps(when, sort_keys=True))
        if seen_key not in seen:
            holds = compile_guard(when)
            seen[seen_key] = _keys(specs, [sz for sz in sizes_list if holds(sz)])
        keys[launch["kernel"]] |= seen[seen_key]
    return {vid: sorted(k) for vid, k in keys.items()}
