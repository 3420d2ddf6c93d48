"""The step executor: batch buckets, static input buffers and CUDA-graph segments.

A step of T tokens and S sequences runs padded to a bucket: T_pad = the smallest
bucket >= T, S_pad = min(T_pad, max_num_seqs). For each bucket the artifact's
launch plans are bound once (`PlanExecutor.bind`): every argument resolved to a
static tensor or an int -- views of the caller's persistent input buffers
(`input_ids[:T_pad]`, `query_start_loc[:S_pad + 1]`, ...), the KV cache, the
weights, the arena slots, the workspaces and a static buffer per graph output.
That frozen call list is exactly what a CUDA graph bakes in, so:

  cuda       each "graph" segment of each bucket is captured once into a
             torch.cuda.CUDAGraph, largest bucket first, all in one memory pool,
             gc paused, after a warm-up run; "break" segments (attention) run
             eagerly between replays. mode "full": one graph for the whole
             forward of every bucket, which serves any batch: the break ops'
             kernels take their grids from the bucket's sizes and read the step
             only on the device, so a mixed prefill + decode step is captured as
             well as a decode-only one. A bucket with T == S also gets a second
             whole-step graph for decode-only steps, without their `decode_idle`
             launches. If a break op is bound as a torch call that reads the step
             on the host (`_host_breaks`), no whole-step graph can hold it and
             mode full falls back to the piecewise segments (`full_refused`).
  interpret  the same bound calls replayed directly on the CPU (Triton kernels
             under the interpreter, extern GEMMs with out= into static buffers):
             replay allocates nothing, reads no device data on the host and sees
             the step only through the static buffers -- the graph discipline,
             checked without a GPU.
  reference  nothing to bind: the IR interpreter runs on views of the buffers.

Wide buckets (`wide_rows`, -O2 artifacts compiled with more logits rows than a step
needs for sampling): a step that asks for prompt logprobs may need up to the artifact's
R logits rows. Rather than make every step's LM head compute that many, such a step
runs a second, "wide" variant of its bucket (R_pad = min(T_pad, wide_rows)) that reads
`logits_indices` from its own buffer (`wide_indices`). Wide variants are bound on first
use and replayed eagerly, never captured: they serve prefill steps only, where a CUDA
graph saves little, and a server that never sees prompt logprobs never binds one.

Decode-only steps: at a bucket with T == S, a decode-only step (one token per sequence)
leaves out the launches the plan marks `decode_idle` (braze/launch.py: attention's
prefill path): mode full replays the bucket's decode graph, the other modes leave them
out of their eager steps; what a piecewise graph captured keeps them.

Segments per mode (recomputed from the ops' `graph_break` property, so a mode
other than the artifact's compiled one works too): none -> one "eager" run;
piecewise -> "graph" runs cut at every break op; full -> one "graph" run.

The caller writes the step into the static buffers and pads it (input_ids 0,
positions 0, slot_mapping -1 up to T_pad; query_start_loc[S+1 : S_pad+1] = T,
seq_lens 0 for the padded sequences, logits_indices 0 for the padded logits rows up to
R_pad = min(T_pad, max logits rows)): `write_step` does
that from an unpadded batch-contract dict (ir/contract.py build_step).

Extra per-token inputs (`token_inputs`): a graph that reads more than the batch contract
one row per token (the MTP graph's `hidden_states`, runtime/mtp_graphs.py) names them;
each is a static buffer of max_num_tokens rows, bound as `[:T_pad]`, written by
`write_step` from the step dict and padded with zeros.
"""

from __future__ import annotations

import bisect
import gc
import logging
import time

import torch

from braze.ir.contract import STEP_INPUTS as CONTRACT
from braze.ir.contract import bucket_sizes, default_buckets, group_of_step_input
from braze.ir.errors import BrazeError
from braze.ir.segments import CUDAGRAPH_MODES
from braze.ir.segments import segments_for as cut_segments

log = logging.getLogger("braze.runtime")

STEP_INPUTS = tuple(CONTRACT)          # the batch contract's step inputs, by name
# a padding token writes no cache slot and uses no LoRA adapter; others pad 0
PADDING = {"slot_mapping": -1, "lora_slots": -1}
LORA_SLOTS = "lora_slots"              # the LoRA step input (passes/add_lora.py), when present
_TOKEN_ROWS = ("input_ids", "positions", "slot_mapping")
_SEQ_ROWS = ("seq_lens", "block_tables")


