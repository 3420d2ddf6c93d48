"""How an engine runs an artifact: one options object, checked once, passed from the command
line or `braze.LLM` through the server and the engine to the model runner.

What the artifact fixed when it was compiled (its step limits, ir/contract.py) bounds some
of these: `max_num_seqs` and `max_num_tokens` may be lowered, never raised, and default to
the artifact's. That check needs the artifact, so the model runner makes it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from braze.ir.errors import BrazeError
from braze.ir.segments import CUDAGRAPH_MODES

BACKENDS = ("auto", "cuda", "reference", "interpret")
SAMPLERS = ("torch", "triton")       # EngineOptions.sampler
POLICIES = ("fcfs", "priority")      # EngineOptions.scheduling_policy (vLLM's)
# vLLM's names for engine options braze names otherwise (braze.LLM takes either)
VLLM_NAMES = {"num_gpu_blocks_override": "num_kv_blocks", "speculative_config": "speculative",
              "max_num_batched_tokens": "max_num_tokens"}

# vLLM's engine options for behaviour braze has one way only: taken at that value, refused
# (saying why) at any other; name -> (the value braze does, what braze does)
VLLM_FIXED = {
    "enable_chunked_prefill": (True, "braze always prefills a prompt longer than "
                                     "max_num_tokens in chunks"),
}


def take_vllm_fixed(values: dict) -> None:
    """Remove VLLM_FIXED's options from `values` (None: not given), refusing any at a value
    braze does not do."""
    for name, (value, what) in VLLM_FIXED.items():
        v = values.pop(name, None)
        if v is not None and not (v == value and type(v) is type(value)):
            raise BrazeError(f"{name}={v!r}: {what}; leave {name} out or give {value!r}",
                             param=name)


@dataclass
class EngineOptions:
    backend: str = "auto"                 # auto: cuda on a GPU, else reference
    device: str | None = None             # default: cuda for the cuda backend, else cpu
    num_kv_blocks: int | None = None      # None: what the device's free memory holds
    # the share of the GPU's memory the engine may fill, the KV cache sized to what is left
    # of it after the weights (runtime/kv_cache.default_num_blocks); vLLM's name
    gpu_memory_utilization: float = 0.9
    # tokens per KV block: fixed when the artifact was compiled, so only checked against it
    # (vLLM's serve flag; None: the artifact's)
    block_size: int | None = None
    # the longest sequence (prompt + output) this engine serves: at most the artifact's
    # (its buffers are planned for that); less caps requests and sizes the GPU's KV cache
    # for shorter sequences (vLLM's --max-model-len; None: the artifact's)
    max_model_len: int | None = None
    max_num_seqs: int | None = None       # None: the artifact's
    max_num_tokens: int | None = None     # None: the artifact's
    buckets: list[int] | None = None      # padded step sizes; None: ir/contract.default_buckets
    cudagraph_mode: str | None = None     # None: the artifact's
    enable_prefix_caching: bool = True
    async_scheduling: bool | None = None  # None: on for cuda (the device runs ahead)
    # a step's inputs written by one Triton launch (runtime/prepare_kernel.py) instead of
    # ~20 torch ops on the device; None: on for cuda
    fused_prepare: bool | None = None
    freeze_gc: bool = False               # gc.freeze after start-up (servers)
    debug: bool = False                   # check bound buffers on every replay
    trusted_keys: str | None = None       # a directory of public keys to trust
    trust_artifact: bool = False          # run an artifact nothing else admits (loudly)
    # KV blocks below the device (runtime/kv_offload.py): a host-memory tier of this many
    # GiB, and below it a directory or an s3://bucket/prefix
    kv_offload_cpu_gb: float | None = None
    kv_offload_dir: str | None = None
    # the most GiB of block files the directory tier keeps (least recently used deleted
    # first); None: kv_offload.DEFAULT_DIR_GB
    kv_offload_dir_gb: float | None = None
    kv_offload_s3: str | None = None
    # LoRA (runtime/lora.py): adapters kept parsed in host memory (None: the artifact's slots)
    max_cpu_loras: int | None = None
    # speculative decoding (runtime/speculative.py): {"method": "ngram" | "draft" | "mtp",
    # "num_speculative_tokens": k, ...}, its JSON text, or a SpeculativeConfig
    speculative: object = None
    # tensor-parallel artifacts: how long a collective waits for the other ranks before
    # the run ends with an error (a rank that died or hangs)
    collective_timeout_s: float = 300.0
    # how a step samples at temperature > 0: "torch" ops (runtime/sampler.py
    # sample_batch), or one fused "triton" launch (KernelSampler), top-k/top-p/min-p included
    sampler: str = "torch"
    # the model's sampling defaults for what a request leaves unset (runtime/
    # sampling_defaults.py; vLLM's names): "auto" (the artifact's generation_config.json),
    # "vllm" (none), or a directory holding a generation_config.json; and keys over it
    generation_config: str = "auto"
    override_generation_config: dict | None = None
    # how a reply's reasoning is marked (runtime/reasoning.py; vLLM's names: qwen3,
    # deepseek_r1, ...): chat replies split into reasoning and content, and a structured
    # output's grammar held back till the reasoning ends; None: replies are all answer
    reasoning_parser: str | None = None
    # vLLM's: "fcfs" (first come, first served) or "priority" (waiting requests admitted by
    # their priority, lower first, then arrival; a preemption takes the running request of
    # the lowest priority, latest arrival): runtime/scheduler.py
    scheduling_policy: str = "fcfs"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise BrazeError(f"unknown backend {self.backend!r}; choose one of "
                             f"{', '.join(BACKENDS)}")
        for name in ("num_kv_blocks", "block_size", "max_model_len", "max_num_seqs",
                     "max_num_tokens", "max_cpu_loras"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise BrazeError(f"{name} must be a positive integer, got {v!r}")
        v = self.kv_offload_cpu_gb
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
            raise BrazeError(f"kv_offload_cpu_gb must be a positive number of GiB, got {v!r}")
        v = self.kv_offload_dir_gb
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1e9:
                raise BrazeError(f"kv_offload_dir_gb must be a positive number of GiB, got "
                                 f"{v!r}", param="kv_offload_dir_gb")
            if not self.kv_offload_dir:
                raise BrazeError("kv_offload_dir_gb caps the disk tier, and no kv_offload_dir "
                                 "names one: give --kv-offload-dir PATH too (or drop "
                                 "--kv-offload-dir-gb)", param="kv_offload_dir_gb")
        v = self.gpu_memory_utilization
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
            raise BrazeError(f"gpu_memory_utilization must be a fraction of the GPU's memory "
                             f"in (0, 1], got {v!r}")
        v = self.collective_timeout_s
        # finite: torch.distributed takes it as a timedelta (inf or 1e20 overflowed there)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1e9:
            raise BrazeError(f"collective_timeout_s must be a positive number of seconds, at "
                             f"most 1e9 (there is no 'no timeout': a rank that died would "
                             f"hang the run), got {v!r}")
        if self.kv_offload_dir and self.kv_offload_s3:
            raise BrazeError("choose one lower KV tier: kv_offload_dir or kv_offload_s3, "
                             "not both")
        if self.speculative is not None:
            from .speculative import SpeculativeConfig
            self.speculative = SpeculativeConfig.of(self.speculative)
        if self.sampler not in SAMPLERS:
            raise BrazeError(f"sampler must be one of {', '.join(SAMPLERS)}, got "
                             f"{self.sampler!r}")
        if not isinstance(self.generation_config, str) or not self.generation_config:
            raise BrazeError(f"generation_config must be 'auto', 'vllm' or a directory, got "
                             f"{self.generation_config!r}", param="generation_config")
        if isinstance(self.override_generation_config, str):      # JSON text, as on the CLI
            self.override_generation_config = _json_object(self.override_generation_config,
                                                           "override_generation_config")
        from .sampling_defaults import check_override
        check_override(self.override_generation_config)
        from .reasoning import check_name
        check_name(self.reasoning_parser)
        if self.scheduling_policy not in POLICIES:
            raise BrazeError(f"scheduling_policy must be one of {', '.join(POLICIES)}, got "
                             f"{self.scheduling_policy!r}", param="scheduling_policy")
        if self.cudagraph_mode is not None and self.cudagraph_mode not in CUDAGRAPH_MODES:
            raise BrazeError(f"cudagraph_mode must be one of {', '.join(CUDAGRAPH_MODES)}, "
                             f"got {self.cudagraph_mode!r}")

    @classmethod
    def of(cls, options: "EngineOptions | None" = None, **overrides) -> "EngineOptions":
        """`options` (or the defaults) with keyword overrides, checked; an unknown keyword
        is an error that names it."""
        known = {f.name for f in fields(cls)}
        given_as = {}                   # braze's name -> the vLLM name the caller wrote
        for theirs, ours in VLLM_NAMES.items():
            if theirs in overrides:
                if ours in overrides:
                    raise BrazeError(f"give the option once: as {theirs}= or {ours}= "
                                     f"({theirs} is vLLM's name for {ours})", param=ours)
                overrides[ours] = overrides.pop(theirs)
                given_as[ours] = theirs
        take_vllm_fixed(overrides)
        bad = sorted(set(overrides) - known)
        if bad:
            raise BrazeError(f"unknown engine option {bad[0]!r}; the options are "
                             f"{', '.join(sorted(known))}")
        try:
            return cls(**{**asdict(options or cls()), **overrides})
        except BrazeError as e:         # say it with the name the caller wrote
            msg = str(e)
            for ours, theirs in given_as.items():
                if msg.startswith(ours + " "):
                    raise BrazeError(f"{theirs}{msg[len(ours):]} ({theirs} is vLLM's name "
                                     f"for {ours})", param=theirs) from None
            raise


def _json_object(text: str, name: str):
    import json
    try:
        return json.loads(text)
    except ValueError as e:
        raise BrazeError(f"{name} is not valid JSON ({e}): write an object such as "
                         f'{{"temperature": 0.6}}', param=name) from None
