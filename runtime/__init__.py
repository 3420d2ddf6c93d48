"""Runtime: load an artifact and serve it. Imports `ir` and the artifact schema only,
never the compiler (frontend, passes, models, codegen)."""

from .executor import Executor
from .llm import LLM, Completion
from .loader import Artifact, open_artifact
from .sampler import SamplingParams

__all__ = ["Executor", "LLM", "Completion", "Artifact", "open_artifact", "SamplingParams"]
