"""Compile options: one dataclass, validated once, recorded in the manifest."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from braze.ir.contract import StepLimits
from braze.ir.errors import BrazeError
from braze.ir.segments import CUDAGRAPH_MODES

# how `linear` runs at decode buckets (T <= 16): "extern" cuBLAS (default) or "triton"
# (codegen/small_m_gemm.py); spelt here so that validating options needs no codegen import
SMALL_M_GEMM = ("extern", "triton")

# the compute capabilities NVIDIA GPUs have (Maxwell to Blackwell): --targets names these. A
# name outside them (sm_99 for sm_90) is not a GPU, and Triton's LLVM answers it with a
# crash dump per kernel; a new architecture is added here once Triton compiles for it
GPU_TARGETS = tuple(f"sm_{c}" for c in (50, 52, 53, 60, 61, 62, 70, 72, 75, 80, 86, 87, 88,
                                        89, 90, 100, 101, 103, 110, 120, 121))


@dataclass
class CompileOptions:
    opt_level: int = 2
    dtype: str | None = None              # None (or "auto", vLLM's word): the checkpoint's
    max_num_tokens: int = StepLimits.max_num_tokens
    max_num_seqs: int = StepLimits.max_num_seqs
    max_model_len: int | None = None      # None: the model's max_position_embeddings
    block_size: int = StepLimits.block_size
    targets: str = "sm_80,sm_90"
    cudagraph_mode: str = "full"          # one graph per step (runtime/graph_runner.py)
    lora_slots: int = 0                   # 0: no LoRA (passes/add_lora.py)
    max_lora_rank: int = 16
    lora_targets: str = "q,k,v,o,gate,up,down"
    max_logits_rows: int | None = None    # None: max_num_seqs (ir/contract.py StepLimits)
    tensor_parallel_size: int = 1         # ranks the graph is sharded for (passes/shard.py)
    expert_parallel: bool = False         # MoE: whole experts per rank instead of split ones
    small_m_gemm: str = "extern"          # "triton": skinny-GEMM kernel at T <= 16 (codegen/small_m_gemm.py)

    def __post_init__(self):
        if self.dtype == "auto":
            self.dtype = None
        # the Python API may name the lists as lists, as vLLM's arguments are; the manifest
        # records them as the flags spell them
        for name in ("targets", "lora_targets"):
            v = getattr(self, name)
            if isinstance(v, (list, tuple)) and all(isinstance(t, str) for t in v):
                setattr(self, name, ",".join(v))
            elif not isinstance(v, str):
                raise BrazeError(f"--{name.replace('_', '-')} takes a comma-separated string "
                                 f"or a list of names (e.g. 'sm_80,sm_90' or ['q', 'v']), "
                                 f"got {v!r}")

    def validate(self) -> None:
        for name in ("opt_level", "max_num_tokens", "max_num_seqs", "max_model_len",
                     "block_size", "lora_slots", "max_lora_rank", "max_logits_rows",
                     "tensor_parallel_size"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool)
                    or v is None and name in ("max_model_len", "max_logits_rows")):
                raise BrazeError(f"--{name.replace('_', '-')} must be an integer, got {v!r}")
        if self.opt_level not in (0, 1, 2):
            raise BrazeError(f"--opt-level must be 0, 1 or 2, got {self.opt_level}")
        for name in ("max_num_tokens", "max_num_seqs", "block_size", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise BrazeError(f"--{name.replace('_', '-')} must be positive, "
                                 f"got {getattr(self, name)}")
        if self.expert_parallel and self.tensor_parallel_size == 1:
            raise BrazeError("--expert-parallel needs --tensor-parallel-size > 1: the experts "
                             "are placed on the ranks of the tensor-parallel group")
        rows = self.max_logits_rows
        if rows is not None and self.opt_level < 2:
            raise BrazeError(f"--max-logits-rows sizes the LM head that -O2's prune-logits "
                             f"computes only at the sampled rows; at -O{self.opt_level} every "
                             f"token has its logits row, so it would do nothing: drop it, or "
                             f"compile at -O2")
        if rows is not None and not min(self.max_num_seqs, self.max_num_tokens) <= rows:
            raise BrazeError(f"--max-logits-rows {rows} is below --max-num-seqs "
                             f"{self.max_num_seqs}: every sequence of a step needs its row")
        if self.block_size & (self.block_size - 1):
            raise BrazeError(f"--block-size must be a power of two, got {self.block_size}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise BrazeError(f"--max-model-len must be at least 2, got {self.max_model_len}")
        if self.cudagraph_mode not in CUDAGRAPH_MODES:
            raise BrazeError(f"--cudagraph-mode must be one of {', '.join(CUDAGRAPH_MODES)}, "
                             f"got {self.cudagraph_mode!r}")
        if self.small_m_gemm not in SMALL_M_GEMM:
            raise BrazeError(f"--small-m-gemm must be one of {', '.join(SMALL_M_GEMM)}, "
                             f"got {self.small_m_gemm!r}")
        if self.lora_slots < 0 or self.max_lora_rank < 1:
            raise BrazeError(f"--lora-slots must be >= 0 and --max-lora-rank positive, got "
                             f"{self.lora_slots} and {self.max_lora_rank}")
        if self.lora_slots:
            from braze.passes.add_lora import target_modules
            target_modules(self.lora_targets)
        else:       # what only a LoRA-capable artifact reads, given for one that is not
            for name in ("max_lora_rank", "lora_targets"):
                if getattr(self, name) != getattr(CompileOptions, name):
                    flag = f"--{name.replace('_', '-')}"
                    raise BrazeError(f"{flag} {getattr(self, name)} is for LoRA adapters, and "
                                     f"without --lora-slots K the artifact serves none: add "
                                     f"--lora-slots K, or drop {flag}")
        for t in self.target_list():
            if not (t.startswith("sm_") and t[3:].isdigit()):
                raise BrazeError(f"--targets entry {t!r} is not like sm_80 or sm_90")
            if t not in GPU_TARGETS:
                raise BrazeError(f"--targets entry {t!r} is no NVIDIA GPU's architecture; "
                                 f"give some of {', '.join(GPU_TARGETS)} (sm_80: A100, sm_90: "
                                 f"H100/H200), or '' to compile the kernels on the GPU at "
                                 f"first use")

    def limits(self) -> StepLimits:
        """The step limits these options give (max_model_len resolved by now)."""
        return StepLimits.from_options(self.to_json())

    def target_list(self) -> list[str]:
        return list(dict.fromkeys(t.strip() for t in self.targets.split(",") if t.strip()))

    def to_json(self) -> dict:
        return asdict(self)