def group_inputs(static: dict) -> list[str]:
    """The KV cache groups' own slot mappings and block tables among the static buffers
    (a hybrid-cache artifact, runtime/hybrid_cache.py), in name order."""
    return sorted(n for n in static if group_of_step_input(n))


def add_group_buffers(static: dict, names) -> None:
    """Static buffers for a hybrid cache's group inputs `names` (the executor's
    `group_inputs`), shaped like the main slot mapping and block tables, padded."""
    for name in names:
        if name not in static:
            base = name.split(".")[0]
            static[name] = torch.full_like(static[base], PADDING.get(base, 0))


def validate_buckets(buckets, max_num_tokens: int) -> list[int]:
    """Sorted, distinct, positive ints no larger than max_num_tokens; max_num_tokens is
    added when missing (a step of that size must have a bucket)."""
    if buckets is None:
        return default_buckets(max_num_tokens)
    out = set()
    for b in buckets:
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise BrazeError(f"batch bucket {b!r} is not a positive integer token count")
        if b > max_num_tokens:
            raise BrazeError(f"batch bucket {b} exceeds max_num_tokens {max_num_tokens} (the "
                             f"static input_ids holds {max_num_tokens} tokens); drop it or "
                             f"size the buffers larger")
        out.add(b)
    if not out:
        raise BrazeError("batch buckets are empty; give at least one token count, or None "
                         "for the default")
    out.add(max_num_tokens)
    return sorted(out)


def pad_step(static: dict[str, torch.Tensor], n: int, s: int, T: int, S: int,
             r: int | None = None, R: int | None = None) -> None:
    """Pad a step written into the static rows [0, n) (tokens), [0, s) (sequences) and
    [0, r) (logits rows, default s) out to its bucket (T, S, R): padding tokens write no
    cache slot, padded sequences are empty, padded logits rows read token 0."""
    if T > n:
        for name in ("input_ids", "positions", "slot_mapping"):
            static[name][n:T] = PADDING.get(name, 0)
        if LORA_SLOTS in static:
            static[LORA_SLOTS][n:T] = -1
        for name in group_inputs(static):
            if name.startswith("slot_mapping."):
                static[name][n:T] = -1
    if S > s:
        static["query_start_loc"][s + 1:S + 1] = n
        static["seq_lens"][s:S] = 0
    r, R = (s, S) if r is None else (r, R)
    if R > r:
        static["logits_indices"][r:R] = 0


def segments_for(graph, mode: str) -> list[tuple[str, int, int]]:
    """(kind, first, last) node runs for `mode`: the cut split-segments recorded, or the
    same rule (ir/segments.py) for a mode the artifact was not compiled with."""
    meta = graph.meta
    if mode == "piecewise" and meta.get("cudagraph_mode") == "piecewise" and meta.get("segments"):
        return [tuple(s) for s in meta["segments"]]
    return [tuple(s) for s in cut_segments(graph, mode)]


def _group(calls: list, segments) -> list[tuple[str, int, int, list]]:
    """Split bound calls (in node order) into the segments' runs."""
    out, k = [], 0
    for kind, first, last in segments:
        run = []
        while k < len(calls) and calls[k].node <= last:
            if calls[k].node < first:
                raise BrazeError(f"launch for node {calls[k].node} falls outside the segments")
            run.append(calls[k])
            k += 1
        out.append((kind, first, last, run))
    if k != len(calls):
        raise BrazeError(f"launch for node {calls[k].node} falls outside the segments")
    return out


def _host_breaks(pieces) -> list[str]:
    """The break ops of a bucket bound as extern torch calls (a reference form without a
    kernel, e.g. -O0's mla_attention): they read the step on the host, which no captured
    graph may do (the capture fails on the GPU), so no whole-forward graph holds them."""
    return sorted({c.name for kind, _, _, calls in pieces if kind == "break" for c in calls
                   if c.name.startswith("extern.")})


