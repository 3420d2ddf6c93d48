"""One engine step on the device: persistent batch → static inputs → forward → sample.

Owns the executor (weights, KV cache), the persistent batch, the static step buffers
and the graph runner that replays captured segments over them. The engine hands it
a scheduled step; it returns the sampled token of every sequence that samples.
"""

from __future__ import annotations

import torch

from braze.ir.errors import BrazeError

from . import parallel
from .executor import Executor
from .graph_runner import GraphRunner, add_group_buffers
from .input_batch import PersistentBatch, static_buffers
from .hybrid_cache import (group_pool_blocks, kv_groups_of, share_pool, shared_max_tokens,
                           shared_pool_blocks, window_pool_blocks)
from .kv_cache import default_num_blocks
from .loader import Artifact
from .lora import add_slots_buffer
from .options import EngineOptions
from .prompt_logprobs import compute as prompt_compute
from .prompt_logprobs import plan_rows
from .sampler import Logprobs, resolve_seed
from .scheduler import ScheduledChunk
from .uploads import upload_values


class ModelRunner:
    def __init__(self, artifact: Artifact, options: EngineOptions, progress=None,
                 window_freeing: bool = True):
        limits = artifact.limits
        # a tensor-parallel artifact: join or start its ranks (runtime/parallel.py)
        self.group = group = parallel.ensure_group(artifact, options)
        if group is not None and group.rank != 0:       # torchrun: ranks > 0 follow rank 0
            parallel.follow(artifact, options)
            raise SystemExit(0)
        if options.block_size is not None and options.block_size != limits.block_size:
            raise BrazeError(f"block_size={options.block_size}: this artifact's KV blocks are "
                             f"{limits.block_size} tokens, fixed when it was compiled; leave "
                             f"--block-size out, or recompile (braze compile ... --block-size "
                             f"{options.block_size})")
        self.max_model_len = _limit("max_model_len", options.max_model_len, limits.max_model_len)
        self.max_num_seqs = _limit("max_num_seqs", options.max_num_seqs, limits.max_num_seqs)
        self.max_num_tokens = _limit("max_num_tokens", options.max_num_tokens,
                                     limits.max_num_tokens)
        self.executor = Executor(artifact, backend=options.backend, device=options.device,
                                 num_blocks=1)
        ex = self.executor
        self.device = ex.device
        self.block_size = ex.block_size
        self.max_blocks = ex.max_blocks
        self.max_logits_rows = logits_rows(options, ex.logits_pruned, limits,
                                           self.max_num_seqs, self.max_num_tokens)
        self.static = static_buffers(self.max_num_tokens, self.max_num_seqs, self.max_blocks,
                                     self.device, self.max_logits_rows)
        add_slots_buffer(self.static, ex)     # a LoRA artifact's: each token's adapter slot
        add_group_buffers(self.static, ex.group_inputs)     # a hybrid cache's groups' inputs
        arena = int((artifact.graph.meta.get("memory") or {}).get("arena_bytes", 0))
        num_kv_blocks = options.num_kv_blocks
        # KV cache groups (runtime/hybrid_cache.py): window groups' pools hold their windows
        self.kv_groups = kv_groups_of(artifact.manifest, ex.cache, str(artifact.root))
        self.window_freeing = window_freeing and any(g.window for g in self.kv_groups)
        if num_kv_blocks is None:
            seq_blocks = -(-self.max_model_len // self.block_size)   # one longest sequence
            num_kv_blocks = default_num_blocks(ex.cache, self.device, self.max_num_seqs,
                                               seq_blocks, reserve_bytes=2 * arena + (1 << 29)
                                               + self._window_bytes(),
                                               bytes_per_block=self._full_bytes_per_block(),
                                               gpu_memory_utilization=options
                                               .gpu_memory_utilization)
        self.group_blocks = group_pool_blocks(self.kv_groups, num_kv_blocks, self.block_size,
                                              self.max_num_seqs, self.max_num_tokens,
                                              self.window_freeing)
        names = [ex.cache.group_names(g.layers) for g in self.kv_groups]
        # one pool the groups share (runtime/hybrid_cache.py), of the bytes the separate
        # pools would take, where a page wastes little (groups of equal layers)
        self.kv_shared = self.window_freeing and share_pool(ex.cache, names)
        if self.kv_shared:
            pages = shared_pool_blocks(ex.cache, names, self.group_blocks)
            self.group_blocks = pages
            ex.cache.share(pages, names)
        else:
            ex.cache.resize(num_kv_blocks, {name: n for grp, n in zip(names, self.group_blocks)
                                            for name in grp})
        self.num_kv_blocks = num_kv_blocks
        # a sequence can never hold more tokens than the cache or the artifact allows (a
        # window group alone holds any length: its blocks slide)
        full = not self.window_freeing or any(not g.window for g in self.kv_groups)
        self.max_len = min(self.max_model_len, num_kv_blocks * self.block_size) if full \
            else self.max_model_len
        if self.kv_shared and full:
            self.max_len = min(self.max_model_len, shared_max_tokens(
                self.kv_groups, self.group_blocks, self.block_size, self.max_num_tokens))
        self.batch = PersistentBatch(self.max_num_seqs, ex.max_model_len, self.max_blocks,
                                     self.block_size, self.device, self.static)
        on_gpu = torch.device(self.device).type == "cuda"
        if options.fused_prepare if options.fused_prepare is not None else on_gpu:
            from .input_batch import KernelPrepare
            self.batch.prepare_kernel = KernelPrepare(self.batch, interpret=not on_gpu)
        if options.sampler == "triton":
            from .sampler import KernelSampler
            self.batch.sampling.kernel = KernelSampler(
                interpret=torch.device(self.device).type != "cuda")
        # a pruned LM head computes up to the artifact's R rows in the wide variants of the
        # buckets, which only steps with prompt logprobs run (runtime/prompt_logprobs.py)
        self.graphs = GraphRunner(ex, self.static, options.buckets, self.max_num_seqs,
                                  mode=options.cudagraph_mode, debug=options.debug,
                                  wide_rows=limits.max_logits_rows if ex.logits_pruned else None)
        self.graphs = parallel.distribute(self.graphs, artifact, options,
                                          ex.cache.num_blocks)
        self.graphs.capture(progress=progress)

    structured = None      # runtime.structured.StructuredBackend, set by the engine on first use

    @property
    def prompt_logprobs_rows(self) -> int | None:
        """The most logits rows a step with prompt logprobs computes on this artifact;
        None where every token has its logits row (not pruned)."""
        if not self.executor.logits_pruned:
            return None
        return self.graphs.rows_for(self.max_num_tokens, True)

    def _full_bytes_per_block(self) -> int | None:
        """With window freeing, one block's bytes over the full-attention groups' caches."""
        if not self.window_freeing:
            return None
        cache = self.executor.cache
        names = [n for g in self.kv_groups if not g.window for n in cache.group_names(g.layers)]
        return cache.bytes_per_block_of(names) or None

    def _window_bytes(self) -> int:
        """With window freeing, the window groups' pools' bytes (their size does not depend
        on the cache's, up to one full sequence per running sequence)."""
        if not self.window_freeing:
            return 0
        cache = self.executor.cache
        return sum(cache.bytes_per_block_of(cache.group_names(g.layers)) * window_pool_blocks(
            g.window, self.block_size, self.max_num_seqs, self.max_num_tokens,
            self.max_num_seqs * self.max_blocks) for g in self.kv_groups if g.window)

    def _constrain(self, logits: torch.Tensor, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Mask the logits of rows whose request follows a grammar (one packed bitmask for
        the step; rows without one are all ones)."""
        matchers = [c.request.matcher if c.samples else None for c in chunks]
        mask = self.structured.bitmask(matchers)
        if mask is None:
            return logits
        from .structured import apply_bitmask_fast
        logits = logits.float()
        if not logits.is_contiguous():
            logits = logits.contiguous()
        apply_bitmask_fast(logits, mask)
        return logits

    def add(self, req) -> None:
        self.batch.add(req, resolve_seed(req.params.seed), req.bias, req.bad_sequences)

    def remove(self, req) -> None:
        self.batch.remove(req)

    def execute(self, chunks: list[ScheduledChunk], block_manager, decode_only: bool,
                prompt_chunks: list[int] | None = None) -> "StepResult":
        """Launch one step; its result holds one token per logits row: one per chunk
        (meaningful where `chunk.samples`), 1 + num_draft for a chunk verifying speculative
        tokens. `prompt_chunks`: the indices of chunks whose prompt logprobs this step
        computes (SchedulerOutput.prompt_chunks). On a GPU this returns before the step
        has run."""
        return self.sample(self.forward(chunks, block_manager, decode_only, prompt_chunks))

    def forward(self, chunks: list[ScheduledChunk], block_manager, decode_only: bool,
                prompt_chunks: list[int] | None = None) -> "LaunchedStep":
        """The first half of `execute`: build the step's inputs and launch the forward
        pass, up to the logits rows. `sample` finishes it; in between the host may advance
        the grammars whose masks this step's sampling needs (the engine's overlap)."""
        T = sum(c.num_new for c in chunks)
        S = len(chunks)
        Tp, Sp = self.graphs.bucket_for(T, S)
        drafted = not decode_only and any(c.num_draft for c in chunks)
        meta = self.batch.prepare(chunks, block_manager, Tp, Sp, self.graphs.rows_for(Tp),
                                  drafted)
        plan = self._prompt_rows(chunks, prompt_chunks, drafted, meta, Tp) \
            if prompt_chunks else None
        if plan is not None and plan[4]:
            logits = self.graphs.run(T, S, decode_only, wide=True)
        else:
            logits = self.graphs.run(T, S, decode_only)
        prompt_lp = None
        if plan is not None:
            where, rows, targets, k, _ = plan
            prompt_lp = where, prompt_compute(logits, rows, targets, k)
        if drafted:       # one logits row per scored position: the chunks as the rows see them
            S = meta["num_rows"]
            chunks = [c for c in chunks for _ in range(1 + c.num_draft)]
        return LaunchedStep(self._logits_rows(logits, S), chunks, meta, prompt_lp)

    def _logits_rows(self, logits: torch.Tensor, n: int) -> torch.Tensor:
        """The step's first n logits rows (the LM head's rows when it is pruned to them)."""
        if self.executor.logits_pruned:
            return logits[:n]
        return logits.index_select(0, self.static["logits_indices"][:n])

    def replay_decode(self, num_seqs: int) -> torch.Tensor:
        """Run the decode step (one token for each of num_seqs sequences) that is already in
        the static buffers again, as runtime/decode_loop.py moved them on the device:
        its logits rows. Nothing is written into the batch or read on the host."""
        return self._logits_rows(self.graphs.run(num_seqs, num_seqs, True), num_seqs)

    def sample(self, step: "LaunchedStep") -> "StepResult":
        """The second half of `execute`: mask the rows that follow a grammar (their
        matchers as they stand now), sample, and write the tokens into the batch."""
        logits, chunks, meta = step.logits, step.chunks, step.meta
        if self.structured is not None:
            logits = self._constrain(logits, chunks)
        rows, seq_lens = meta["rows"], meta["seq_lens"]
        tokens, logprobs = self.batch.sample(logits, chunks, rows, seq_lens)
        self.batch.write_sampled(rows, seq_lens, meta["samples"], tokens)
        return StepResult(tokens, logprobs, step.prompt_lp)

    def _prompt_rows(self, chunks, prompt_chunks, drafted: bool, meta: dict, Tp: int):
        """Where this step's prompt logprobs are read (runtime/prompt_logprobs.py); on a
        pruned artifact their extra rows go into `logits_indices` after the sampling rows.
        Returns (where, rows, targets, top k, wide) or None when no chunk scores a token;
        `wide`: the rows exceed the bucket's, so the step runs its wide variant."""
        pruned = self.executor.logits_pruned
        own = None
        if drafted:
            own, acc = [], 0
            for c in chunks:
                acc += 1 + c.num_draft
                own.append(acc - 1)
        base = meta["num_rows"] if drafted else len(chunks)
        where, rows, targets, extra = plan_rows(chunks, prompt_chunks, pruned, base, own)
        if not where:
            return None
        wide = False
        if extra:
            g, n = self.graphs, base + len(extra)
            index = self.static["logits_indices"]
            if n > g.rows_for(Tp):          # more than the bucket computes: its wide variant
                wide = True
                cap = g.rows_for(Tp, True)
                if n > cap:
                    raise BrazeError(f"prompt logprobs need {n} logits rows in a step whose "
                                     f"bucket computes {cap}; the scheduler keeps them within "
                                     f"its logits_row_cap")
                g.wide_indices[:base] = index[:base]
                g.wide_indices[n:cap] = 0
                index = g.wide_indices
            index[base:n] = upload_values(extra, torch.int64, self.device)
        k = max(chunks[ci].request.params.prompt_logprobs for ci, _, _ in where)
        return where, rows, targets, k, wide


