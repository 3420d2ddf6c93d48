"""The `draft` proposer: a second, smaller braze artifact guesses the next k tokens.

It runs on its own model runner, KV cache and block manager. Each target request that
speculates has a shadow sequence in the draft: the draft's KV holds its tokens up to
`computed`. Before guessing, the shadow is brought up to the target's tokens: the
prefix where the shadow's tokens (the target's as of last time, then the draft's own
guesses) still agree with the target's keeps its KV, the rest is recomputed (one
catch-up chunk, within the draft's token budget; the first time that is the prompt).
Then the draft decodes greedily, one token per step for all shadows at once: a
deterministic (point-mass) proposal, which the target's verification accepts exactly
(runtime/speculative.py). Those steps are chained on the device (runtime/decode_loop.py:
the KV slots of every guess reserved first, the static buffers advanced between replays
of the bucket's plan or CUDA graph), and every shadow's guesses, the catch-up's first
among them, come back to the host in one read at the end. A shadow whose budget is
smaller rides along without writing KV; one whose guess falls outside the target's
vocabulary has its guesses cut there on the host.

Both artifacts must share a tokenizer: their tokenizer.json vocabularies are compared
when the engine starts.
"""

from __future__ import annotations

import json

import torch

from braze.ir.errors import BrazeError

