"""Helpers for kernel tests: run chosen IR nodes through their Triton kernels (interpreted)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from braze.ir import Graph, run_graph
from braze.ir.types import torch_dtype

KERNEL_DIR = Path(__file__).resolve().parents[1] / "codegen" / "kernels"


def lower_node(g: Graph, index: int):
    """The launches and workspaces codegen produces for node `index`."""
    from braze.codegen.kernels import lower_node as _lower
    return _lower(g.nodes[index], index)


def run_with_kernels(g: Graph, feeds: dict, params: dict, ops: set[str], bindings: dict,
                     interpret: bool = True) -> dict:
    """Run `g` node by node: nodes whose op is in `ops` through their kernels (Triton
    interpreter on CPU), the rest through the reference implementations. Caches in
    `feeds` are written in place. Returns the graph outputs."""
    from braze.kernel_modules import KernelModules
    from braze.runtime.launcher import PlanRunner
    env = {}
    for v in g.inputs:
        env[v.ref] = feeds[v.name]
    for name, v in g.params.items():
        env[v.ref] = params[name]
    modules = KernelModules(KERNEL_DIR, interpret=interpret)
    sizes = dict(bindings)
    for i, node in enumerate(g.nodes):
        if node.op in ops:
            launches, workspaces, sources = lower_node(g, i)
            modules.sources.update(sources)
            runner = PlanRunner(modules, workspaces, device=next(iter(env.values())).device)
            for r in node.results:
                env[r.ref] = torch.empty(r.type.concrete_shape(sizes),
                                         dtype=torch_dtype(r.type.dtype),
                                         device=next(iter(env.values())).device)
            # the tests feed log(0), x/0, sqrt(-1) on purpose: the kernels must give inf and
            # nan as torch does, and numpy inside the interpreter need not warn about it
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                for launch in launches:
                    runner.run(launch, env, sizes)
        else:
            out = node.opdef.impl(*[env[v.ref] for v in node.operands], **node.attrs)
            if isinstance(out, torch.Tensor):
                out = (out,)
            for r, t in zip(node.results, out):
                env[r.ref] = t
    return {k: env[v.ref] for k, v in g.outputs.items()}


def check_kernels(g: Graph, feeds: dict, params: dict, ops: set[str], bindings: dict,
                  atol: float, rtol: float) -> None:
    """Outputs (and written caches) through the kernels equal the reference interpreter's."""
    clone = lambda d: {k: v.clone() for k, v in d.items()}
    ref_feeds, ker_feeds = clone(feeds), clone(feeds)
    want = run_graph(g, ref_feeds, params)
    got = run_with_kernels(g, ker_feeds, params, ops, bindings)
    assert any(n.op in ops for n in g.nodes), f"graph has no {ops} node"
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=atol, rtol=rtol)
    for k in feeds:
        torch.testing.assert_close(ker_feeds[k], ref_feeds[k], atol=atol, rtol=rtol)


def aot_compile_node(g: Graph, index: int, targets=("sm_80", "sm_90")) -> list:
    """Compile every launch of node `index` to cubin for each target (no GPU needed)."""
    from braze.codegen.aot import compile_launch
    launches, _, sources = lower_node(g, index)
    return [compile_launch(KERNEL_DIR, launch, t, sources) for launch in launches for t in targets]