class LaunchedStep:
    """A step whose forward pass is launched and whose tokens are not sampled yet: its
    logits rows, the chunk of each row, the batch's step metadata and the prompt-logprobs
    plan (ModelRunner.forward → ModelRunner.sample)."""
    __slots__ = ("logits", "chunks", "meta", "prompt_lp")

    def __init__(self, logits: torch.Tensor, chunks: list, meta: dict, prompt_lp):
        self.logits, self.chunks, self.meta, self.prompt_lp = logits, chunks, meta, prompt_lp


class StepResult:
    """A launched step's sampled tokens (and raw logprobs when a row asked for them),
    copied to the host without blocking the launch."""

    def __init__(self, tokens: torch.Tensor, logprobs: Logprobs | None = None,
                 prompt_lp: tuple | None = None):
        self._event = None
        parts = [tokens]
        self._prompt_where = None
        if prompt_lp is not None:     # (where: [(chunk index, first prompt position, n)], Logprobs)
            self._prompt_where, plp = prompt_lp
            parts += [plp.sampled, plp.rank, plp.top_ids, plp.top_logprobs]
        if logprobs is not None:
            parts += [logprobs.sampled, logprobs.rank, logprobs.top_ids, logprobs.top_logprobs]
        if tokens.is_cuda:
            self._parts = [_to_pinned(t) for t in parts]
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._parts = parts

    def tokens(self) -> list[int]:
        if self._event is not None:
            self._event.synchronize()
        return self._parts[0].tolist()

    def logprobs(self) -> list[tuple] | None:
        """Per row: (sampled token's logprob, its rank, [(top id, logprob), ...]); None
        when no row asked. Call after tokens()."""
        first = 1 if self._prompt_where is None else 5
        if len(self._parts) == first:
            return None
        sampled, rank, ids, lps = (p.tolist() for p in self._parts[first:first + 4])
        return [(s, r, list(zip(i, v))) for s, r, i, v in zip(sampled, rank, ids, lps)]

    def prompt_logprobs(self) -> list[tuple[int, int, list]]:
        """(chunk index, first prompt position, [(logprob, rank, top), ...]) per chunk that
        computed prompt logprobs this step. Call after tokens()."""
        if self._prompt_where is None:
            return []
        sampled, rank, ids, lps = (p.tolist() for p in self._parts[1:5])
        rows = [(s, r, list(zip(i, v))) for s, r, i, v in zip(sampled, rank, ids, lps)]
        out, k = [], 0
        for ci, first, n in self._prompt_where:
            out.append((ci, first, rows[k:k + n]))
            k += n
        return out


