"""The serving engine: requests in, tokens out, many requests at once.

    eng = Engine("model.braze")
    eng.add_request("a", "Hello", SamplingParams(max_tokens=8))
    while eng.has_unfinished():
        for out in eng.step():
            print(out.request_id, out.new_text, out.finish_reason)

Each `step` schedules (runtime/scheduler.py), launches the model on the scheduled
chunks (runtime/model_runner.py), and applies sampled tokens: stop tokens, stop
strings, max_tokens and the length limit finish a request; its blocks are freed at
once. With async scheduling (default on a GPU) the tokens applied are the previous
step's, read back while this one runs (docs/runtime.md, "Overlap"). Not thread-safe:
one thread drives an engine (the HTTP server runs it in its own thread).
"""

from __future__ import annotations

import atexit
import gc
import logging
import operator
import threading

from braze.ir.errors import BrazeError

from .hybrid_cache import make_block_manager
from . import parallel
from .detokenizer import IncrementalDetokenizer
from .kv_offload import KVTransferPolicy, make_offload
from .loader import Artifact, open_artifact
from .lora import EngineLoRA
from .options import EngineOptions
from .reasoning import ReasoningGate, ReasoningMarkers
from .model_runner import ModelRunner
from .request import Request, RequestOutput, Status, TokenLogprobs, now
from .sampler import SamplingParams, bias_entries, prompt_keep
from .sampling_defaults import sampling_defaults
from .scheduler import Scheduler, check_priority
from .speculative import make_speculator
from .tokenizer import Tokenizer

log = logging.getLogger("braze.runtime")


_STRUCTURED_LOCK = threading.Lock()
MAX_BAD_WORD_TOKENS = 16

