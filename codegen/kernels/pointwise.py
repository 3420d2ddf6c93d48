"""Pointwise ops and `fused_pointwise` groups: kernels generated per body, not a template.

Every `fused_pointwise` node, and every pointwise op left standing after fusion,
becomes one generated kernel (codegen/pointwise_kernel.py writes it; the op's
arithmetic is its registry entry's `triton` form, codegen/pointwise_ops.py rounds
it as torch does). This module is only the template folder's entry for them: the
ops it lowers and the `lower` that hands the node to the generator.
"""

from __future__ import annotations


def ops() -> list[str]:
    """`fused_pointwise` and every op whose registry entry has a Triton form."""
    from braze.ir import all_ops
    return ["fused_pointwise"] + [name for name, opdef in all_ops().items() if opdef.triton]


def lower(node, L):
    from braze.codegen.pointwise_kernel import lower
    lower(node, L)
