"""vLLM's `LLM(...)` arguments for what a braze artifact fixed when it was compiled, or what
braze does one way only (as braze/vllm_serve_flags.py for `vllm serve` flags).

`braze.LLM` takes one where it asks for what the artifact does anyway (its own dtype,
"auto", the off values), so a vLLM script runs as written; at any other value the error
names the argument and the braze way to it. The parallel sizes are runtime/parallel.py's
(VLLM_OPTIONS), checked before the artifact's ranks start.
"""

from __future__ import annotations

from braze.ir.errors import BrazeError

_COMPILED_DTYPE = ("the dtype of the weights and the KV cache is chosen when the artifact is "
                   "compiled: braze compile MODEL_DIR -o ARTIFACT --dtype {value}")
_ARTIFACT = "braze.LLM runs a compiled artifact (braze compile MODEL_DIR -o ARTIFACT): leave it out"

# name -> (the values braze takes (None: the artifact's own, checked), what to do instead)
ARGS = {
    "dtype": (None, _COMPILED_DTYPE),
    "kv_cache_dtype": (("auto",), "the KV cache holds the dtype the artifact was compiled "
                                  "with (braze compile --dtype): leave it out"),
    "quantization": ((None,), "quantized checkpoints (fp8, GGUF) are read by braze compile; "
                              "braze.LLM runs what the artifact holds: leave it out"),
    "data_parallel_size": ((1,), "run one braze.LLM per replica"),
    "disable_log_stats": ((True, False), ""),      # braze logs no periodic stats
    "tokenizer_mode": (("auto",), "braze runs the artifact's own tokenizer (tokenizer.json): "
                                  "leave it out"),
    "trust_remote_code": ((False,), "braze loads no model code (the artifact is data): "
                                    "leave it out"),
    "tokenizer": ((None,), "the artifact carries its checkpoint's tokenizer: leave it out"),
    "revision": ((None,), _ARTIFACT),
    "download_dir": ((None,), _ARTIFACT),
    "load_format": (("auto",), _ARTIFACT),
    "swap_space": ((None,), "braze recomputes preempted requests; kv_offload_cpu_gb keeps "
                            "computed prefixes in host memory"),
    "cpu_offload_gb": ((None, 0), "braze keeps every weight on the device: leave it out"),
}


def take(values: dict) -> dict:
    """Remove ARGS' names from `values` (keyword arguments to LLM), returning them; vLLM's
    enforce_eager=True becomes braze's cudagraph_mode="none" (no CUDA graphs) in `values`."""
    eager = values.pop("enforce_eager", None)
    if eager is not None and not isinstance(eager, bool):
        raise BrazeError(f"enforce_eager must be True or False, got {eager!r}",
                         param="enforce_eager")
    if eager:
        mode = values.setdefault("cudagraph_mode", "none")
        if mode != "none":
            raise BrazeError(f"enforce_eager=True (vLLM's: no CUDA graphs) and "
                             f"cudagraph_mode={mode!r} disagree; give one of them",
                             param="enforce_eager")
    return {k: values.pop(k) for k in ARGS if k in values}


def _same(v, taken) -> bool:
    return any(v == t and type(v) is type(t) for t in taken)


def check(asks: dict, manifest: dict, root) -> None:
    """BrazeError naming the first of `asks` (from `take`) that the artifact at `root`
    (its `manifest`) does not do, and the braze way to it."""
    for name, v in asks.items():
        taken, advice = ARGS[name]
        if name == "dtype":
            compiled = _dtype_name(manifest["model"]["dtype"])
            if v == "auto" or _dtype_name(v) == compiled:
                continue
            have = f"artifact {root} holds {compiled}"
        elif _same(v, taken):
            continue
        else:
            have = "braze does not do that"
        value = (_dtype_name(v) or v) if name in ("dtype", "kv_cache_dtype") else v
        raise BrazeError(f"{name}={v!r} (vLLM's): {have}; " + advice.format(value=value),
                         param=name)


def _dtype_name(v) -> str | None:
    """'float32' for 'f32', 'float32', 'float', torch.float32; None for anything else."""
    import torch
    from braze.ir.types import torch_dtype
    if isinstance(v, str) and isinstance(getattr(torch, v, None), torch.dtype):
        v = getattr(torch, v)
    if isinstance(v, torch.dtype):
        return str(v).removeprefix("torch.")
    try:
        return str(torch_dtype(v)).removeprefix("torch.") if isinstance(v, str) else None
    except BrazeError:
        return None
