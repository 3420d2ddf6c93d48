"""The reference interpreter: runs any graph, fused or not, with torch.

It is the oracle for every pass and kernel. Values are freed after their last
use so large graphs run in bounded memory; ops that write (the KV cache) write
into the tensors the caller passed in.
"""

from __future__ import annotations

import torch

from .errors import BrazeError
from .graph import Graph
from .types import torch_dtype


def last_uses(g: Graph) -> dict[int, list]:
    """Map node index -> values whose last read is that node (outputs never die)."""
    last: dict = {}
    for i, node in enumerate(g.nodes):
        for v in node.operands:
            last[v] = i
    keep = set(g.outputs.values())
    out: dict[int, list] = {}
    for v, i in last.items():
        if v.kind == "result" and v not in keep:
            out.setdefault(i, []).append(v)
    return out


def run_graph(g: Graph, inputs: dict[str, torch.Tensor], params: dict[str, torch.Tensor],
              check_types: bool = False) -> dict[str, torch.Tensor]:
    return Interpreter(g).run(inputs, params, check_types)


class Interpreter:
    """run_graph for a graph that no longer changes (a loaded artifact's): what each node
    reads, calls and frees is worked out once, so a step pays only for the ops."""

    def __init__(self, g: Graph):
        self.g = g
        frees = last_uses(g)
        self.steps = [(i, node, node.opdef.impl, node.operands, node.attrs, node.results,
                       frees.get(i, ())) for i, node in enumerate(g.nodes)]

    def run(self, inputs: dict[str, torch.Tensor], params: dict[str, torch.Tensor],
            check_types: bool = False) -> dict[str, torch.Tensor]:
        g = self.g
        env: dict = {}
        for v in g.inputs:
            if v.name not in inputs:
                raise BrazeError(f"graph input %{v.name} ({v.type}) was not given")
            env[v] = inputs[v.name]
        for name, v in g.params.items():
            if name not in params:
                raise BrazeError(f"parameter @{name} ({v.type}) was not given")
            env[v] = params[name]
        if check_types:
            for v in env:
                _check(v, env[v])
        for i, node, impl, operands, attrs, results, frees in self.steps:
            try:
                out = impl(*[env[v] for v in operands], **attrs)
            except BrazeError:
                raise
            except Exception as e:  # a torch error inside a reference op: name the node
                raise BrazeError(f"node {i} `{node}` failed: {type(e).__name__}: {e}") from e
            if isinstance(out, torch.Tensor):
                out = (out,)
            if len(out) != len(results):
                raise BrazeError(f"node {i} ({node.op}) returned {len(out)} values, "
                                 f"expected {len(results)}")
            for r, t in zip(results, out):
                env[r] = t
                if check_types:
                    _check(r, t)
            for v in frees:
                del env[v]
        return {k: env[v] for k, v in g.outputs.items()}


def _check(v, t: torch.Tensor) -> None:
    if t.dtype != torch_dtype(v.type.dtype):
        raise BrazeError(f"{v.ref} is {t.dtype} at run time but typed {v.type}")
    if t.dim() != v.type.rank:
        raise BrazeError(f"{v.ref} has shape {tuple(t.shape)} at run time but typed {v.type}")
    for d, n in zip(v.type.shape, t.shape):
        if isinstance(d, int) and d != n:
            raise BrazeError(f"{v.ref} has shape {tuple(t.shape)} at run time but typed {v.type}")
