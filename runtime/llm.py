"""The Python face of serving: `braze.LLM(artifact).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

from dataclasses import dataclass

from braze.ir.errors import BrazeError

from .executor import Executor
from .generate import generate_ids
from .loader import open_artifact
from .sampler import SamplingParams
from .tokenizer import Tokenizer


@dataclass
class Completion:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None


class LLM:
    def __init__(self, artifact, backend: str = "auto", device: str | None = None):
        self.artifact = open_artifact(artifact)
        self.executor = Executor(self.artifact, backend=backend, device=device)
        tok_dir = self.artifact.tokenizer_dir
        self.tokenizer = Tokenizer(tok_dir) if tok_dir else None
        self.eos_token_ids = list(self.artifact.model.get("eos_token_ids") or [])

    def generate(self, prompts, params: SamplingParams | None = None) -> list[Completion]:
        """prompts: a string, a list of strings, or a list of token-id lists."""
        params = params or SamplingParams()
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        out = []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise BrazeError("this artifact has no tokenizer: pass token ids instead of text")
                ids = self.tokenizer.encode(p)
            else:
                ids = [int(t) for t in p]
            new = generate_ids(self.executor, ids, params, self.eos_token_ids)
            text = self.tokenizer.decode(new) if self.tokenizer else None
            out.append(Completion(ids, new, text))
        return out
