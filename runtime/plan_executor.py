"""Run an artifact's launch plans: Triton kernels (interpreted on CPU, or on a GPU) + extern torch.

Every kernel output lives at its planned offset in one static arena (plan-memory),
so the buffers a CUDA graph would capture never move; extern GEMMs and views
produce their own tensors. Segments run in order (CUDA graph capture and replay
come with the runtime work).
"""

from __future__ import annotations

import logging

import torch

from braze.ir.errors import BrazeError
from braze.ir.types import torch_dtype

from .launcher import KernelModules, PlanRunner
from .loader import Artifact

log = logging.getLogger("braze.runtime")


class PlanExecutor:
    def __init__(self, artifact: Artifact, params: dict[str, torch.Tensor], device,
                 interpret: bool):
        plan = artifact.manifest.get("plan")
        if not plan:
            raise BrazeError(f"artifact {artifact.root} has no launch plans (compiled by an older "
                             f"braze?); recompile it, or use --backend reference")
        self.graph = artifact.graph
        self.device = torch.device(device)
        self.launches = [launch for seg in plan["segments"] for launch in seg["launches"]]
        self.modules = KernelModules(artifact.root / "kernels", interpret=interpret)
        cubins = None
        if not interpret and self.device.type == "cuda":
            from .cubins import CubinCache
            cubins = CubinCache(artifact.root, artifact.manifest, self.modules)
        self.runner = PlanRunner(self.modules, plan["workspaces"], self.device, cubins)
        self.params = {f"@{k}": v for k, v in params.items()}
        memory = self.graph.meta.get("memory") or {}
        self.slots = {f"%{k}": tuple(v) for k, v in (memory.get("buffers") or {}).items()}
        self.arena = torch.empty(int(memory.get("arena_bytes", 0)), dtype=torch.uint8,
                                 device=self.device)
        kernel_nodes = {launch["node"] for launch in self.launches if "kernel" in launch}
        # the results each kernel-lowered node writes into, allocated before its first launch
        self.allocs: dict[int, list] = {i: self.graph.nodes[i].results for i in kernel_nodes}

    def _buffer(self, value, sizes) -> torch.Tensor:
        shape = value.type.concrete_shape(sizes)
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
                 "MB": feeds["block_tables"].shape[1]}
        env = dict(self.params)
        for k, v in feeds.items():
            env[f"%{k}"] = v
        allocated = set()
        for launch in self.launches:
            i = launch["node"]
            if i in self.allocs and i not in allocated:
                for r in self.allocs[i]:
                    env[r.ref] = self._buffer(r, sizes)
                allocated.add(i)
            self.runner.run(launch, env, sizes)
        return {k: env[v.ref] for k, v in self.graph.outputs.items()}
