"""Run an artifact's launch plans: Triton kernels (interpreted on CPU, or on a GPU) + extern torch.

Every kernel output lives at its planned offset in one static arena (plan-memory),
so the buffers a CUDA graph would capture never move. `run` executes the plans
eagerly (extern GEMMs and views produce their own tensors); `bind` resolves them
once for one batch size into a `BoundPlan` whose every launch reads and writes
only static storage -- the arena, the caller's input buffers, the KV cache, the
weights, the workspaces and one static buffer per graph output -- which is what
runtime/graph_runner.py captures into CUDA graphs (or replays on the CPU).
"""

from __future__ import annotations

import logging

import torch
from braze.ir.errors import BrazeError
from braze.ir.layout import PROBES, VIEW_OPS
from braze.ir.types import eval_dim, torch_dtype

from braze.kernel_modules import KernelModules
from braze.launch import compile_expr, compile_guard

from .launcher import BoundLaunch, PlanRunner
from .loader import Artifact

log = logging.getLogger("braze.runtime")


class PlanExecutor:
    def __init__(self, artifact: Artifact, params: dict[str, torch.Tensor], device,
                 interpret: bool, second: dict | None = None, graph=None):
        """`second` and `graph`: a second graph's manifest entry (the MTP graph's, whose
        "plan" and "kernels" sit beside its "graph") and that graph, to run instead of the
        main one; its kernels are in the same kernels/ directory."""
        plan = (second or artifact.manifest).get("plan")
        if not plan:
            raise BrazeError(f"artifact {artifact.root} has no launch plans (compiled by an older "
                             f"braze?); recompile it, or use --backend reference")
        self.graph = artifact.graph if graph is None else graph
        self.device = torch.device(device)
        self.launches = [launch for seg in plan["segments"] for launch in seg["launches"]]
        # each launch's guard (braze/launch.py `when`: --small-m-gemm's per-bucket choice),
        # tested once per bucket by `bind`, per step only by the eager `run`
        self.guards = [compile_guard(launch.get("when")) for launch in self.launches]
        # only kernel text whose hash the artifact's trust admits is executed
        self.modules = KernelModules(artifact.root / "kernels", interpret=interpret,
                                     hashes=artifact.trust.kernel_hashes)
        cubins = None
        if not interpret and self.device.type == "cuda":
            if artifact.trust.cubins:
                from .cubins import CubinCache
                manifest = artifact.manifest
                if second is not None:
                    manifest = dict(manifest, kernels=second.get("kernels", {}))
                cubins = CubinCache(artifact.root, manifest, self.modules)
            else:
                log.info("artifact %s is %s, not signed: its cubins are not used; kernels "
                         "compile from their verified source at first use", artifact.root,
                         artifact.trust.how)
        self.runner = PlanRunner(self.modules, plan["workspaces"], self.device, cubins)
        self.params = {f"@{k}": v for k, v in params.items()}
        memory = self.graph.meta.get("memory") or {}
        self.slots = {f"%{k}": tuple(v) for k, v in (memory.get("buffers") or {}).items()}
        self.arena = torch.empty(int(memory.get("arena_bytes", 0)), dtype=torch.uint8,
                                 device=self.device)
        # the largest batch the static storage is planned for
        self.max_sizes = artifact.limits.bindings()
        self._static_out: dict[str, torch.Tensor] = {}   # unplanned results, for bound plans
        self._shape_fns: dict[tuple, object] = {}
        kernel_nodes = {launch["node"] for launch in self.launches if "kernel" in launch}
        # the results each kernel-lowered node writes into, allocated before its first launch
        self.allocs: dict[int, list] = {i: self.graph.nodes[i].results for i in kernel_nodes}

    def shape_of(self, value, sizes) -> tuple[int, ...]:
        """`value`'s shape at these step sizes, without sympy on the per-bucket path."""
        fn = self._shape_fns.get(value.type.shape)
        if fn is None:
            fn = self._shape_fns[value.type.shape] = _shape_fn(value.type.shape)
        return fn(sizes)

    def _buffer(self, value, sizes) -> torch.Tensor:
        shape = self.shape_of(value, sizes)
        dtype = torch_dtype(value.type.dtype)
        slot = self.slots.get(value.ref)
        if slot is None:
            return torch.empty(shape, dtype=dtype, device=self.device)
        offset, cap = slot
        n = dtype.itemsize
        for d in shape:
            n *= d
        if n > cap:
            raise BrazeError(f"{value.ref} needs {n} bytes at this batch size, its arena slot "
                             f"holds {cap}: the batch exceeds --max-num-tokens")
        return self.arena[offset:offset + n].view(dtype).view(shape)

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sizes = {"T": feeds["input_ids"].shape[0], "S": feeds["seq_lens"].shape[0],
                 "R": feeds["logits_indices"].shape[0],
                 "MB": feeds["block_tables"].shape[1]}
        env = dict(self.params)
        for k, v in feeds.items():
            env[f"%{k}"] = v
        allocated = set()
        for launch, holds in zip(self.launches, self.guards):
            if not holds(sizes):
                continue
            i = launch["node"]
            if i in self.allocs and i not in allocated:
                for r in self.allocs[i]:
                    env[r.ref] = self._buffer(r, sizes)
                allocated.add(i)
            self.runner.run(launch, env, sizes)
        return {k: env[v.ref] for k, v in self.graph.outputs.items()}

    # -- bound plans (static buffers; CUDA graphs capture these) --------------------------

    def _static_buffer(self, value, sizes) -> torch.Tensor:
        """`value`'s arena slot, or for a value plan-memory left out (graph outputs, and
        every result of an unplanned graph), a static buffer sized for the largest batch;
        a smaller batch uses its first bytes, like an arena slot."""
        if value.ref in self.slots:
            return self._buffer(value, sizes)
        dtype = torch_dtype(value.type.dtype)
        shape = self.shape_of(value, sizes)
        n = 1
        for d in shape:
            n *= d
        flat = self._static_out.get(value.ref)
        if flat is None or flat.numel() < n:
            largest = dict(sizes)
            for k, v in self.max_sizes.items():
                largest[k] = max(v, sizes.get(k, 0))
            big = 1
            for d in self.shape_of(value, largest):
                big *= d
            flat = torch.empty(max(n, big), dtype=dtype, device=self.device)
            self._static_out[value.ref] = flat
        return flat[:n].view(shape)

    def bind(self, feeds: dict[str, torch.Tensor], sizes: dict) -> BoundPlan:
        """Every launch resolved for `sizes` against `feeds` (the step inputs, views of the
        caller's static buffers, and the caches): a BoundPlan to replay."""
        sizes = dict(sizes)
        env = dict(self.params)
        for k, v in feeds.items():
            env[f"%{k}"] = v
        for v in self.graph.inputs:
            if v.ref not in env:
                raise BrazeError(f"graph input {v.ref} ({v.type}) has no static buffer to bind")
        values = {}
        for node in self.graph.nodes:
            for r in node.results:
                values[r.ref] = (node, r)

        def out_for(ref):
            node, r = values[ref]
            if node.op in VIEW_OPS and ref not in self.slots:
                return None
            return self._static_buffer(r, sizes)

        calls: list[BoundLaunch] = []
        bound_nodes = set()
        for launch, holds in zip(self.launches, self.guards):
            if not holds(sizes):          # another bucket's launch: not in this plan
                continue
            i = launch["node"]
            if i in self.allocs and i not in bound_nodes:
                for r in self.allocs[i]:
                    env[r.ref] = self._static_buffer(r, sizes)
                bound_nodes.add(i)
            try:
                b = self.runner.bind(launch, env, sizes, out_for)
            except BrazeError:
                raise
            except Exception as e:   # a torch error binding a view or a kernel: name the node
                raise BrazeError(f"binding node {i} ({self.graph.nodes[i].op}) at "
                                 f"T={sizes['T']} S={sizes['S']} failed: {type(e).__name__}: {e}") from e
            if b is not None:
                calls.append(b)
        outputs = {k: env[v.ref] for k, v in self.graph.outputs.items()}
        return BoundPlan(sizes, calls, outputs)


def _dim_fn(d):
    if isinstance(d, int):
        return lambda sizes: d
    try:
        f = compile_expr(str(d))
        if all(f(p) == eval_dim(d, p) for p in PROBES):   # sympy's value at both
            return f
    except BrazeError:
        pass
    return lambda sizes: eval_dim(d, sizes)         # an expression the fast path cannot read


def _shape_fn(shape):
    fns = [_dim_fn(d) for d in shape]
    return lambda sizes: tuple(f(sizes) for f in fns)


class BoundPlan:
    """One batch size's launches, resolved: `calls` in order (each a BoundLaunch with
    its node index), and the graph outputs (static tensors the calls write)."""

    def __init__(self, sizes: dict, calls: list, outputs: dict[str, torch.Tensor]):
        self.sizes, self.calls, self.outputs = sizes, calls, outputs

    def __call__(self) -> dict[str, torch.Tensor]:
        for c in self.calls:
            c()
        return self.outputs

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) of every tensor a call reads or writes, and the outputs."""
        out = [t for c in self.calls for t in c.tensors]
        out += [(f"output {k}", v) for k, v in self.outputs.items()]
        return out
