"""`--small-m-gemm`: which `linear` nodes run the Triton skinny GEMM, and at which buckets.

    extern (default)  every linear is one extern call (torch.mm / addmm: cuBLAS on a GPU)
    triton            every eligible linear lowers to two launch sets with complementary
                      guards (braze/launch.py `when`): the skinny_gemm launches at
                      T <= MAX_TOKENS, the extern call at T > MAX_TOKENS

A plan for `triton`, node 13 (x: bf16[T, 2048], W: bf16[3072, 2048]):

    {"node": 13, "kernel": "skinny_gemm.skinny_gemm_kernel#4", "when": {"T": [1, 16]},
     "grid": ["cdiv(3072, 16)", "2", "cdiv(T, 16)"], ...}
    {"node": 13, "extern": "linear", "when": {"T": [17, null]}, ...}

The runtime binds each bucket's plan once (runtime/plan_executor.py): bucket 8 binds the
kernel, bucket 64 the cuBLAS call; nothing is decided per step on the bound path.
Whether the kernel beats cuBLAS is measured on a GPU (benchmarks/kernel_bench.py,
`--kernels skinny_gemm`); until then `extern` is the default. The plan records what was
chosen per linear under "small_m_gemm" for `braze inspect`.
"""

from __future__ import annotations

from braze.config import SMALL_M_GEMM as CHOICES
from braze.ir import Node
from braze.ir.errors import BrazeError

from .kernels import skinny_gemm
from .lowering import Lowering

MAX_TOKENS = skinny_gemm.MAX_TOKENS


def wants_triton(options: dict) -> bool:
    choice = options.get("small_m_gemm", "extern")
    if choice not in CHOICES:
        raise BrazeError(f"--small-m-gemm must be one of {', '.join(CHOICES)}, got {choice!r}")
    return choice == "triton"


def lower_guarded(node: Node, index: int) -> tuple[list[dict], dict, str | None]:
    """-> (the kernel launches, their workspaces, None) for an eligible `linear` (or
    `linear_glu`) node, both guarded to T <= MAX_TOKENS; or ([], {}, why not) for one the
    kernel cannot run."""
    why = skinny_gemm.eligible(node)
    if why is not None:
        return [], {}, why
    L = Lowering(node, "skinny_gemm", index)
    skinny_gemm.lower_linear(node, L)
    small = {"T": [1, MAX_TOKENS]}
    for launch in L.launches:
        launch["when"] = dict(small)
    for spec in L.workspaces.values():
        spec["when"] = dict(small)
    return L.launches, L.workspaces, None


def lower_glu(node: Node, index: int) -> tuple[list[dict], dict, str | None]:
    """-> (launches, workspaces, why the kernel cannot run or None) for a `linear_glu` node
    (passes/fuse_linear_glu.py): the skinny GEMM with its gated epilogue at T <= MAX_TOKENS
    (one launch set writes y; h is never written), and at larger T the extern cuBLAS call
    writing h followed by the pointwise epilogue making y from it. A node the kernel cannot
    take gets the latter at every T."""
    h = node.results[1]
    call = {"node": index, "extern": "linear", "args": [{"buf": v.ref} for v in node.operands],
            "attrs": {}, "results": [h.ref]}
    epilogue = Lowering(node, "skinny_gemm", index)
    skinny_gemm.lower_glu_epilogue(node, epilogue)
    small, ws, why = lower_guarded(node, index)
    if why is not None:
        return [call] + epilogue.launches, {}, why
    large = [call] + epilogue.launches
    for launch in large:
        launch["when"] = extern_guard()
    return small + large, ws, None


def extern_guard() -> dict:
    """The guard of a chosen linear's extern call: the buckets the kernel does not serve."""
    return {"T": [MAX_TOKENS + 1, None]}


def record(node: Node, index: int, why: str | None) -> dict:
    """One linear's entry in the plan's "small_m_gemm" list."""
    entry = {"node": index, "weight": node.operands[1].ref}
    if node.op == "linear_glu":
        entry["epilogue"] = f"{node.attrs['act']}(gate) * up"
    if why is None:
        entry["when"] = {"T": [1, MAX_TOKENS]}
    else:
        entry["extern_because"] = why
    return entry
