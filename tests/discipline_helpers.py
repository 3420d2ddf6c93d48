"""The graph discipline, checked without a GPU: a replay of bound launch plans allocates
nothing, touches only static storage and reads no device value on the host
(runtime/graph_runner.py). Shared by the main runner's tests and the MTP graph's."""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def static_storages(runner) -> set[int]:
    """Every storage a replay of `runner` (a GraphRunner) may touch: its static input
    buffers, the KV cache, the weights, the arena, workspaces and output buffers of the
    plan it binds -- nothing else."""
    ex = runner.executor
    plan = ex.plan
    ts = list(runner.static.values()) + list(ex.cache.tensors.values())
    ts += list(plan.params.values()) + [plan.arena]
    ts += list(plan.runner._ws_flat.values()) + list(plan._static_out.values())
    return {t.untyped_storage().data_ptr() for t in ts}


def stale_workspaces(runner) -> list:
    """The flat workspaces of a PlanRunner whose bytes a GPU leaves as the last launch wrote
    them: all but the `zero` ones (braze/launch.py), which their own launches keep zeroed."""
    return [t for name, t in runner._ws_flat.items() if not runner.ws_specs[name].get("zero")]


def zeroed_workspaces(runner) -> dict:
    return {name: t for name, t in runner._ws_flat.items() if runner.ws_specs[name].get("zero")}


class Discipline(TorchDispatchMode):
    """Flags any torch op that allocates bytes, touches storage outside `allowed`, or reads a
    device value on the host. (The Triton interpreter's own bookkeeping makes 0-byte
    tensors and re-points them at the kernel arguments' storage with set_: allowed.)"""

    HOST_READS = ("aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.equal",
                  "aten.masked_select", "aten.unique")

    def __init__(self, allowed):
        super().__init__()
        self.allowed = allowed
        self.bad = collections.Counter()
        self.ops = collections.Counter()

    def _check(self, func, t, what):
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            if st.nbytes() > 0 and st.data_ptr() not in self.allowed:
                self.bad[f"{func} {what} {tuple(t.shape)}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        self.ops[name] += 1
        if name.startswith(self.HOST_READS):
            self.bad[f"{name} (host read)"] += 1
        for a in list(args) + list(kwargs.values()):
            for t in (a if isinstance(a, (list, tuple)) else [a]):
                self._check(name, t, "reads")
        out = func(*args, **kwargs)
        for t in (out if isinstance(out, (list, tuple)) else [out]):
            self._check(name, t, "makes")
        return out


class HostReads(TorchDispatchMode):
    """Flags the torch ops that make the host wait for the device: a value read back, or an
    output whose shape depends on device data (a boolean mask index hides a nonzero, which
    this mode does not see by itself). Inside a CUDA-graph capture each of them fails the
    capture (cudaErrorStreamCaptureUnsupported); on the CPU they pass silently, so this is
    what shows them without a GPU."""

    HOST_READS = Discipline.HOST_READS + ("aten.bincount", "aten.item", "aten.argwhere",
                                          "aten._unique", "aten.unique_consecutive")

    def __init__(self):
        super().__init__()
        self.bad = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if name.startswith(self.HOST_READS):
            self.bad[name] += 1
        elif name.startswith(("aten.index.Tensor", "aten.index_put")) and len(args) > 1:
            idx = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                   for i in idx):
                self.bad[f"{name} with a boolean mask (a hidden nonzero)"] += 1
        elif name == "aten.repeat_interleave.Tensor" and kwargs.get("output_size") is None:
            self.bad[f"{name} without output_size"] += 1
        return func(*args, **kwargs)
