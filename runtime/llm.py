"""The Python face of serving: `braze.LLM(artifact).generate(prompts, SamplingParams(...))`.

`LLM(artifact, trusted_keys=DIR, trust_artifact=True)` admit artifacts that neither a key
this user trusts signed nor this braze can regenerate (docs/trust.md).

`generate` queues every prompt on the engine at once (continuous batching) and
returns one `RequestOutput` per prompt, in the prompts' order.
"""

from __future__ import annotations

import dataclasses
import itertools

from braze.ir.errors import BrazeError

from .engine import Engine
from .options import EngineOptions
from .request import RequestOutput
from .sampler import SamplingParams

Completion = RequestOutput      # the name braze used before the engine


class LLM:
    def __init__(self, artifact, options: EngineOptions | None = None, **overrides):
        """`options` (runtime/options.py) and/or its fields as keywords: backend,
        num_kv_blocks, max_num_seqs, max_num_tokens, cudagraph_mode, ..."""
        self.engine = Engine(artifact, EngineOptions.of(options, **overrides))
        self.artifact = self.engine.artifact
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """prompts: a string, a list of strings, a list of token ids, or a list of those.
        params: one SamplingParams for all prompts, or one per prompt."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if isinstance(params, (list, tuple)):
            if len(params) != len(prompts):
                raise BrazeError(f"{len(params)} SamplingParams for {len(prompts)} prompts; "
                                 f"give one, or one per prompt")
            plist = list(params)
        else:
            plist = [params or SamplingParams()] * len(prompts)
        # only final results are wanted: the engine skips the per-step reports
        plist = [dataclasses.replace(sp, output_kind="final") for sp in plist]
        for sp in plist:
            if sp.structured_outputs is not None:
                # a grammar that does not compile is the caller's error, raised here (the
                # engine would only abort the request)
                sp.validate()
                self.engine.structured.cache.compile(sp.structured_outputs)
        ids = []
        try:
            for p, sp in zip(prompts, plist):
                rid = f"llm-{next(self._ids)}"
                self.engine.add_request(rid, p, sp)
                ids.append(rid)
            final = self.engine.run_to_completion(ids)
        except BaseException:
            for rid in ids:             # an interrupted call leaves nothing running
                self.engine.abort_request(rid)
            raise
        return [final[rid] for rid in ids]

    def stats(self) -> dict:
        return self.engine.stats()