def logits_rows(options: EngineOptions, pruned: bool, limits, max_num_seqs: int,
                max_num_tokens: int) -> int:
    """R: the most logits rows a step computes. One per sequence, as without speculation;
    speculating with k tokens wants k + 1 per sequence, as many as the artifact's LM head
    holds when it is pruned to `logits_indices` (-O2, --max-logits-rows)."""
    spec = options.speculative
    if spec is None:
        return max_num_seqs
    want = min(max_num_tokens, max_num_seqs * (1 + spec.num_speculative_tokens))
    if not pruned:
        return want          # every token has its logits row; logits_indices picks them
    have = min(want, limits.max_logits_rows, max_num_tokens)
    # a row per token of the step (have == max_num_tokens) leaves room for guesses too
    if have <= max_num_seqs and have < max_num_tokens:
        raise BrazeError(
            f"speculative decoding scores up to {1 + spec.num_speculative_tokens} logits rows "
            f"per sequence, and this -O2 artifact's LM head computes {limits.max_logits_rows} "
            f"rows per step for {max_num_seqs} sequences: recompile with --max-logits-rows "
            f"{want}, or run with fewer --max-num-seqs")
    return have


def _to_pinned(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def _limit(name: str, value: int | None, compiled: int) -> int:
    """An engine option bounded by the artifact's step limit (EngineOptions checked its type)."""
    if value is None:
        return compiled
    if value > compiled:
        raise BrazeError(f"{name}={value} exceeds the {compiled} this artifact was compiled for "
                         f"(its buffers are planned for that); recompile with --{name.replace('_', '-')} {value}")
    return value