from .block_manager import BlockManager
from .decode_loop import greedy_steps
from .loader import open_artifact
from .model_runner import ModelRunner
from .options import EngineOptions
from .parallel import tensor_parallel_size
from .request import Request
from .sampler import SamplingParams
from .scheduler import ScheduledChunk
from .uploads import upload_values


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
                              # one share of the GPU for the engine, this cache included
                              gpu_memory_utilization=opts.gpu_memory_utilization,
                              trusted_keys=opts.trusted_keys, trust_artifact=opts.trust_artifact)
        # the draft keeps one block table (its own blocks never slide: no window freeing)
        self.runner = ModelRunner(self.artifact, dopts, window_freeing=False)
        r = self.runner
        self.bm = BlockManager(r.num_kv_blocks, r.block_size, enable_prefix_caching=False)
        self.vocab = engine.vocab_size
        # a draft whose vocabulary is smaller than the target's (the same tokenizer, less
        # padding) has no embedding row for the target's ids past it: requests that hold
        # one (from their prompt ids, or sampled) get no guesses
        self.draft_vocab = self.artifact.model.get("vocab_size")
        self.foreign: set[str] = set()          # ids of those requests
        self.shadows: dict[str, _Shadow] = {}
        self._params = SamplingParams(temperature=0.0, max_tokens=1 << 30)
        self.num_host_reads = 0

    # ------------------------------------------------------------------ shadows

    def graph_stats(self) -> list[dict]:
        """The draft runner's CUDA-graph stats (the engine's count includes them)."""
        return [self.runner.graphs.stats]

    def _shadow(self, req) -> _Shadow | None:
        sh = self.shadows.get(req.request_id)
        if sh is not None:
            return sh
        if self.runner.batch.num_free_rows == 0 or req.request_id in self.foreign:
            return None
        if self._lacks(req.all_token_ids):
            self.foreign.add(req.request_id)
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

    def _lacks(self, tokens) -> bool:
        """Whether `tokens` hold an id the draft's vocabulary lacks."""
        return bool(self.draft_vocab) and len(tokens) > 0 and max(tokens) >= self.draft_vocab

    def forget(self, req) -> None:
        self.foreign.discard(req.request_id)
        sh = self.shadows.pop(req.request_id, None)
        if sh is not None:
            self.runner.remove(sh.req)
            self.bm.free(req.request_id)

    def _sync(self, sh: _Shadow, target: list[int]) -> bool:
        """Keep the KV of the prefix where the draft's tokens agree with the target's;
        the target's tokens past it go to the draft's row. False (and the shadow dropped)
        when one of those is an id the draft's vocabulary lacks."""
        same = 0
        for a, b in zip(sh.tokens, target):
            if a != b:
                break
            same += 1
        if self._lacks(target[same:]):
            self.forget(sh.req)
            self.foreign.add(sh.req.request_id)
            return False
        # the last token is computed again even where its KV is held: its logits draw the
        # first guess (a target preempted between a proposal and its verification comes
        # back with the tokens it had)
        sh.computed = min(sh.computed, same, len(target) - 1)
        if sh.tokens[same:] != target[same:] or len(sh.tokens) != len(target):
            batch = self.runner.batch
            if target[same:]:
                batch._put(batch.token_ids, [sh.req.row] * (len(target) - same),
                           list(range(same, len(target))), target[same:])
            sh.tokens = list(target)
        self.bm.truncate(sh.req.request_id, min(self.bm.num_tokens(sh.req.request_id),
                                                max(sh.computed, 0)))
        self.runner.batch.rollback_blocks(sh.req.row, self.bm.table_len(sh.req.request_id))
        return True

    # ------------------------------------------------------------------ proposing

    def propose(self, reqs: list, budgets: list[int]) -> list[list[int]]:
        out = {id(r): [] for r in reqs}
        live: list[tuple[_Shadow, object, int]] = []
        for r, b in zip(reqs, budgets):
            sh = self._shadow(r)
            if sh is None:
                continue
            b = min(b, self.runner.max_len - len(r.all_token_ids) - 1)
            if b < 1 or not self._sync(sh, r.all_token_ids):
                continue
            live.append((sh, r, b))
        # catch up: every shadow computes its tokens past `computed`; the chunk that reaches
        # the last one draws the first guess (into the draft's token row, on the device)
        pending, dropped, caught = list(live), set(), []
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
            self.runner.execute(chunks, self.bm, decode_only=False)   # tokens stay on the device
            for c, (sh, r, b) in zip(chunks, owners):
                sh.computed = c.start + c.num_new
                if c.samples:
                    caught.append((sh, r, b))
                    dropped.add(id(sh))            # caught up
            pending = [x for x in pending if id(x[0]) not in dropped]
        if caught:
            self._guess(caught, out)
        return [out[id(r)] for r in reqs]

    def _guess(self, caught: list, out: dict) -> None:
        """The rest of each caught-up shadow's guesses: greedy decode steps chained on the
        device (runtime/decode_loop.py), then every guess read back to the host at once.
        A guess outside the target's vocabulary (an id only the draft's padded vocabulary
        has) ends its shadow's guesses."""
        chunks, steps, counts = [], [], []
        for sh, r, b in caught:
            L = len(sh.tokens)         # the first guess sits at position L of the draft's row
            n = b - 1                  # decode steps: positions L .. L + n - 1 get their KV
            while n and not self.bm.reserve(sh.req.request_id, L + n):
                n -= 1                 # the draft's cache is full: fewer guesses
            if n:
                chunks.append(ScheduledChunk(sh.req, 1, L, True))
                steps.append(n)
            counts.append(1 + n)
        if chunks:
            greedy_steps(self.runner, chunks, self.bm, steps)
        batch = self.runner.batch
        width = max(counts)
        where = upload_values([[sh.req.row for sh, _, _ in caught],
                               [len(sh.tokens) for sh, _, _ in caught]], torch.int64, batch.device)
        cols = where[1][:, None] + torch.arange(width, device=batch.device)[None, :]
        guesses = self._read(batch.token_ids[where[0][:, None], cols.clamp(max=batch.max_len)])
        for (sh, r, _), n, row in zip(caught, counts, guesses):
            L, kept = len(sh.tokens), out[id(r)]
            for tok in row[:n]:
                if self.vocab and tok >= self.vocab:
                    break
                kept.append(tok)
            sh.tokens.extend(kept)
            sh.computed = L + min(n - 1, len(kept))    # the KV of the guesses kept, but the last

    def _read(self, t) -> list:
        """The one device->host read of a proposal (counted: tests check there is one)."""
        self.num_host_reads += 1
        return t.tolist()
