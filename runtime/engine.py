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

from braze.ir.errors import BrazeError

from .block_manager import BlockManager
from .detokenizer import IncrementalDetokenizer
from .loader import Artifact, open_artifact
from .options import EngineOptions
from .model_runner import ModelRunner
from .request import Request, RequestOutput, Status, now
from .sampler import SamplingParams
from .scheduler import Scheduler
from .tokenizer import Tokenizer


class Engine:
    def __init__(self, artifact, options: EngineOptions | None = None, *, progress=None,
                 **overrides):
        """`artifact`: a path or an opened Artifact; `options` (runtime/options.py) and/or
        its fields as keywords; `progress(msg)` hears about CUDA-graph capture."""
        self.options = opts = EngineOptions.of(options, **overrides)
        # trusted_keys / trust_artifact: what admits an artifact no trusted key signed and
        # this braze cannot regenerate (runtime/trust.py)
        self.artifact = artifact if isinstance(artifact, Artifact) else open_artifact(
            artifact, trusted_keys=opts.trusted_keys, trust_artifact=opts.trust_artifact)
        self.runner = ModelRunner(self.artifact, opts, progress=progress)
        r = self.runner
        self.block_manager = BlockManager(r.num_kv_blocks, r.block_size, opts.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, r.max_num_seqs, r.max_num_tokens,
                                   watermark_blocks=max(0, r.num_kv_blocks // 100))
        tok_dir = self.artifact.tokenizer_dir
        has_tok = tok_dir is not None and (tok_dir / "tokenizer.json").exists()
        self.tokenizer = Tokenizer(tok_dir) if has_tok else None
        self.eos_token_ids = list(self.artifact.model.get("eos_token_ids") or [])
        self.vocab_size = self.artifact.model.get("vocab_size")
        self.max_model_len = r.max_len
        self.model_name = self.artifact.root.name
        self.requests: dict[str, Request] = {}
        self._aborted: list[Request] = []
        self._in_flight: list = []          # launched steps whose tokens are not applied yet
        # overlap: schedule and launch step N+1 before reading step N's tokens back; only
        # worth it where the device runs asynchronously to the host
        self.async_scheduling = (self.backend == "cuda" if opts.async_scheduling is None
                                 else bool(opts.async_scheduling))
        self._counters = {"prompt_tokens_total": 0, "generation_tokens_total": 0,
                          "requests_finished": 0, "steps": 0}
        if opts.freeze_gc:
            freeze_gc_now()

    @property
    def backend(self) -> str:
        return self.runner.executor.backend

    # ------------------------------------------------------------ requests

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        """Queue a request. `prompt` is text (needs the artifact's tokenizer) or token ids."""
        params = params or SamplingParams()
        params.validate()
        if request_id in self.requests:
            raise BrazeError(f"request id {request_id!r} is already in use")
        ids = self.encode(prompt)
        limit = self.max_model_len
        if len(ids) >= limit:
            raise BrazeError(f"the prompt has {len(ids)} tokens; this model allows {limit} in "
                             f"all (max_model_len), so at most {limit - 1} leave room to generate",
                             param="prompt")
        req = Request(request_id, ids, params, eos_ids=() if params.ignore_eos else self.eos_token_ids,
                      max_len=min(limit, len(ids) + params.max_tokens), arrival_time=arrival_time)
        if self.tokenizer is not None:
            req.detok = IncrementalDetokenizer(self.tokenizer, ids, stop=params.stop)
        elif params.stop:
            raise BrazeError("stop strings need a tokenizer and this artifact has none; "
                             "use stop_token_ids", param="stop")
        self.requests[request_id] = req
        self.scheduler.add(req)
        self._counters["prompt_tokens_total"] += len(ids)

    def encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise BrazeError("this artifact has no tokenizer: pass token ids instead of text",
                                 param="prompt")
            ids = self.tokenizer.encode(prompt)
        else:
            try:
                ids = [int(t) for t in prompt]
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

    def abort_request(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return
        self._finish(req, "abort")
        self._aborted.append(req)

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
        outputs = [self._output(r) for r in self._aborted]
        self._aborted.clear()
        sched = self.scheduler.schedule()
        for req in sched.preempted:
            self.runner.remove(req)
        if sched.chunks:
            t = now()
            for c in sched.chunks:
                if c.request.row is None:
                    self.runner.add(c.request)
                if c.request.metrics.first_scheduled_time is None:
                    c.request.metrics.first_scheduled_time = t
            result = self.runner.execute(sched.chunks, self.block_manager, sched.decode_only)
            for c in sched.chunks:
                if c.samples:
                    c.request.num_pending += 1
            self._in_flight.append((sched, result))
            self._counters["steps"] += 1
        elif not self._in_flight and not sched.preempted and self.scheduler.has_work():
            raise BrazeError("the scheduler could not run any request: the KV cache is too "
                             "small for the waiting prompt")
        lag = 1 if self.async_scheduling and sched.chunks else 0
        while len(self._in_flight) > lag:
            outputs.extend(self._apply(*self._in_flight.pop(0)))
        return outputs

    def _apply(self, sched, result) -> list[RequestOutput]:
        """A step's tokens are back: its blocks enter the prefix cache, its tokens join
        their requests (dropped for requests that finished meanwhile), stops are checked."""
        tokens = result.tokens()
        self.scheduler.commit(sched)
        t = now()
        outputs = []
        n = 0
        finished = Status.FINISHED
        for c, token in zip(sched.chunks, tokens):
            if not c.samples:
                continue
            req = c.request
            req.num_pending -= 1
            if req.status is finished:
                continue
            out_ids = req.output_token_ids
            out_ids.append(token)
            req.all_token_ids.append(token)
            m = req.metrics
            if m.first_token_time is None:
                m.first_token_time = t
            m.last_token_time = t
            p = req.params
            reason = None
            if token in req.eos_ids or token in p.stop_token_ids:
                reason, req.stop_reason = "stop", token
            if p.stop and req.detok is not None:
                hit = req.detok.update((token,))
                if hit is not None:
                    reason, req.stop_reason = "stop", hit
            if reason is None and (len(out_ids) >= p.max_tokens
                                   or len(req.all_token_ids) >= req.max_len):
                reason = "length"
            if reason is not None:
                self._finish(req, reason)
                outputs.append(self._output(req))
            elif p.output_kind == "delta":
                outputs.append(self._output(req))
            n += 1
        self._counters["generation_tokens_total"] += n
        return outputs

    def _finish(self, req: Request, reason: str) -> None:
        self.runner.remove(req)          # its persistent-batch row
        self.scheduler.remove(req)       # its KV blocks
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
        g = self.runner.graphs.stats
        return {
            "kv_blocks_total": bm["kv_blocks_total"],
            "kv_blocks_free": bm["kv_blocks_free"],
            "kv_blocks_used": self.block_manager.num_blocks - bm["kv_blocks_free"],
            "prefix_cache_hit_tokens": bm["prefix_cache_hit_tokens"],
            "prefix_cache_queries": bm["prefix_cache_queries"],
            "preemptions": self.scheduler.num_preemptions,
            "cuda_graphs_captured": g.get("cuda_graphs_captured", 0),
            "capture_seconds": g.get("capture_seconds", 0.0),
            "capture_bytes": g.get("capture_bytes", 0),
            **self.runner.executor.kernel_stats(),
            "num_running": self.num_running(),
            "num_waiting": self.num_waiting(),
            "backend": self.backend,
            "max_num_seqs": self.runner.max_num_seqs,
            "max_num_tokens": self.runner.max_num_tokens,
            "max_model_len": self.max_model_len,
            **self._counters,
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


def freeze_gc_now() -> None:
    """For a process that serves one engine: move everything alive now (weights, kernels,
    graphs, the engine) out of the garbage collector's sight, so collections during serving
    stay cheap. Not for processes that make many engines (frozen cycles are never freed)."""
    gc.collect()
    gc.freeze()
    if not _unfreeze.registered:     # so extension modules see their objects freed at exit
        atexit.register(_unfreeze)
        _unfreeze.registered = True


def _unfreeze() -> None:
    gc.unfreeze()
    gc.collect()


_unfreeze.registered = False