def step_runs(graph, calls: list, mode: str) -> tuple[str, list]:
    """What a step of any batch replays in `mode`: (variant, runs as `_group` gives them).
    Mode full is one whole-step run unless a break op is bound as a torch call that reads
    the step on the host (`_host_breaks`); then it falls back to the piecewise cut."""
    if mode == "full":
        pieces = _group(calls, segments_for(graph, "piecewise"))
        if not _host_breaks(pieces):
            return "full", _group(calls, segments_for(graph, "full"))
        return "piecewise", pieces
    return ("eager" if mode == "none" else "piecewise"), _group(calls, segments_for(graph, mode))


def _decode_steps(b) -> None:
    """A decode-only step at T == S skips the launches that have nothing to do for it
    (`decode_idle`, braze/launch.py) among the steps that run eagerly; what a graph
    captured holds them still."""
    if b.T == b.S and b.pieces is not None:
        steps = [f for f in b.pieces if not getattr(f, "decode_idle", False)]
        b.decode = steps if len(steps) < len(b.pieces) else None


class _Bucket:
    """One padded batch size: its bound plan and the step lists that replay it."""

    def __init__(self, T: int, S: int, plan, views: dict):
        self.T, self.S, self.plan, self.views = T, S, plan, views
        self.logits = plan.outputs["logits"]
        self.pieces = None        # steps for any batch (piecewise or eager); None in mode full
        self.full = None          # the whole-step graph for any batch (mode full)
        self.full_decode = None   # mode full, T == S: the whole-step graph of a decode-only
                                  # step (`full` less its decode-idle launches)
        self.decode = None        # `pieces` less their eager decode-idle launches (T == S)
        self.checks: list[tuple[str, torch.Tensor, int]] = []


