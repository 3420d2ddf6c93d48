"""Hand-written Triton kernel templates, one module per fused op family.

A module declares `OPS` (the IR ops it lowers), or `ops()` where the registry
says which (pointwise.py: every op with a Triton form), and `lower(node, L)`,
which describes the node's launches with a `codegen.lowering.Lowering` `L`. The
module's source is copied into each artifact's kernels/ directory, so it must
import only triton, triton.language and the standard library at module level
(codegen-only imports go inside `lower`).
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from braze.ir import Node
from braze.ir.errors import BrazeError

_BY_OP: dict[str, object] = {}


def _discover() -> dict:
    if not _BY_OP:
        here = Path(__file__).parent
        for m in sorted(pkgutil.iter_modules([str(here)]), key=lambda m: m.name):
            mod = importlib.import_module(f"{__package__}.{m.name}")
            for op in mod.ops() if hasattr(mod, "ops") else getattr(mod, "OPS", ()):
                _BY_OP[op] = mod
    return _BY_OP


def kernel_module_for(op: str):
    return _discover().get(op)


def lower_node(node: Node, index: int):
    """-> (launches, workspaces, generated sources) for one node through its kernel module."""
    from braze.codegen.lowering import Lowering
    mod = kernel_module_for(node.op)
    if mod is None:
        raise BrazeError(f"no kernel template lowers op '{node.op}'")
    L = Lowering(node, mod.__name__.rsplit(".", 1)[-1], index)
    mod.lower(node, L)
    return L.launches, L.workspaces, L.sources
