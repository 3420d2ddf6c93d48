"""The `draft` proposer: a second, smaller braze artifact guesses the next k tokens.

It runs on its own model runner, KV cache and block manager. Each target request that
speculates has a shadow sequence in the draft: the draft's KV holds its tokens up to
`computed`. Before guessing, the shadow is brought up to the target's tokens: the
prefix where the shadow's tokens (the target's as of last time, then the draft's own
guesses) still agree with the target's keeps its KV, the rest is recomputed (one
catch-up chunk, within the draft's token budget; the first time that is the prompt).
Then the draft decodes greedily, one token per step for all shadows at once, k times:
a deterministic (point-mass) proposal, which the target's verification accepts
exactly (runtime/speculative.py).

Both artifacts must share a tokenizer: their tokenizer.json vocabularies are compared
when the engine starts.
"""

from __future__ import annotations

import json

from braze.ir.errors import BrazeError

from .block_manager import BlockManager
from .loader import open_artifact
from .model_runner import ModelRunner
from .options import EngineOptions
from .parallel import tensor_parallel_size
from .request import Request
from .sampler import SamplingParams
from .scheduler import ScheduledChunk


def check_tokenizers(target, draft, draft_path) -> None:
    """Refuse a draft whose token ids mean something else than the target's."""
    tv, dv = target.model.get("vocab_size"), draft.model.get("vocab_size")
    tdir, ddir = target.tokenizer_dir, draft.tokenizer_dir
    tj = tdir / "tokenizer.json" if tdir is not None else None
    dj = ddir / "tokenizer.json" if ddir is not None else None
    if tj is not None and dj is not None and tj.exists() and dj.exists():
        a, b = json.loads(tj.read_text()), json.loads(dj.read_text())
        for key in ("model", "added_tokens", "pre_tokenizer", "normalizer"):
            if a.get(key) != b.get(key):
                raise BrazeError(f"speculative draft model {draft_path}: its tokenizer differs "
                                 f"from the target's (tokenizer.json {key!r}); a draft must use "
                                 f"the same tokenizer", param="speculative")
        return
    if tv != dv or target.model.get("eos_token_ids") != draft.model.get("eos_token_ids"):
        raise BrazeError(f"speculative draft model {draft_path}: vocabulary {dv} and EOS "
                         f"{draft.model.get('eos_token_ids')} differ from the target's ({tv}, "
                         f"{target.model.get('eos_token_ids')}); a draft must use the same "
                         f"tokenizer", param="speculative")


class _Shadow:
    __slots__ = ("req", "tokens", "computed")

    def __init__(self, req: Request):
        self.req = req
        self.tokens = list(req.all_token_ids)   # what the draft's row holds, on the host
        self.computed = 0                       # leading tokens whose KV the draft holds


