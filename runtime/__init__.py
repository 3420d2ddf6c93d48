"""Runtime: load an artifact and serve it. Imports `ir` and the artifact schema only,
never the compiler (frontend, passes, models); codegen's lowering only to verify an
artifact no trusted key signed (trust.py). Names load lazily so that importing one
piece (say the block manager) does not pull in the engine."""

_WHERE = {"Executor": "executor", "LLM": "llm", "Completion": "llm", "Engine": "engine",
          "Artifact": "loader", "open_artifact": "loader", "SamplingParams": "sampler",
          "RequestOutput": "request", "LoRARequest": "lora",
          "BeamSearchParams": "beam_search"}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