class Engine(EngineLoRA):
    def __init__(self, artifact, options: EngineOptions | None = None, *, progress=None,
                 **overrides):
        """`artifact`: a path or an opened Artifact; `options` (runtime/options.py) and/or
        its fields as keywords; `progress(msg)` hears about CUDA-graph capture."""
        self.options = opts = EngineOptions.of(options, **overrides)
        # trusted_keys / trust_artifact: what admits an artifact no trusted key signed and
        # this braze cannot regenerate (runtime/trust.py)
        self.artifact = artifact if isinstance(artifact, Artifact) else open_artifact(
            artifact, trusted_keys=opts.trusted_keys, trust_artifact=opts.trust_artifact)
        # what a request that leaves a sampling parameter unset gets (the server's, and
        # LLM.generate's without SamplingParams): runtime/sampling_defaults.py; read before
        # the weights, so that a bad generation_config.json fails at once
        self.sampling_defaults = sampling_defaults(self.artifact.tokenizer_dir,
                                                   opts.generation_config,
                                                   opts.override_generation_config)
        tok_dir = self.artifact.tokenizer_dir
        has_tok = tok_dir is not None and (tok_dir / "tokenizer.json").exists()
        self.tokenizer = Tokenizer(tok_dir) if has_tok else None
        # a reasoning parser's markers (runtime/reasoning.py), checked against the
        # tokenizer before the weights load
        self.reasoning = None if opts.reasoning_parser is None else \
            ReasoningMarkers.resolve(opts.reasoning_parser, self.tokenizer)
        had_group = parallel.current_group() is not None
        try:
            self._build(opts, progress)
        except BaseException:
            if not had_group:       # the tensor-parallel ranks this engine started: stop them
                parallel.shutdown()
            raise

    def _build(self, opts: EngineOptions, progress) -> None:
        self.runner = ModelRunner(self.artifact, opts, progress=progress)
        r = self.runner
        # one table, or one per KV cache group with window freeing (runtime/hybrid_cache.py)
        self.block_manager = make_block_manager(r, opts.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, r.max_num_seqs, r.max_num_tokens,
                                   watermark_blocks=max(0, r.num_kv_blocks // 100),
                                   policy=opts.scheduling_policy)
        self.scheduler.logits_row_cap = r.prompt_logprobs_rows   # None: logits at every token
        # lower KV tiers (host memory, a directory, an object store), when the options ask
        # (a hybrid cache's blocks are one id per KV cache group: runtime/hybrid_cache.py)
        self.offload = make_offload(opts, r.executor.cache, self.artifact.manifest, r.device,
                                    getattr(self.block_manager, "tensor_group", {}))
        if self.offload is not None:
            self.block_manager.registrations = []
            self.scheduler.kv_loader = self.offload
        self._init_lora(opts.max_cpu_loras)
        self.eos_token_ids = list(self.artifact.model.get("eos_token_ids") or [])
        self.vocab_size = self.artifact.model.get("vocab_size")
        self.max_model_len = r.max_len
        # a KV cache smaller than one sequence of max_model_len caps every
        # sequence below it: said once here and in each refusal, not found by surprise
        self.kv_limit = r.max_len if r.max_len < r.max_model_len else None
        if self.kv_limit is not None:
            log.warning("the KV cache (%d blocks of %d tokens) holds %d tokens of a sequence, "
                        "fewer than max_model_len %d: longer sequences end "
                        "there (finish reason 'length'); raise num_kv_blocks (--num-kv-blocks) "
                        "to allow them",
                        r.num_kv_blocks, r.block_size, r.max_len, r.max_model_len)
        self.model_name = self.artifact.root.name
        self.requests: dict[str, Request] = {}
        self._aborted: list[Request] = []
        self._structured = None             # runtime.structured.StructuredBackend, on first use
        self.closed = False                 # close() was called: it runs nothing more
        self._grammar_wait: list[Request] = []   # requests whose grammar is compiling
        self._in_flight: list = []          # launched steps whose tokens are not applied yet
        self._held_rows: list | None = None   # finished while a launched step waits to sample
        # overlap: schedule and launch step N+1 before reading step N's tokens back; only
        # worth it where the device runs asynchronously to the host
        self.async_scheduling = (self.backend == "cuda" if opts.async_scheduling is None
                                 else bool(opts.async_scheduling))
        self._counters = {"prompt_tokens_total": 0, "generation_tokens_total": 0,
                          "requests_finished": 0, "steps": 0,
                          # steps launched before the tokens of the step before were read
                          "overlapped_steps": 0}
        self.spec = make_speculator(opts, self)     # None unless opts.speculative
        if opts.freeze_gc:
            freeze_gc_now()

    @property
    def backend(self) -> str:
        return self.runner.executor.backend

    # ------------------------------------------------------------ requests

    def too_long(self, n: int) -> str:
        """The refusal of an n-token prompt (n >= max_model_len), naming what limits it: the
        artifact's max_model_len, or a KV cache smaller than one such sequence."""
        limit = self.max_model_len
        held = (f"this engine's KV cache holds {limit} tokens of a sequence (raise "
                f"num_kv_blocks / --num-kv-blocks for more)" if self.kv_limit is not None else
                f"this model allows {limit} in all (max_model_len)")
        return f"the prompt has {n} tokens; {held}, so at most {limit - 1} leave room to generate"

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None,
                    arrival_time: float | None = None, kv_transfer_params: dict | None = None,
                    group: str | None = None, lora_request=None, priority: int = 0,
                    cache_salt: str | None = None) -> None:
        """Queue a request. `prompt` is text (needs the artifact's tokenizer) or token ids.
        `kv_transfer_params` (vLLM's name): {"max_load_tokens": N (0: load nothing from the
        lower KV tiers), "store": false (keep its blocks out of them)}. `group`: parallel
        samples of one prompt (SamplingParams.children) name the same group, so they share
        the prompt's KV blocks (runtime/scheduler.py). `lora_request`: a LoRARequest or the
        name of an adapter added with `add_lora` (runtime/lora.py; the artifact needs
        --lora-slots). `priority`: vLLM's; lower runs first under scheduling_policy
        "priority", 0 only under "fcfs" (the default). `cache_salt`
        (vLLM's): requests share prefix-cache blocks (on the device and in the lower KV
        tiers) only with requests of the same salt, so one tenant cannot learn from cache
        hits what another has sent."""
        self.check_open()
        priority = check_priority(priority, self.options.scheduling_policy)
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise BrazeError(f"cache_salt must be a non-empty string, got {cache_salt!r}",
                             param="cache_salt")
        params = params or SamplingParams()
        params.validate()
        policy = KVTransferPolicy.of(kv_transfer_params) if kv_transfer_params is not None \
            else None
        if request_id in self.requests:
            raise BrazeError(f"request id {request_id!r} is already in use")
        if any(r.request_id == request_id for r in self._aborted):
            raise BrazeError(f"request id {request_id!r} was just aborted and its final report "
                             f"comes with the next step; step once before reusing the id, "
                             f"or use another", param="request_id")
        ids = self.encode(prompt)
        limit = self.max_model_len
        keep = prompt_keep(params.truncate_prompt_tokens, limit)
        if keep is not None:
            ids = ids[-keep:]
        if len(ids) >= limit:
            raise BrazeError(self.too_long(len(ids)), param="prompt")
        if params.num_samples > 1:
            raise BrazeError(f"n={params.n}, best_of={params.best_of}: the engine runs one "
                             "sample per request; add params.children() as requests "
                             "(LLM.generate and the server do)", param="n")
        req = Request(request_id, ids, params, eos_ids=() if params.ignore_eos else self.eos_token_ids,
                      max_len=limit, arrival_time=arrival_time)
        req.group = group
        req.priority = priority
        single, req.bad_sequences = self._bad_words(params)
        req.bias = bias_entries(params, list(req.stop_ids), single)
        if self.tokenizer is not None:
            req.detok = IncrementalDetokenizer(
                self.tokenizer, ids, stop=params.stop,
                skip_special_tokens=params.skip_special_tokens,
                include_stop=params.include_stop_str_in_output,
                min_tokens=params.min_tokens)
        elif params.stop:
            raise BrazeError("stop strings need a tokenizer and this artifact has none; "
                             "use stop_token_ids", param="stop")
        req.kv_policy = policy
        if lora_request is not None:     # a LoRARequest or a registered adapter's name
            self._bind_lora(req, lora_request)
        if cache_salt is not None:       # its blocks' hashes chain from the salt too
            req.cache_salt = cache_salt
            req.kv_salt = ("cache_salt", cache_salt, req.kv_salt)
        if params.structured_outputs is not None:
            # compiled in a worker thread; the request waits outside the scheduler till then
            req.grammar = self.structured.cache.compile_async(params.structured_outputs)
        self.requests[request_id] = req
        if req.grammar is not None and not req.grammar.done():
            self._grammar_wait.append(req)
        elif req.grammar is not None:
            self._start_matcher(req)
        else:
            self.scheduler.add(req)
        self._counters["prompt_tokens_total"] += len(ids)

    @property
    def structured(self):
        """The structured-output backend (xgrammar over the artifact's tokenizer), made on
        first use."""
        with _STRUCTURED_LOCK:        # the server may ask from a worker thread
            return self._structured_backend()

    def _structured_backend(self):
        if self._structured is None:
            from .structured import StructuredBackend
            # the logits' width, which a padded LM head makes wider than the tokenizer
            vocab = self.runner.executor.graph.outputs["logits"].type.shape[-1]
            # a mask row per logits row the step samples from: one per sequence, and with
            # speculative decoding 1 + k per verifying one
            rows = max(self.runner.max_num_seqs, self.runner.max_logits_rows)
            self._structured = StructuredBackend(self.artifact.tokenizer_dir, int(vocab),
                                                 self.eos_token_ids, rows, self.runner.device)
            self.runner.structured = self._structured
        return self._structured

    def _start_matcher(self, req: Request) -> bool:
        """The request's grammar compiled: give it a matcher and queue it. A grammar that
        failed to compile aborts the request (stop_reason: the error)."""
        err = req.grammar.exception()
        if err is not None:
            self._unbind_lora(req)
            self.requests.pop(req.request_id, None)
            req.status = Status.FINISHED
            req.finish_reason, req.stop_reason = "abort", str(err)
            req.metrics.finished_time = now()
            self._aborted.append(req)
            return False
        req.matcher = self.structured.matcher(req.params.structured_outputs, req.grammar.result())
        if self.reasoning is not None:       # the grammar holds the answer, not the reasoning
            req.matcher = ReasoningGate(req.matcher, self.reasoning,
                                        self.reasoning.prompt_state(req.prompt_token_ids))
        self.scheduler.add(req)
        return True

    def _admit_compiled(self) -> None:
        ready = [r for r in self._grammar_wait if r.grammar.done()]
        if ready:
            self._grammar_wait = [r for r in self._grammar_wait if not r.grammar.done()]
            for r in ready:
                if not r.finished:
                    self._start_matcher(r)
    def _bad_words(self, params: SamplingParams) -> tuple[list[int], list[list[int]]]:
        """(single-token bad words' ids, multi-token bad words' token ids). As in vLLM each
        word is encoded alone and after a space; each encoding is banned (a multi-token one
        by banning its last token where the output ends with the rest of it)."""
        vocab = self.vocab_size
        checks = [("logit_bias", t) for t in (params.logit_bias or {})]
        checks += [("bad_words_token_ids", t) for t in params.bad_words_token_ids]
        checks += [("allowed_token_ids", t) for t in params.allowed_token_ids or ()]
        for name, t in checks:
            if vocab and t >= vocab:
                raise BrazeError(f"{name}: token id {t} is outside the vocabulary (0..{vocab - 1})",
                                 param=name)
        single, multi = list(params.bad_words_token_ids), []
        if not params.bad_words:
            return single, multi
        if self.tokenizer is None:
            raise BrazeError("bad_words need a tokenizer and this artifact has none; use "
                             "bad_words_token_ids", param="bad_words")
        lead = self.tokenizer.encode("")            # a BOS the tokenizer adds by itself
        for word in params.bad_words:
            for text in dict.fromkeys((word, " " + word.lstrip(" "))):
                enc = self.tokenizer.encode(text)
                enc = enc[len(lead):] if enc[:len(lead)] == lead else enc
                if len(enc) > MAX_BAD_WORD_TOKENS:
                    raise BrazeError(f"bad_words: {word!r} is {len(enc)} tokens; at most "
                                     f"{MAX_BAD_WORD_TOKENS} are supported", param="bad_words")
                if len(enc) == 1:
                    single.append(enc[0])
                elif enc and enc not in multi:
                    multi.append(enc)
        return single, multi

    def _bad_word_ids(self, params: SamplingParams) -> list[int]:
        return self._bad_words(params)[0]

    def encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise BrazeError("this artifact has no tokenizer: pass token ids instead of text",
                                 param="prompt")
            ids = self.tokenizer.encode(prompt)
        else:
            try:
                ids = [_token_id(t) for t in prompt]
            except (TypeError, ValueError):
                raise BrazeError("a prompt is a string or a list of integer token ids",
                                 param="prompt") from None
        if not ids:
            raise BrazeError("the prompt is empty: give at least one token", param="prompt")
        vocab = self.vocab_size
        bad = [t for t in ids if t < 0 or (vocab and t >= vocab)]
        if bad:
            raise BrazeError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                             param="prompt")
        return ids

    def abort_request(self, request_id) -> None:
        """Abort a request, or a list of them (vLLM's LLMEngine takes a list), wherever it
        is: its final report (finish_reason "abort") comes from the next step. Ids not
        running (unknown, finished, aborted already) are ignored."""
        ids = list(request_id) if isinstance(request_id, (list, tuple, set, frozenset)) \
            else [request_id]
        for rid in ids:
            try:
                hash(rid)
            except TypeError:
                raise BrazeError(f"abort_request takes a request id or a list of request "
                                 f"ids, got {rid!r:.60} among them",
                                 param="request_id") from None
        for rid in ids:
            self._abort_one(rid)

    def _abort_one(self, request_id) -> None:
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return
        if req in self._grammar_wait:
            self._grammar_wait.remove(req)
            req.status = Status.FINISHED      # never reached the scheduler
            self._unbind_lora(req)
            req.finish_reason = "abort"
            req.metrics.finished_time = now()
            self.requests.pop(request_id, None)
            self._counters["requests_finished"] += 1
            self._aborted.append(req)
            return
        self._finish(req, "abort")
        self._aborted.append(req)

    def close(self) -> None:
        """Shutdown: the KV tiers' writes in flight land (within a bound: KVOffload.close),
        so the next process serving this artifact finds them, and the tensor-parallel
        ranks this engine runs on stop (each closing its own tiers; runtime/parallel.py,
        also done when the process exits; a no-op at one rank), and so does the thread
        that compiles grammars. The engine runs nothing after this (add_request refuses)."""
        self.closed = True
        try:
            if self.offload is not None:
                self.offload.close()
        finally:
            try:
                if self._structured is not None:
                    self._structured.close()
            finally:
                if self.runner.group is not None:
                    parallel.shutdown(self.runner.group)

    def check_open(self) -> None:
        """BrazeError once close() was called: its ranks, KV tiers and grammar thread are
        gone."""
        if self.closed:
            raise BrazeError("this engine was closed (LLM.close(), or the end of its with "
                             "block): it runs nothing more; make a new braze.LLM (or Engine) "
                             "to generate again")

    def reset_prefix_cache(self) -> bool:
        """vLLM's: forget every prompt prefix the device's cache holds (benchmarks, a cache
        warmed by traffic that no longer matters). Running requests keep their blocks,
        which are no longer shared with later prompts; the KV tiers below the device
        (--kv-offload-*) keep theirs. Always succeeds (True)."""
        self.block_manager.reset_prefix_cache()
        return True

    def has_unfinished(self) -> bool:
        """Whether `step` has more to do or report (running, waiting, launched, or
        aborted requests whose final report is not out yet)."""
        return bool(self.requests or self._in_flight or self._aborted)

    def num_running(self) -> int:
        return len(self.scheduler.running)

    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ---------------------------------------------------------------- step

    def step(self) -> list[RequestOutput]:
        """Schedule and launch a step, and apply the tokens of the step before it (with
        async scheduling) or of this one. Returns the reports of requests that got tokens
        or finished."""
        if self._grammar_wait:
            self._admit_compiled()
        outputs = [self._output(r) for r in self._aborted]
        self._aborted.clear()
        if self.offload is not None:
            self.offload.poll()
        # a grammar's next mask needs the token still in flight: this step's forward pass
        # is launched first and its sampling waits for the tokens before it
        masked = bool(self._in_flight) and any(r.matcher is not None
                                               for r in self.scheduler.running)
        if self.spec is not None:
            self.spec.propose(self.scheduler.running, len(self.scheduler.waiting))
        sched = self.scheduler.schedule()
        for req, message in sched.failed:      # e.g. its adapter's files gone: it alone ends
            self._finish(req, "abort")
            req.stop_reason = message
            self._aborted.append(req)
        for req in sched.preempted:
            self.runner.remove(req)
        if sched.chunks:
            t = now()
            for c in sched.chunks:
                if c.request.row is None:
                    self.runner.add(c.request)
                if c.request.metrics.first_scheduled_time is None:
                    c.request.metrics.first_scheduled_time = t
            if self._in_flight:
                self._counters["overlapped_steps"] += 1
            if masked:
                launched = self.runner.forward(sched.chunks, self.block_manager,
                                               sched.decode_only, sched.prompt_chunks)
                try:
                    outputs.extend(self._apply_holding_rows())
                    result = self.runner.sample(launched)
                finally:                # interrupted too: else every later finish holds its row
                    self._release_held_rows()
            else:
                result = self.runner.execute(sched.chunks, self.block_manager,
                                             sched.decode_only, sched.prompt_chunks)
            if self.spec is not None:
                self.spec.observe(sched.chunks)
            for c in sched.chunks:
                if c.samples:
                    c.request.num_pending += 1
            self._in_flight.append((sched, result))
            self._counters["steps"] += 1
        elif (sched.staging or sched.loading) and not self._in_flight:
            self.offload.wait_staging(timeout=0.05)    # nothing else to do meanwhile
        elif self._grammar_wait and not self._in_flight and not self.scheduler.has_work():
            # nothing to run but grammars compiling: wait for one rather than spin
            from concurrent.futures import FIRST_COMPLETED, wait
            wait([r.grammar for r in self._grammar_wait], timeout=0.01,
                 return_when=FIRST_COMPLETED)
        elif (not self._in_flight and not sched.preempted and self.scheduler.has_work()
              and not self._grammar_wait):
            raise BrazeError("the scheduler could not run any request: the KV cache is too "
                             "small for the waiting prompt")
        lag = 1 if self.async_scheduling and sched.chunks else 0
        while len(self._in_flight) > lag:
            outputs.extend(self._apply(*self._in_flight.pop(0)))
        return outputs

    def _apply_holding_rows(self) -> list[RequestOutput]:
        """Apply every step in flight while a launched step waits to sample: a request
        that finishes keeps its persistent-batch row until that sampling is done (its
        token there is dropped), so the rows the step was built on stay valid."""
        self._held_rows = []
        outputs = []
        while self._in_flight:
            outputs.extend(self._apply(*self._in_flight.pop(0)))
        return outputs

    def _release_held_rows(self) -> None:
        held, self._held_rows = self._held_rows, None
        for req in held:
            self.runner.remove(req)

    def _apply(self, sched, result) -> list[RequestOutput]:
        """A step's tokens are back: its blocks enter the prefix cache, its tokens join
        their requests (dropped for requests that finished meanwhile), stops are checked."""
        tokens = result.tokens()
        logprobs = result.logprobs()
        chunks = sched.chunks
        if sched.num_draft:     # a row per scored position: accept the guesses that held
            chunks, tokens, logprobs = self.spec.accept(sched, tokens, logprobs,
                                                        self.block_manager, self.runner.batch)
        for ci, first, entries in result.prompt_logprobs():
            req = sched.chunks[ci].request
            want = req.params.prompt_logprobs
            for j, (lp, rank, top) in enumerate(entries):
                pos = first + j
                req.prompt_logprobs[pos] = TokenLogprobs(req.prompt_token_ids[pos], lp, rank,
                                                         top[:want], self.tokenizer)
        self.scheduler.commit(sched)
        if self.offload is not None:
            self._offload_new_blocks()
        t = now()
        outputs = []
        n = 0
        finished = Status.FINISHED
        for i, (c, token) in enumerate(zip(chunks, tokens)):   # per request: keep it lean
            if not c.samples:
                continue
            req = c.request
            req.num_pending -= 1
            if req.status is finished:
                continue
            req.output_token_ids.append(token)
            all_ids = req.all_token_ids
            all_ids.append(token)
            if req.logprobs is not None:
                lp, rank, top = logprobs[i]
                req.logprobs.append(TokenLogprobs(token, lp, rank, top[:req.params.logprobs],
                                                  self.tokenizer))
                req.cumulative_logprob += lp
            m = req.metrics
            if m.first_token_time is None:
                m.first_token_time = t
            m.last_token_time = t
            p = req.params
            reason = None
            if token in req.stop_ids:
                # vLLM's stop_reason: the stop token id, None for EOS (not a stop_token_ids one)
                reason = "stop"
                req.stop_reason = token if token in p.stop_token_ids else None
                if req.detok is not None and not p.include_stop_str_in_output:
                    req.detok.leave_out_stop(len(req.output_token_ids))   # vLLM's text
            if p.stop and req.detok is not None:   # (a stop token left out adds no text)
                hit = req.detok.update((token,))
                if hit is not None:
                    reason, req.stop_reason = "stop", hit
            if req.matcher is not None and reason is None:
                # a token the grammar refuses (only possible for a stop token it does not
                # know) or a grammar that is complete: the output is done
                if not req.matcher.accept_token(token) or req.matcher.is_terminated():
                    reason = "stop"
            if reason is None and len(all_ids) >= req.max_len:     # max_tokens included
                reason = "length"
            if reason is not None:
                self._finish(req, reason)
                outputs.append(self._output(req))
            elif p.output_kind == "delta":
                outputs.append(self._output(req))
            n += 1
        self._counters["generation_tokens_total"] += n
        return outputs

    def _offload_new_blocks(self) -> None:
        """The blocks this step put into the prefix cache go down to the host tier (for
        requests whose policy lets them)."""
        regs = self.block_manager.registrations
        if not regs:
            return
        blocks, keys = [], []
        for seq_id, i, block in regs:
            req = self.requests.get(seq_id)
            if req is None or (req.kv_policy is not None and not req.kv_policy.store):
                continue
            blocks.append(block)
            keys.append(self.offload.keys(req, i + 1)[i])
        regs.clear()
        self.offload.store(blocks, keys)

    def _finish(self, req: Request, reason: str) -> None:
        if self._held_rows is not None:  # a launched step still samples from its row
            self._held_rows.append(req)
        else:
            self.runner.remove(req)      # its persistent-batch row
        if self.spec is not None:
            self.spec.forget(req)
        self.scheduler.remove(req)       # its KV blocks
        self._unbind_lora(req)
        if self.offload is not None:
            self.offload.forget(req)
        req.finish_reason = reason
        req.metrics.finished_time = now()
        self.requests.pop(req.request_id, None)
        self._counters["requests_finished"] += 1

    def _output(self, req: Request) -> RequestOutput:
        new_ids = req.output_token_ids[req.reported_tokens:]
        req.reported_tokens = len(req.output_token_ids)
        finished = req.finished
        metrics = req.metrics.as_dict(len(req.output_token_ids)) if finished else None
        # token_ids is the request's own list (no copy per step): it grows while the request
        # runs and is final once it finishes
        out = RequestOutput(req.request_id, req.prompt_token_ids, req.output_token_ids, None,
                            new_ids, "", finished, req.finish_reason, req.stop_reason, metrics)
        out.num_cached_tokens = req.metrics.num_cached_tokens
        if req.logprobs is not None:
            out.logprobs = req.logprobs
            out.new_logprobs = req.logprobs[len(req.logprobs) - len(new_ids):]
            out.cumulative_logprob = req.cumulative_logprob
        out.prompt_logprobs = req.prompt_logprobs
        if req.detok is not None:
            if req.params.stop:          # already detokenised in the step, for the stop check
                out._new_text = req.detok.output_delta(finished)
                out._text = req.detok.text
            else:                        # detokenised where it is read
                out._lazy = (req.detok, req.reported_tokens)
        return out

    # ---------------------------------------------------------------- stats

    def stats(self) -> dict:
        bm = self.block_manager.stats()
        runners = [self.runner.graphs.stats] + (self.spec.graph_stats() if self.spec else [])
        g = {k: sum(r.get(k, 0) for r in runners)
             for k in ("cuda_graphs_captured", "capture_seconds", "capture_bytes")}
        return {
            "kv_blocks_total": bm["kv_blocks_total"],
            "kv_blocks_free": bm["kv_blocks_free"],
            "kv_blocks_used": bm.get("kv_blocks_used",
                                     self.block_manager.num_blocks - bm["kv_blocks_free"]),
            **({"kv_groups": bm["kv_groups"]} if "kv_groups" in bm else {}),
            "kv_window_freeing": self.runner.window_freeing,
            "kv_shared_pool": getattr(self.runner, "kv_shared", False),
            "prefix_cache_hit_tokens": bm["prefix_cache_hit_tokens"],
            "prefix_cache_queries": bm["prefix_cache_queries"],
            "preemptions": self.scheduler.num_preemptions,
            **g,                            # the target's graphs and the MTP graph's
            **self.runner.executor.kernel_stats(self.spec.plans() if self.spec else ()),
            "num_running": self.num_running(),
            "num_waiting": self.num_waiting(),
            "backend": self.backend,
            "max_num_seqs": self.runner.max_num_seqs,
            "max_num_tokens": self.runner.max_num_tokens,
            "max_model_len": self.max_model_len,
            **self._counters,
            **(self.spec.stats() if self.spec is not None else {}),
            **({f"kv_offload_{k}": v for k, v in self.offload.stats().items()}
               if self.offload is not None else {}),
            **(self.lora.stats if self.lora is not None else {}),
        }

    def run_to_completion(self, request_ids=None) -> dict[str, RequestOutput]:
        """Step until the given requests (default: all) finish; their final outputs."""
        want = set(self.requests if request_ids is None else request_ids)
        final: dict[str, RequestOutput] = {}
        while want - final.keys():
            for out in self.step():
                if out.finished and out.request_id in want:
                    final[out.request_id] = out
            if not self.has_unfinished() and want - final.keys():
                missing = sorted(want - final.keys())[:3]
                raise BrazeError(f"requests {missing} ended without a final output")
        return final


# Young-generation threshold for a serving process. A decode step of 256 requests allocates
# over a thousand container objects (chunks, reports, token lists), so the default 700 runs
# a collection every step, over objects that are still alive and get promoted. At 20000
# most of them have died by refcount before a collection looks at them.
GC_THRESHOLDS = (20_000, 10, 10)


def freeze_gc_now() -> None:
    """For a process that serves one engine: move everything alive now (weights, kernels,
    graphs, the engine) out of the garbage collector's sight, so collections during serving
    stay cheap. Not for processes that make many engines (frozen cycles are never freed)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    if not _unfreeze.registered:     # so extension modules see their objects freed at exit
        atexit.register(_unfreeze)
        _unfreeze.registered = True


def _unfreeze() -> None:
    gc.unfreeze()
    gc.collect()


_unfreeze.registered = False


def _token_id(t) -> int:
    """An integer of any kind (numpy's, a 0-d integer tensor) as an int; a float such as
    1.5 or a bool is an error, not token 1."""
    if isinstance(t, bool):
        raise TypeError("a bool is not a token id")
    return operator.index(t)