class DraftProposer:
    def __init__(self, config, engine):
        opts = engine.options
        try:
            self.artifact = open_artifact(config.model, trusted_keys=opts.trusted_keys,
                                          trust_artifact=opts.trust_artifact)
        except BrazeError as e:
            raise BrazeError(f"speculative draft model: {e}", param="speculative") from None
        check_tokenizers(engine.artifact, self.artifact, config.model)
        n = tensor_parallel_size(self.artifact.manifest)
        if n > 1:       # rank 0 runs the draft alone; the other ranks follow the target only
            raise BrazeError(f"speculative draft model {config.model} is tensor-parallel ({n} "
                             f"ranks); a draft runs on rank 0 alone: compile it without "
                             f"--tensor-parallel-size", param="speculative")
        lim = self.artifact.limits
        dopts = EngineOptions(backend=opts.backend, device=opts.device,
                              max_num_seqs=min(engine.runner.max_num_seqs, lim.max_num_seqs),
                              cudagraph_mode=opts.cudagraph_mode, debug=opts.debug,
                              trusted_keys=opts.trusted_keys, trust_artifact=opts.trust_artifact)
        # the draft keeps one block table (its own blocks never slide: no window freeing)
        self.runner = ModelRunner(self.artifact, dopts, window_freeing=False)
        r = self.runner
        self.bm = BlockManager(r.num_kv_blocks, r.block_size, enable_prefix_caching=False)
        self.vocab = engine.vocab_size
        self.shadows: dict[str, _Shadow] = {}
        self._params = SamplingParams(temperature=0.0, max_tokens=1 << 30)

    # ------------------------------------------------------------------ shadows

    def _shadow(self, req) -> _Shadow | None:
        sh = self.shadows.get(req.request_id)
        if sh is not None:
            return sh
        if self.runner.batch.num_free_rows == 0:
            return None
        shadow = Request(req.request_id, req.all_token_ids, self._params)
        if len(shadow.all_token_ids) >= self.runner.max_len:
            return None
        if not self.bm.can_allocate(shadow.all_token_ids[:1], use_cache=False):
            return None
        sh = _Shadow(shadow)
        self.bm.allocate(req.request_id, shadow.all_token_ids[:1], use_cache=False)
        self.runner.add(shadow)
        self.shadows[req.request_id] = sh
        return sh

    def forget(self, req) -> None:
        sh = self.shadows.pop(req.request_id, None)
        if sh is not None:
            self.runner.remove(sh.req)
            self.bm.free(req.request_id)

    def _sync(self, sh: _Shadow, target: list[int]) -> None:
        """Keep the KV of the prefix where the draft's tokens agree with the target's;
        the target's tokens past it go to the draft's row."""
        same = 0
        for a, b in zip(sh.tokens, target):
            if a != b:
                break
            same += 1
        sh.computed = min(sh.computed, same)
        if sh.tokens[same:] != target[same:] or len(sh.tokens) != len(target):
            batch = self.runner.batch
            if target[same:]:
                batch._put(batch.token_ids, [sh.req.row] * (len(target) - same),
                           list(range(same, len(target))), target[same:])
            sh.tokens = list(target)
        self.bm.truncate(sh.req.request_id, min(self.bm.num_tokens(sh.req.request_id),
                                                max(sh.computed, 0)))
        self.runner.batch.rollback_blocks(sh.req.row, self.bm.table_len(sh.req.request_id))

    # ------------------------------------------------------------------ proposing

    def propose(self, reqs: list, budgets: list[int]) -> list[list[int]]:
        out = {id(r): [] for r in reqs}
        live: list[tuple[_Shadow, object, int]] = []
        for r, b in zip(reqs, budgets):
            sh = self._shadow(r)
            if sh is None:
                continue
            b = min(b, self.runner.max_len - len(r.all_token_ids) - 1)
            if b < 1:
                continue
            self._sync(sh, r.all_token_ids)
            live.append((sh, r, b))
        if not live:
            return [out[id(r)] for r in reqs]
        # catch up: every shadow computes its tokens past `computed`; the chunk that reaches
        # the last one draws the first guess
        pending, dropped = list(live), set()
        while pending:
            budget, chunks, owners = self.runner.max_num_tokens, [], []
            for sh, r, b in pending:
                if budget <= 0 or len(chunks) == self.runner.max_num_seqs:
                    break
                n = min(len(sh.tokens) - sh.computed, budget)
                if not self.bm.reserve(sh.req.request_id, sh.computed + n):
                    dropped.add(id(sh))            # the draft's cache is full: no guess
                    continue
                chunks.append(ScheduledChunk(sh.req, n, sh.computed,
                                             sh.computed + n == len(sh.tokens)))
                owners.append((sh, r, b))
                budget -= n
            if not chunks:
                break
            tokens = self.runner.execute(chunks, self.bm, decode_only=False).tokens()
            for c, tok, (sh, r, b) in zip(chunks, tokens, owners):
                sh.computed = c.start + c.num_new
                if c.samples:
                    self._take(sh, r, tok, out)
                    dropped.add(id(sh))            # caught up
            pending = [x for x in pending if id(x[0]) not in dropped]
        # then greedy decode, one guess per step for every shadow that wants more
        while True:
            chunks, owners = [], []
            for sh, r, b in live:
                if len(out[id(r)]) >= b or len(out[id(r)]) == 0 or out[id(r)][-1] is None:
                    continue
                if not self.bm.reserve(sh.req.request_id, len(sh.tokens)):
                    continue
                chunks.append(ScheduledChunk(sh.req, 1, len(sh.tokens) - 1, True))
                owners.append((sh, r))
            if not chunks:
                break
            tokens = self.runner.execute(chunks, self.bm, decode_only=True).tokens()
            for c, tok, (sh, r) in zip(chunks, tokens, owners):
                sh.computed = len(sh.tokens)
                self._take(sh, r, tok, out)
        return [[t for t in out[id(r)] if t is not None] for r in reqs]

    def _take(self, sh: _Shadow, r, tok: int, out: dict) -> None:
        if self.vocab and tok >= self.vocab:   # an id only the draft's padded vocabulary has
            out[id(r)].append(None)            # ends the guesses
            return
        out[id(r)].append(tok)
        sh.tokens.append(tok)
