"""Prompt logprobs: the logprob of every prompt token given the tokens before it.

The logits row of prompt position p scores prompt token p + 1, so a prefill chunk of a
request with `SamplingParams.prompt_logprobs` needs a logits row at each of its positions
p < len(prompt) - 1 (position len(prompt) - 1 is the one that samples the first output
token: it has its row anyway).

- An artifact with logits at every token (-O0/-O1: `logits` is `[T, vocab]`) has them
  all; the rows are read straight from the step's logits.
- An -O2 artifact prunes the LM head to the contract's `logits_indices` rows
  (`logits` is `[R, vocab]`, docs/batch-contract.md). Each chunk keeps its own row (its
  last token, the sampling row), and the prompt positions before it get extra rows after
  all sampling rows: `[sampling rows | extra rows of chunk a | of chunk b ...]`. The
  scheduler keeps the step's rows within what the step can compute (`limit_rows`):
  a prompt-logprobs chunk that would need more is cut short, and the rest of its prompt
  follows in the next steps. Each chunk keeps at least its own row, so a chunk always
  advances (by one token at least); an artifact with few logits rows just takes more
  steps for such a prompt. No step without a prompt-logprobs chunk is affected.

Pure Python over the scheduler's chunks, then one gather and one log_softmax on the
device for the rows of the step (never a loop over the vocabulary).
"""

from __future__ import annotations

import torch

from .sampler import Logprobs, compute_logprobs
from .uploads import upload_values


def scored(c) -> tuple[int, int]:
    """(first prompt token scored, how many) by chunk `c`'s positions: its positions
    start .. end-1 that lie before the prompt's last token score tokens start+1 ..."""
    n_prompt = len(c.request.prompt_token_ids)
    n = min(c.start + c.num_new, n_prompt - 1) - c.start
    return c.start + 1, max(n, 0)


def extra_rows(c) -> int:
    """Logits rows chunk `c` needs beyond its own (its last token's) on a pruned artifact."""
    _, n = scored(c)
    if n == 0:
        return 0
    # the chunk's last position is one of the scored ones when it ends inside the prompt
    return n - 1 if c.start + c.num_new <= len(c.request.prompt_token_ids) - 1 else n


def limit_rows(out, cap: int | None, bs: int) -> None:
    """Find this step's prompt-logprobs chunks (`out.prompt_chunks`, their indices) and,
    with `cap` (an artifact whose logits are pruned to `cap` rows at most), cut the last
    of them short until the step's rows (one per chunk, its guesses, the extra rows) fit.
    A cut chunk ends inside the prompt, so it does not sample; the request's
    `num_computed` follows the cut (its blocks stay reserved for the next step)."""
    chunks = out.chunks
    idx = [i for i, c in enumerate(chunks) if c.request.params.prompt_logprobs is not None
           and scored(c)[1] > 0]
    out.prompt_chunks = idx
    if cap is None or not idx:
        return
    over = len(chunks) + out.num_draft + sum(extra_rows(chunks[i]) for i in idx) - cap
    for i in reversed(idx):
        if over <= 0:
            break
        c = chunks[i]
        e = extra_rows(c)
        keep = max(0, e - over)
        if keep == e:
            continue
        over -= e - keep
        # keep + 1 positions, all before the prompt's last token: each scores the next one
        c.num_new = keep + 1
        c.samples = False
        c.request.num_computed = c.start + c.num_new
        if c in out.fills and (c.start + c.num_new) // bs == c.start // bs:
            out.fills.remove(c)


def plan_rows(chunks, prompt_chunks: list[int], pruned: bool, base: int,
              own_rows: list[int] | None = None):
    """The logits rows that score this step's prompt tokens.

    Returns (where, rows, targets, extra_tokens): `where` [(chunk index, first prompt
    position scored, count)], `rows` the logits row of each scored position (in the
    step's `logits`), `targets` the prompt token each scores, and `extra_tokens` the
    token rows to append to `logits_indices` at `base` (pruned artifacts only).
    `own_rows[i]`: chunk i's own logits row (default i: one row per chunk)."""
    offsets, off = [], 0
    for c in chunks:
        offsets.append(off)
        off += c.num_new
    where, rows, targets, extra = [], [], [], []
    for ci in prompt_chunks:
        c = chunks[ci]
        first, n = scored(c)
        if n == 0:
            continue
        prompt = c.request.prompt_token_ids
        where.append((ci, first, n))
        targets.extend(prompt[first:first + n])
        tok0 = offsets[ci]
        if not pruned:
            rows.extend(range(tok0, tok0 + n))
            continue
        e = extra_rows(c)
        rows.extend(range(base + len(extra), base + len(extra) + e))
        extra.extend(range(tok0, tok0 + e))
        if e < n:           # the last scored position is the chunk's own (last) token
            rows.append(ci if own_rows is None else own_rows[ci])
    return where, rows, targets, extra


def compute(logits: torch.Tensor, rows: list[int], targets: list[int], k: int) -> Logprobs:
    """Raw logprobs of `targets` under the `rows` of the step's logits, top `k`."""
    dev = logits.device
    sel = logits.index_select(0, upload_values(rows, torch.int64, dev))
    return compute_logprobs(sel, upload_values(targets, torch.int64, dev), k)