class GraphRunner:
    def __init__(self, executor, static: dict[str, torch.Tensor], buckets: list[int] | None,
                 max_num_seqs: int, mode: str | None = None, debug: bool = False,
                 wide_rows: int | None = None, token_inputs: tuple[str, ...] = ()):
        self.executor = executor
        self.static = static
        self.debug = bool(debug)
        self.token_inputs = tuple(token_inputs)
        add_group_buffers(static, getattr(executor, "group_inputs", ()))
        missing = [n for n in STEP_INPUTS + self.token_inputs if n not in static]
        if missing:
            raise BrazeError(f"static input buffers lack {', '.join(missing)}")
        self.max_num_tokens = int(static["input_ids"].shape[0])
        self.max_num_seqs = int(max_num_seqs)
        if self.max_num_seqs < 1:
            raise BrazeError(f"max_num_seqs must be positive, got {max_num_seqs}")
        self.max_blocks = int(static["block_tables"].shape[1])
        # R: logits rows per step (one per sequence unless the buffers hold more)
        self.max_logits_rows = max(int(static["logits_indices"].shape[0]), self.max_num_seqs)
        # R of the wide bucket variants (prompt logprobs on a pruned LM head), when larger
        self.wide_rows = min(max(wide_rows or 0, self.max_logits_rows), self.max_num_tokens)
        self.wide_indices = None
        if self.wide_rows > self.max_logits_rows:
            self.wide_indices = torch.zeros(self.wide_rows, dtype=torch.int64,
                                            device=static["logits_indices"].device)
        self._check_static()
        plan = getattr(executor, "plan", None)
        if plan is not None:
            lim = plan.max_sizes
            for what, have, cap, flag in (("max_num_tokens", self.max_num_tokens, lim["T"], "--max-num-tokens"),
                                          ("max_num_seqs", self.max_num_seqs, lim["S"], "--max-num-seqs"),
                                          ("logits rows", self.wide_rows, lim.get("R", lim["S"]), "--max-logits-rows"),
                                          ("block table width", self.max_blocks, lim["MB"], "--max-model-len")):
                if have > cap:
                    raise BrazeError(f"{what} {have} exceeds the {cap} the artifact's buffers were "
                                     f"planned for; recompile with a larger {flag} or lower it")
        self.buckets = validate_buckets(buckets, self.max_num_tokens)
        graph = executor.graph
        if mode is None:
            mode = graph.meta.get("cudagraph_mode") or "none"
        if mode not in CUDAGRAPH_MODES:
            raise BrazeError(f"cudagraph mode must be one of {', '.join(CUDAGRAPH_MODES)}, "
                             f"got {mode!r}")
        self.mode = mode
        # mode full: "any" (one whole-step graph serves every batch) until a bucket binds a
        # break op that reads the step on the host; then None, and piecewise segments
        self.full_capture = "any" if mode == "full" else None
        self._buckets: dict[int, _Bucket] = {}
        self._wide: dict[int, _Bucket] = {}       # wide variants, bound on first use
        self._graphs: list = []
        self._cache = None
        self._static_ptrs: dict[str, int] = {}
        self._captured = False
        self.last_variant = None      # which plan the last run replayed: full / piecewise / eager
        self.stats = {"cuda_graphs_captured": 0, "capture_seconds": 0.0, "capture_bytes": 0,
                      "buckets": list(self.buckets), "mode": self.mode, "plans_bound": 0,
                      "full_capture": self.full_capture, "wide_plans_bound": 0}

    # -- shapes -------------------------------------------------------------------------

    def _check_static(self) -> None:
        st, T, S = self.static, self.max_num_tokens, self.max_num_seqs
        want = {"input_ids": T, "positions": T, "slot_mapping": T, "query_start_loc": S + 1,
                "seq_lens": S, "block_tables": S, "logits_indices": min(S, T)}
        want.update((name, T) for name in self.token_inputs)
        for name, n in want.items():
            if st[name].shape[0] < n:
                raise BrazeError(f"static buffer {name} has {st[name].shape[0]} rows, needs {n} "
                                 f"(max_num_tokens {T}, max_num_seqs {S})")
            if not st[name].is_contiguous():
                raise BrazeError(f"static buffer {name} must be contiguous")

    def bucket_for(self, num_tokens: int, num_seqs: int) -> tuple[int, int]:
        """(T_pad, S_pad) for a step of num_tokens tokens over num_seqs sequences."""
        if num_tokens > self.max_num_tokens:
            raise BrazeError(f"step has {num_tokens} tokens, more than max_num_tokens "
                             f"{self.max_num_tokens}; schedule fewer tokens per step")
        if num_seqs > self.max_num_seqs:
            raise BrazeError(f"step has {num_seqs} sequences, more than max_num_seqs "
                             f"{self.max_num_seqs}")
        if num_tokens < 0 or num_seqs < 0:
            raise BrazeError(f"step sizes must be non-negative, got {num_tokens} tokens, "
                             f"{num_seqs} sequences")
        i = bisect.bisect_left(self.buckets, max(num_tokens, 1))
        while min(self.buckets[i], self.max_num_seqs) < num_seqs:   # more sequences than tokens
            i += 1
            if i == len(self.buckets):
                raise BrazeError(f"step has {num_seqs} sequences, more than the largest bucket "
                                 f"({self.buckets[-1]} tokens) holds")
        T = self.buckets[i]
        return T, min(T, self.max_num_seqs)

    def rows_for(self, T: int, wide: bool = False) -> int:
        """R_pad: the logits rows of the bucket of T padded tokens (of its wide variant)."""
        return min(T, self.wide_rows if wide else self.max_logits_rows)

    def _sizes(self, T: int, wide: bool = False) -> dict:
        sizes = bucket_sizes(T, self.max_num_seqs, self.max_blocks,
                             self.wide_rows if wide else self.max_logits_rows)
        cache = self.executor.cache.tensors
        if cache:
            sizes["NB"] = int(next(iter(cache.values())).shape[0])
        return sizes

    def _views(self, T: int, S: int, wide: bool = False) -> dict[str, torch.Tensor]:
        st = self.static
        v = {n: st[n][:T] for n in _TOKEN_ROWS + self.token_inputs}
        v.update({n: st[n][:S] for n in _SEQ_ROWS})
        v["query_start_loc"] = st["query_start_loc"][:S + 1]
        if LORA_SLOTS in st:
            v[LORA_SLOTS] = st[LORA_SLOTS][:T]
        for name in group_inputs(st):
            v[name] = st[name][:T] if name.startswith("slot_mapping.") else st[name][:S]
        v["logits_indices"] = (self.wide_indices if wide else st["logits_indices"])[
            :self.rows_for(T, wide)]
        return v

    # -- writing a step -----------------------------------------------------------------

    def write_step(self, inputs: dict[str, torch.Tensor]) -> tuple[int, int]:
        """Copy an unpadded step (the batch contract, e.g. ir/contract.py build_step) into
        the static buffers and pad it to its bucket; returns (num_tokens, num_seqs)."""
        n, s = int(inputs["input_ids"].shape[0]), int(inputs["seq_lens"].shape[0])
        T, S = self.bucket_for(n, s)
        st = self.static
        for name in ("input_ids", "positions", "slot_mapping", "seq_lens", "logits_indices"):
            st[name][:inputs[name].shape[0]].copy_(inputs[name])
        st["query_start_loc"][:s + 1].copy_(inputs["query_start_loc"])
        bt = inputs["block_tables"]
        w = min(int(bt.shape[1]), self.max_blocks)
        st["block_tables"][:s, :w].copy_(bt[:, :w])
        st["block_tables"][:s, w:].fill_(0)
        st["block_tables"][s:S].fill_(0)
        for name in group_inputs(st):      # a step with one table uses it for every group
            base = name.split(".")[0]
            src = inputs.get(name, inputs[base])
            if base == "slot_mapping":
                st[name][:n].copy_(src)
            else:
                st[name][:s, :w].copy_(src[:, :w])
                st[name][:s, w:].fill_(0)
                st[name][s:S].fill_(0)
        if LORA_SLOTS in st:        # a step that names no adapters uses none
            lora = inputs.get(LORA_SLOTS)
            if lora is None:
                st[LORA_SLOTS][:n].fill_(-1)
            else:
                st[LORA_SLOTS][:n].copy_(lora)
        for name in self.token_inputs:
            st[name][:n].copy_(inputs[name])
            st[name][n:T].zero_()
        r = int(inputs["logits_indices"].shape[0])
        if r > self.rows_for(T):
            raise BrazeError(f"step has {r} logits rows; its bucket of {T} tokens holds "
                             f"{self.rows_for(T)} (max logits rows {self.max_logits_rows})")
        pad_step(st, n, s, T, S, r, self.rows_for(T))
        return n, s

    def _write_dummy_step(self) -> None:
        """An all-padding step (no cache writes, no keys read) for warm-up and capture."""
        st = self.static
        for name in STEP_INPUTS + ((LORA_SLOTS,) if LORA_SLOTS in st else ()) + \
                tuple(group_inputs(st)) + self.token_inputs:
            st[name].fill_(PADDING.get(name, 0))

    # -- capture ------------------------------------------------------------------------

    def _release(self) -> None:
        if self._graphs and torch.cuda.is_initialized():
            # a replay may still be running: its graph's pool must not be reused under it
            torch.cuda.synchronize(self.executor.device)
        self._buckets.clear()
        self._wide.clear()
        self._graphs.clear()
        self._captured = False

    def capture(self, progress=None) -> None:
        """Bind (and on a GPU capture) every bucket, largest first. The static buffers'
        contents are kept."""
        t0 = time.perf_counter()
        self._release()
        ex = self.executor
        self._cache = ex.cache.tensors
        names = STEP_INPUTS + tuple(group_inputs(self.static)) + self.token_inputs
        self._static_ptrs = {n: self.static[n].data_ptr() for n in names}
        self.stats.update(cuda_graphs_captured=0, capture_bytes=0, plans_bound=0)
        self.stats.pop("extern_fallbacks", None)
        self.stats.pop("full_refused", None)
        self.full_capture = self.stats["full_capture"] = "any" if self.mode == "full" else None
        if ex.backend == "reference":
            self._captured = True
            self.stats["capture_seconds"] = time.perf_counter() - t0
            return
        plan = ex.plan
        if plan is None:
            raise BrazeError(f"backend {ex.backend!r} has no launch plans to bind")
        saved = {n: self.static[n].clone() for n in names}
        self._write_dummy_step()
        try:
            sizes = [self._sizes(T) for T in self.buckets]
            if self.wide_indices is not None:     # so a wide variant bound later fits too
                sizes += [self._sizes(T, True) for T in self.buckets]
            plan.runner.reserve_workspaces(sizes)
            for T in reversed(self.buckets):
                self._bind_bucket(T)
                if progress is not None and ex.backend != "cuda":
                    progress(f"bound bucket {T} tokens ({len(self._buckets)}/{len(self.buckets)})")
            if ex.backend == "cuda":
                self._capture_graphs(progress)
        except BaseException:
            self._release()
            raise
        finally:
            for n, t in saved.items():
                self.static[n].copy_(t)
        self._captured = True
        self.stats["capture_seconds"] = time.perf_counter() - t0
        st = self.stats
        log.info("bound %d step plans for buckets %s (mode %s), %d CUDA graphs, %.2fs, pool %.1f MiB",
                 st["plans_bound"], st["buckets"], st["mode"], st["cuda_graphs_captured"],
                 st["capture_seconds"], st["capture_bytes"] / 2**20)
        if st.get("extern_fallbacks"):
            log.info("extern ops without an in-place form (allocate at replay): %s",
                     ", ".join(st["extern_fallbacks"]))

    def _bind_wide(self, T: int) -> _Bucket:
        """The wide variant of bucket T: bound now, replayed eagerly (a flat call list)."""
        ex = self.executor
        sizes = self._sizes(T, True)
        views = self._views(T, sizes["S"], True)
        feeds = dict(views)
        feeds.update(ex.cache.tensors)
        feeds.update(ex.lora_pools)
        plan = ex.plan.bind(feeds, sizes)
        b = _Bucket(T, sizes["S"], plan, views)
        b.pieces = list(plan.calls)
        b.checks = [(name, t, t.data_ptr()) for name, t in plan.tensors()]
        self._wide[T] = b
        self.stats["wide_plans_bound"] += 1
        return b

    def _bind_bucket(self, T: int) -> None:
        ex = self.executor
        sizes = self._sizes(T)
        S = sizes["S"]
        views = self._views(T, S)
        feeds = dict(views)
        feeds.update(ex.cache.tensors)
        feeds.update(ex.lora_pools)
        plan = ex.plan.bind(feeds, sizes)
        if "logits" not in plan.outputs:
            raise BrazeError("the artifact's graph has no 'logits' output")
        b = _Bucket(T, S, plan, views)
        graph = ex.graph
        variant, runs = step_runs(graph, plan.calls, self.mode)
        if variant == "full":
            b.full = runs
            busy = [c for c in plan.calls if not c.decode_idle]
            if T == S and len(busy) < len(plan.calls):
                b.full_decode = _group(busy, segments_for(graph, "full"))
        else:
            b.pieces = runs
            if self.mode == "full" and "full_refused" not in self.stats:
                host = _host_breaks(runs)
                self.stats["full_refused"] = host
                self.full_capture = self.stats["full_capture"] = None
                log.info("cudagraph mode full: break ops %s run as torch calls that read the "
                         "step on the host, which no CUDA graph may hold; every step replays "
                         "the piecewise graphs", ", ".join(host))
        self.stats["plans_bound"] += sum(x is not None for x in (b.full, b.full_decode, b.pieces))
        if "extern_fallbacks" not in self.stats:   # externs that allocate at replay
            self.stats["extern_fallbacks"] = sorted({c.name for c in plan.calls
                                                     if c.name.endswith("(fallback)")})
        # what the debug check compares at every replay
        b.checks = [(name, t, t.data_ptr()) for name, t in plan.tensors()]
        b.checks += [(f"static {n}[:{t.shape[0]}]", t, t.data_ptr()) for n, t in views.items()]
        if ex.backend != "cuda":     # replayed directly: the flat call lists
            b.full, b.full_decode, b.pieces = (None if x is None else [c for seg in x for c in seg[3]]
                                               for x in (b.full, b.full_decode, b.pieces))
            _decode_steps(b)
        self._buckets[T] = b

    def _capture_graphs(self, progress) -> None:
        dev = self.executor.device
        torch.cuda.synchronize(dev)
        stream = torch.cuda.Stream(device=dev)
        pool = torch.cuda.graph_pool_handle()
        order = [self._buckets[T] for T in reversed(self.buckets)]
        # warm-up: compile / load every kernel and initialise cuBLAS outside any capture
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            for b in order:
                b.plan()
        stream.synchronize()
        reserved = torch.cuda.memory_reserved(dev)
        gc.collect()
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            for k, b in enumerate(order):
                if b.full is not None:
                    b.full = self._capture_segments(b, b.full, pool, stream)
                if b.full_decode is not None:
                    b.full_decode = self._capture_segments(b, b.full_decode, pool, stream)
                if b.pieces is not None:
                    b.pieces = self._capture_segments(b, b.pieces, pool, stream)
                    _decode_steps(b)
                if progress is not None:
                    progress(f"captured bucket {b.T} tokens ({k + 1}/{len(order)}, "
                             f"{len(self._graphs)} graphs)")
        finally:
            if was_enabled:
                gc.enable()
        torch.cuda.synchronize(dev)
        self.stats["cuda_graphs_captured"] = len(self._graphs)
        self.stats["capture_bytes"] = max(0, torch.cuda.memory_reserved(dev) - reserved)

    def _capture_segments(self, b: _Bucket, segments, pool, stream) -> list:
        steps = []
        for kind, first, last, calls in segments:
            if kind != "graph" or not calls:
                steps.extend(calls)
                continue
            g = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(g, pool=pool, stream=stream):
                    for c in calls:
                        c()
            except Exception as e:
                raise BrazeError(f"capturing nodes {first}-{last} of bucket {b.T} tokens into a "
                                 f"CUDA graph failed ({type(e).__name__}: {e}); run with "
                                 f"cudagraph mode 'none'") from e
            self._graphs.append(g)
            steps.append(g.replay)
        return steps

    # -- replay -------------------------------------------------------------------------

    def run(self, num_tokens: int, num_seqs: int, decode_only: bool,
            wide: bool = False) -> torch.Tensor:
        """The forward of the step already in the static buffers; returns the logits
        (a static tensor, overwritten by the next run). `wide`: run the bucket's wide
        variant, whose logits rows are `wide_indices` (prompt logprobs)."""
        T, S = self.bucket_for(num_tokens, num_seqs)
        if decode_only and num_tokens != num_seqs:
            raise BrazeError(f"a decode-only step has one token per sequence, got {num_tokens} "
                             f"tokens for {num_seqs} sequences")
        if wide and self.wide_indices is None:
            raise BrazeError(f"no wide logits rows: this runner computes at most "
                             f"{self.max_logits_rows} rows a step")
        ex = self.executor
        if wide:
            self.stats["wide_steps"] = self.stats.get("wide_steps", 0) + 1
        if ex.backend == "reference":
            feeds = self._views(T, S, wide)
            feeds.update(ex.cache.tensors)
            feeds.update(ex.lora_pools)
            self.last_outputs = ex.interpreter.run(feeds, ex.params)
            return self.last_outputs["logits"]
        if not self._captured:
            self.capture()
        if ex.cache.tensors is not self._cache:
            raise BrazeError("the KV cache was reallocated after the step plans were bound "
                             "(KVCache.resize); call GraphRunner.capture() again")
        if wide:
            b = self._wide.get(T) or self._bind_wide(T)
            if self.debug:
                self._check_bound(b)
            self.last_variant = "wide"
            for f in b.pieces:
                f()
            self.last_outputs = b.plan.outputs     # what the MTP proposers read after a step
            return b.logits
        b = self._buckets[T]
        if self.debug:
            self._check_bound(b)
        if b.full is not None:
            steps = b.full_decode if decode_only and b.full_decode is not None else b.full
            self.last_variant = "full"
        elif decode_only and b.decode is not None:
            steps, self.last_variant = b.decode, ("eager" if self.mode == "none" else "piecewise")
        else:
            steps, self.last_variant = b.pieces, ("eager" if self.mode == "none" else "piecewise")
        for f in steps:
            f()
        self.last_outputs = b.plan.outputs     # every graph output (static tensors)
        return b.logits

    def _check_bound(self, b: _Bucket) -> None:
        for name, ptr in self._static_ptrs.items():
            t = self.static.get(name)
            if t is None or t.data_ptr() != ptr:
                raise BrazeError(f"static input buffer {name!r} moved since capture: write each "
                                 f"step into the buffers GraphRunner was given (copy_), never "
                                 f"replace them")
        for name, t, ptr in b.checks:
            if t.data_ptr() != ptr:
                raise BrazeError(f"bound buffer {name} of bucket {b.T} tokens moved since "
                                 f"capture ({ptr:#x} -> {t.data_ptr():#x})")
        for name, t in self._cache.items():
            if name not in self.executor.cache.tensors or \
                    self.executor.cache.tensors[name].data_ptr() != t.data_ptr():
                raise BrazeError(f"KV cache tensor {name} moved since capture; call capture() again")
