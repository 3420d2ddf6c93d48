"""Run an artifact's graph one step at a time.

Backends:
  reference  the IR interpreter (torch reference ops) on any device
  interpret  the artifact's launch plans, Triton kernels under TRITON_INTERPRET=1, on the CPU
  cuda       the same launch plans on a GPU
  auto       cuda when a GPU is present (and the artifact has plans), else reference
"""

from __future__ import annotations

import torch

from braze.ir.interpreter import Interpreter
from braze.ir.contract import group_of_step_input
from braze.ir.errors import BrazeError

from .kv_cache import KVCache
from .loader import Artifact
from .options import BACKENDS
from .trust import refusal



def resolve_backend(backend: str, has_plan: bool = True) -> str:
    if backend not in BACKENDS:
        raise BrazeError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "cuda" if torch.cuda.is_available() and has_plan else "reference"
    if backend == "cuda" and not torch.cuda.is_available():
        raise BrazeError("backend 'cuda' needs a CUDA GPU and none is visible; use --backend "
                         "interpret (the same kernels on the CPU) or reference")
    return backend


def resolve_device(device: str | None, backend: str) -> torch.device:
    """The torch device to run on: `device` checked (a name torch reads, a type braze runs
    on, a GPU that exists), or the backend's default."""
    if device is None:
        return torch.device("cuda" if backend == "cuda" else "cpu")
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise BrazeError(f"device {device!r} is not a device name; give cpu, cuda or cuda:N") \
            from None
    if d.type == "cpu":
        if backend == "cuda":
            raise BrazeError(f"backend 'cuda' runs on a cuda device, not {device!r}; use "
                             "--backend reference or interpret on the CPU")
        return torch.device("cpu")
    if d.type != "cuda":
        raise BrazeError(f"device {device!r}: braze runs on cpu or cuda devices")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise BrazeError(f"device {device!r} needs a CUDA GPU and none is visible; use "
                         "--device cpu (or leave it out)")
    if d.index is not None and d.index >= count:
        raise BrazeError(f"device {device!r}: only {count} CUDA GPU(s) are visible "
                         f"(cuda:0..cuda:{count - 1})")
    return d


class Executor:
    def __init__(self, artifact: Artifact, backend: str = "auto", device: str | None = None,
                 num_blocks: int | None = None):
        if not artifact.trust.admitted:     # opened for inspection only: nothing of it runs
            raise BrazeError(refusal(artifact.root, artifact.trust))
        self.backend = resolve_backend(backend, has_plan="plan" in artifact.manifest)
        self.artifact = artifact
        self.graph = artifact.graph
        self.device = resolve_device(device, self.backend)
        self.params = artifact.load_weights(self.device)
        self.plan = None
        self.interpreter = Interpreter(self.graph)      # the reference backend's
        if self.backend in ("cuda", "interpret"):
            from .plan_executor import PlanExecutor
            self.plan = PlanExecutor(artifact, self.params, self.device,
                                     interpret=self.backend == "interpret")
        limits = artifact.limits
        self.max_model_len = limits.max_model_len
        self.max_blocks = limits.max_blocks
        if num_blocks is None:
            # small: the engine sizes the cache (kv_cache.default_num_blocks) and resizes it
            num_blocks = min(self.max_blocks, 64)
        self.cache = KVCache(self.graph, num_blocks, self.device)
        # a hybrid-cache artifact's per-group slot mappings and block tables (ir/contract.py)
        self.group_inputs = [v.name for v in self.graph.inputs if group_of_step_input(v.name)]
        # LoRA adapter pools (runtime/lora.py), graph inputs that never move; {} without LoRA
        from .lora import allocate_pools
        self.lora_pools = allocate_pools(self.graph, self.device)
        if self.cache.block_size != limits.block_size:
            raise BrazeError(f"artifact {artifact.root}: its KV-cache inputs hold "
                             f"{self.cache.block_size}-token blocks, its manifest says "
                             f"{limits.block_size}; recompile it")
        # after prune-logits the graph computes logits only for the sampled rows ([R, vocab];
        # [S, vocab] in artifacts compiled before the contract had R)
        self.logits_pruned = str(self.graph.outputs["logits"].type.shape[0]) in ("R", "S")

    def kernel_stats(self, others=()) -> dict:
        """How this executor's kernels run: `kernels_cubin`, `kernels_cubin_less_specialised`
        and `kernels_jit` count the kernel specialisations launched so far by where their
        code came from (cuda backend; all 0 elsewhere), and `cubins_unusable` says why the
        artifact's cubins cannot run here (None when they can, or off cuda). `others`: more
        launch plans of the same artifact whose kernels count too (the MTP graph's)."""
        cubins = self.plan.runner.cubins if self.plan is not None else None
        counts: dict[str, int] = {}
        for plan in (self.plan, *others):
            c = plan.runner.cubins if plan is not None else None
            for how, n in (c.counts() if c is not None else {}).items():
                counts[how] = counts.get(how, 0) + n
        return {"kernels_cubin": counts.get("cubin", 0),
                "kernels_cubin_less_specialised": counts.get("cubin_less_specialised", 0),
                "kernels_jit": counts.get("jit", 0),
                "cubins_unusable": cubins.reason if cubins is not None else None}

    @property
    def block_size(self) -> int:
        return self.cache.block_size

    def run(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run one step; returns the graph's logits: every token's, or each sequence's
        sampled row if the graph was compiled with prune-logits."""
        feeds = dict(inputs)
        for name in self.group_inputs:     # one table given: every KV cache group uses it
            feeds.setdefault(name, feeds[name.split(".")[0]])
        feeds.update(self.cache.tensors)
        feeds.update(self.lora_pools)
        if self.plan is not None:
            return self.plan.run(feeds)["logits"]
        return self.interpreter.run(feeds, self.params)["logits"]
