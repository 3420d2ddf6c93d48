"""A simple generation loop over the executor: prefill the prompt, then decode token by token.

One sequence at a time; the continuous-batching engine replaces this loop.
"""

from __future__ import annotations

import torch

from braze.ir.errors import BrazeError

from .batch import SeqChunk
from .executor import Executor
from .sampler import SamplingParams, sample


def generate_ids(executor: Executor, prompt_ids: list[int], params: SamplingParams,
                 eos_token_ids: list[int] = ()) -> list[int]:
    params.validate()
    if not prompt_ids:
        raise BrazeError("the prompt is empty: give at least one token")
    limit = executor.max_model_len
    if len(prompt_ids) >= limit:
        raise BrazeError(f"the prompt has {len(prompt_ids)} tokens; this artifact allows "
                         f"{limit} in all (max_model_len), leaving no room to generate")
    vocab = executor.artifact.model.get("vocab_size")
    bad = [t for t in prompt_ids if t < 0 or (vocab and t >= vocab)]
    if bad:
        raise BrazeError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
    max_new = min(params.max_tokens, limit - len(prompt_ids))
    stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
    gen = torch.Generator(device="cpu")
    if params.seed is not None:
        gen.manual_seed(params.seed)
    cache = executor.cache
    needed = cache.blocks_for(len(prompt_ids) + max_new)
    cache.ensure_blocks(needed)
    blocks = cache.allocator.allocate(needed)
    try:
        out: list[int] = []
        chunk = SeqChunk(list(prompt_ids), 0, blocks)
        for _ in range(max_new):
            logits = executor.step([chunk])
            token = int(sample(logits.cpu(), params, gen)[0])
            out.append(token)
            if token in stops:
                break
            chunk = SeqChunk([token], chunk.num_computed + len(chunk.token_ids), blocks)
        return out
    finally:
        cache.allocator.free(blocks)
