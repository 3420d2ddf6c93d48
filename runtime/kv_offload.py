"""KV blocks below the device: offload to host memory (and on to a disk or object-store
tier), and promotion back on a prefix hit the device no longer holds.

    store    a full block enters the device's prefix cache (its KV is computed): it is
             copied to the host tier, asynchronously on a GPU (a gather on the compute
             stream, then a copy to pinned memory on the offload's own stream, overlapping
             the next steps, that the host picks up once it has run), and written through
             to the lower tier by a background thread
    ready    the scheduler asks before admitting a request: the blocks after its device
             prefix hits that a lower tier holds are staged into host memory in the
             background; until that is done the request waits in the scheduler (others
             are admitted meanwhile), never inside a step
    load     on admission, the leading blocks the host tier holds are copied into the
             request's fresh device blocks (on a GPU: on the offload's own load stream,
             overlapping the steps of other requests, a few chunks queued at a time). The
             request holds its blocks but waits in the scheduler until the copy has ended
             (`settled`); only then do the
             blocks enter the device's prefix cache, so no other prompt reads them early.
             A request freed while its copy runs (preempted, aborted) first orders the
             compute stream after the copy (`abandon`), so nothing later writes its blocks
             before the copy has ended

A block's key is the model's identity plus a chained hash of every token up to the
block's end, so equal keys mean equal KV and two artifacts never share blocks. A load
that fails (a corrupt or missing block, a tier that errors) stops at that block: the
rest is computed as if it had never been offloaded. Per request, `kv_transfer_params`
(vLLM's name) caps the tokens loaded (`max_load_tokens`, 0 = none) and says whether its
blocks are stored (`store`).

Tensor parallelism: each rank holds its own slice of every block (its KV heads) and its own
tiers (host memory, and its own objects in the lower tier, named with its rank). Rank 0's
engine decides what is stored, staged, loaded and dropped; its KVOffload sends each decision
to the other ranks (`peers`, runtime/parallel.py's Group), whose KVOffload performs it on
their slices (`run_commands`), in the same order relative to the steps. A load's copy runs
on every rank's load stream; when rank 0 settles or abandons it, each other rank orders its
compute stream after its own copy (`settle`) before the next step. Before a load, every
rank says how many of the blocks it holds (`hold`, one small all-gather); the load takes the
fewest, so a block that failed on any rank is computed by all of them. Counters: blocks,
operations and seconds are rank 0's; bytes and failures are summed over the ranks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from braze.ir.errors import BrazeError

from .kv_stores import CorruptBlock, DirectoryStore, HostStore, S3Store, StoreError
from .parallel import current_group
from .uploads import upload_values

log = logging.getLogger("braze.runtime")

GIB = 1 << 30
TRANSFER_KEYS = {"max_load_tokens", "store"}
# the counters summed over tensor-parallel ranks (each rank moves its own slice's bytes)
SUMMED = ("store_bytes_host", "store_bytes_lower", "store_failures", "load_bytes_host",
          "load_bytes_lower", "load_failures", "lower_evictions", "lower_bytes")
REPLY_LEN = 1 + len(SUMMED)        # a rank's answer to rank 0: a value, then its SUMMED
# how long a rank > 0 waits for its own staging of a request that rank 0 has staged, before
# answering how many of its blocks it holds (a rank 0 waiting on it waits inside a step)
HOLD_WAIT_S = 10.0
# a load is copied in chunks of about this many bytes, at most LOAD_INFLIGHT_CHUNKS queued
# at once: its pinned staging and device temporaries stay bounded (a 32k-token prefix of an
# 8B model is 4 GiB) while the copy engine stays busy
LOAD_CHUNK_BYTES = 64 << 20
LOAD_INFLIGHT_CHUNKS = 4
# how long closing an engine waits for the lower tier's queued writes (a store that is
# down must not hold a server's shutdown for the tries of every block)
CLOSE_WAIT_S = 30.0
# the bytes of block writes queued for the lower tier: the host tier's size, and at least
# this much (a tier that falls behind drops the blocks past it, counted as failed stores)
WRITE_BACKLOG_MIN_BYTES = 1 << 30
# after a read from the lower tier fails (the tier errors, not a corrupt block), how long it
# is left alone: a request would otherwise wait out a store that is down (its timeouts and
# retries) before each first token
TIER_RETRY_S = 10.0


@dataclass
class KVTransferPolicy:
    """What one request may do with the lower tiers."""
    max_load_tokens: int | None = None     # None: no cap; 0: load nothing
    store: bool = True

    @classmethod
    def of(cls, params) -> "KVTransferPolicy":
        if params is None:
            return cls()
        if not isinstance(params, dict):
            raise BrazeError(f"kv_transfer_params must be an object, got {params!r}",
                             param="kv_transfer_params")
        bad = sorted(set(params) - TRANSFER_KEYS)
        if bad:
            raise BrazeError(f"kv_transfer_params has no field {bad[0]!r}; it takes "
                             f"{', '.join(sorted(TRANSFER_KEYS))}", param="kv_transfer_params")
        cap = params.get("max_load_tokens")
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 0):
            raise BrazeError(f"kv_transfer_params.max_load_tokens must be an integer >= 0 "
                             f"(0: load nothing), got {cap!r}", param="kv_transfer_params")
        store = params.get("store", True)
        if not isinstance(store, bool):
            raise BrazeError(f"kv_transfer_params.store must be true or false, got {store!r}",
                             param="kv_transfer_params")
        return cls(cap, store)


DEFAULT_POLICY = KVTransferPolicy()


def model_identity(manifest: dict, block_size: int, layout: dict, ranks: int = 1) -> bytes:
    """What makes KV blocks of two artifacts interchangeable: the same graph and weights,
    the same cache layout, and the same number of tensor-parallel ranks (each of which
    holds a slice of every block)."""
    files = manifest.get("files", {})
    ident = {"files": {k: v for k, v in sorted(files.items())
                       if k == "graph.bir" or k.startswith("weights")},
             "block_size": block_size,
             "layout": {k: [list(s), str(d)] for k, (s, d) in sorted(layout.items())}}
    if ranks > 1:
        ident["tensor_parallel_size"] = ranks
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).digest()


class _Staging:
    """A background fetch of a request's blocks from the lower tier into host memory."""
    __slots__ = ("future", "keys")

    def __init__(self, future, keys):
        self.future, self.keys = future, keys


class _DeviceCopy:
    """A load's host-to-device copy on the offload's load stream: its end event, and the
    pinned source that must live until then."""
    __slots__ = ("event", "source", "device")

    def __init__(self, event, source, device):
        self.event, self.source, self.device = event, source, device

    def query(self) -> bool:
        return self.event.query()

    def synchronize(self) -> None:
        self.event.synchronize()

    def order(self) -> None:
        """Make the compute stream wait for the copy (no host wait): every kernel launched
        after this runs after it."""
        torch.cuda.current_stream(self.device).wait_event(self.event)


class _Load:
    """A request's loaded blocks on their way to the device: chunks still to copy (host
    blocks, device block ids), the copies queued and not yet seen to end, the keys of its
    blocks, and when it began."""
    __slots__ = ("todo", "copies", "keys", "start")

    def __init__(self, todo: list, keys: set, start: float):
        self.todo, self.copies, self.keys, self.start = deque(todo), deque(), keys, start


class KVOffload:
    def __init__(self, cache, identity: bytes, host_bytes: int, lower=None, device="cpu"):
        self.cache = cache
        self.block_size = cache.block_size
        self.names = sorted(cache.tensors)
        # a hybrid cache (runtime/hybrid_cache.py): each cache tensor's KV cache group, whose
        # block ids are the group's own; a block is then a tuple of ids, one per group
        self.group_of = {n: 0 for n in self.names}
        self.block_bytes = cache.bytes_per_block
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.identity = identity
        self.host_bytes = host_bytes
        self.host = HostStore(host_bytes, self.block_bytes, pin=self.cuda)
        self.lower = lower
        self.ranks = 1                  # tensor-parallel ranks, each with its own slice
        # the lower tier's writes, and its reads on a thread of their own: a request staging
        # its blocks never waits behind the writes queued before it (a long prefill's, or
        # each try of a tier that is down)
        self._io = ThreadPoolExecutor(1, thread_name_prefix="braze-kv-io") if lower else None
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="braze-kv-read") \
            if lower else None
        self._keys: dict[str, list[str]] = {}          # request id -> its block keys so far
        self._staging: dict[str, _Staging] = {}
        self._pending: list = []       # (event, host buffer, keys) of copies still running
        self._streams: dict[str, torch.cuda.Stream] = {}   # "store", "load": the copies' own
        self._loading: dict[str, _Load] = {}   # request id -> its load still copying in
        self._backlog = 0              # bytes of block writes queued for the lower tier
        self._failed_read_at = None    # when a read from the lower tier last failed
        self._said_backlog = False
        # tensor parallelism: on rank 0, the group whose other ranks repeat each decision on
        # their slices; on those ranks, the blocks held for a load rank 0 is agreeing on
        self.peers = None
        self._held: dict[str, list] = {}
        self._peer_counters = dict.fromkeys(SUMMED, 0)
        self._lock = threading.Lock()
        self.counters = {"store_blocks": 0, "store_bytes_host": 0, "store_bytes_lower": 0,
                         "store_failures": 0, "load_blocks_host": 0, "load_blocks_lower": 0,
                         "load_bytes_host": 0, "load_bytes_lower": 0, "load_failures": 0,
                         "load_seconds": 0.0, "loads": 0, "store_seconds": 0.0, "stores": 0}

    # ------------------------------------------------------------------ keys

    def keys(self, req, num_blocks: int) -> list[str]:
        """The keys of the request's first `num_blocks` full blocks."""
        ks = self._keys.setdefault(req.request_id, [])
        if len(ks) < num_blocks:
            bs, ids = self.block_size, req.all_token_ids
            prev = bytes.fromhex(ks[-1]) if ks else self.identity
            if not ks and req.cache_salt is not None:     # a tenant's blocks apart
                prev = hashlib.blake2b(prev + b"cache_salt:" + req.cache_salt.encode(),
                                       digest_size=16).digest()
            for i in range(len(ks), num_blocks):
                block = np.asarray(ids[i * bs:(i + 1) * bs], dtype=np.int64).tobytes()
                prev = hashlib.blake2b(prev + block, digest_size=16).digest()
                ks.append(prev.hex())
        return ks[:num_blocks]

    def forget(self, req) -> None:
        self._keys.pop(req.request_id, None)
        self._drop(req.request_id)
        if self.peers is not None:
            self.peers.send("drop", req.request_id)

    def _drop(self, request_id: str) -> None:
        st = self._staging.pop(request_id, None)
        if st is not None:
            st.future.cancel()
        self._held.pop(request_id, None)

    # ------------------------------------------------------------------ load

    def _loadable(self, req, bm) -> tuple[int, int]:
        """(first, end): the block range a load may fill: after the device's prefix hits,
        within the request's cap, leaving at least one token to compute."""
        bs = self.block_size
        n = len(req.all_token_ids)
        first = bm.cached_prefix_blocks(req.all_token_ids, req.kv_salt)
        end = (n - 1) // bs
        cap = (req.kv_policy or DEFAULT_POLICY).max_load_tokens
        if cap is not None:
            end = min(end, first + cap // bs)
        return first, max(first, end)

    def ready(self, req, bm) -> bool:
        """Whether `req` may be admitted now; False while its blocks are being staged from
        the lower tier (the first call for a request starts that)."""
        st = self._staging.get(req.request_id)
        if st is not None:
            if not st.future.done():
                return False
            return True
        if self.lower is None and not self._loading:
            return True
        first, end = self._loadable(req, bm)
        if end <= first:
            return True
        keys = self.keys(req, end)[first:]
        if self._in_flight(keys[0]):    # another request's load brings these blocks to the
            return False                # device: wait for it and hit them there
        if self.lower is None or self._reads_resting():
            return True
        need = []
        for k in keys:
            if k in self.host:
                continue
            need = keys[keys.index(k):]
            break
        if not need:
            return True
        self._staging[req.request_id] = _Staging(self._reader.submit(self._stage, need), need)
        if self.peers is not None:      # the other ranks stage their slices meanwhile
            self.peers.send("stage", req.request_id, need)
            self.peers.flush()
        return False

    def _reads_resting(self) -> bool:
        """Whether the lower tier is left alone after a failed read (TIER_RETRY_S)."""
        t = self._failed_read_at
        return t is not None and time.monotonic() - t < TIER_RETRY_S

    def _in_flight(self, key: str) -> bool:
        return any(key in load.keys for load in self._loading.values())

    def wait_staging(self, timeout: float) -> None:
        """Block until some staging or load finishes or `timeout` seconds pass (the engine
        has nothing else to run)."""
        if self._loading:               # a host-to-device copy: short, and bounded by its size
            load = next(iter(self._loading.values()))
            if load.copies:
                load.copies[0].synchronize()
            self._pump(load)
            return
        pending = [s.future for s in self._staging.values() if not s.future.done()]
        if pending:
            wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)

    def _stage(self, keys: list[str]) -> set[str]:
        """Background: the lower tier's blocks for `keys` (in order, up to the first it
        lacks or fails on) into the host tier; the keys it read."""
        t = time.perf_counter()
        got = set()
        for k in keys:
            if k in self.host:
                continue
            try:
                payload = self.lower.get(k)
            except StoreError as e:
                with self._lock:
                    self.counters["load_failures"] += 1
                if not isinstance(e, CorruptBlock):
                    log.warning("KV tier %s: %s; its blocks are computed for the next %g s, "
                                "then it is tried again", self.lower.where, e, TIER_RETRY_S)
                    self._failed_read_at = time.monotonic()
                break
            if payload is None or len(payload) != self.block_bytes:
                if payload is not None:
                    with self._lock:
                        self.counters["load_failures"] += 1
                break
            # pageable: a load stacks its blocks into pinned memory before copying
            block = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
            self.host.put(k, block)
            got.add(k)
            with self._lock:
                self.counters["load_bytes_lower"] += len(payload)
        with self._lock:
            self.counters["load_seconds"] += time.perf_counter() - t
            self.counters["loads"] += 1 if got else 0
        return got

    def load(self, req, bm, cached_tokens: int) -> int:
        """After `bm.allocate` gave `req` its blocks with `cached_tokens` from the device's
        prefix cache: start filling the following blocks the host tier holds. Returns the
        tokens loaded (a multiple of the block size). The blocks are not in the prefix
        cache yet, and no step may read them before `settled(req)` says their copy has
        ended (at once where the copy is synchronous); the caller then commits them."""
        st = self._staging.pop(req.request_id, None)
        # the blocks its own staging read from the lower tier (the others: the host tier's)
        from_lower = st.future.result() if st is not None and st.future.done() \
            and not st.future.cancelled() and st.future.exception() is None else set()
        bs = self.block_size
        first, end = self._loadable(req, bm)
        first = cached_tokens // bs
        keys = self.keys(req, end)[first:] if end > first else []
        blocks = self._leading(keys)
        if self.peers is not None:
            if blocks:      # every rank must hold a block for any rank to load it
                blocks = blocks[:self._agree(req.request_id, keys[:len(blocks)])]
            if not blocks:
                self.peers.send("drop", req.request_id)
        if not blocks:
            return 0
        t = time.perf_counter()
        ids = bm.adopt(req.request_id, len(blocks), register=False)
        if self.peers is not None:
            self.peers.send("copy", req.request_id, ids)
        if not ids:
            return 0
        blocks = blocks[:len(ids)]      # a hybrid cache may take fewer (its window pools)
        load = self._start(blocks, ids, set(keys[:len(blocks)]))
        if load is not None:        # its time is counted when it has landed
            self._loading[req.request_id] = load
        with self._lock:
            for k in keys[:len(blocks)]:
                tier = "lower" if k in from_lower else "host"
                self.counters[f"load_blocks_{tier}"] += 1
            self.counters["load_bytes_host"] += len(blocks) * self.block_bytes
            if load is None:
                self.counters["load_seconds"] += time.perf_counter() - t
            self.counters["loads"] += 1
        return len(blocks) * bs

    def settled(self, req) -> bool:
        """Whether `req`'s load has landed (True for a request with no load in flight).
        The first True forgets the copy; the other ranks then order their next step after
        theirs."""
        load = self._loading.get(req.request_id)
        if load is None:
            return True
        if not self._pump(load):
            return False
        del self._loading[req.request_id]
        with self._lock:            # from the load's start to the scheduler seeing it landed
            self.counters["load_seconds"] += time.perf_counter() - load.start
        if self.peers is not None:
            self.peers.send("settle", req.request_id)
        return True

    def abandon(self, req) -> None:
        """`req`'s blocks are about to be freed while its load may still be copying into
        them (it was preempted or ended): every later kernel on the compute stream, which
        is what may reuse them, is ordered after the copies queued (the chunks not queued
        yet are never copied)."""
        load = self._loading.pop(req.request_id, None)
        if load is None:
            return
        self._settle(load)
        if self.peers is not None:
            self.peers.send("settle", req.request_id)

    def _settle(self, load: _Load) -> None:
        for copy in load.copies:
            copy.order()
            self._pending.append((copy, None, None))    # its source lives until it has ended
        load.copies.clear()

    def _start(self, blocks: list[torch.Tensor], ids: list, keys: set) -> "_Load | None":
        """Begin copying host `blocks` into device blocks `ids`, a chunk at a time; the
        load, or None if it has landed already (on the CPU the copies are synchronous)."""
        n = max(1, LOAD_CHUNK_BYTES // self.block_bytes)
        load = _Load([(blocks[i:i + n], ids[i:i + n]) for i in range(0, len(ids), n)], keys,
                     time.perf_counter())
        return None if self._pump(load) else load

    def _pump(self, load: _Load, everything: bool = False) -> bool:
        """Forget the copies of `load` that have ended and queue more chunks (all of them
        with `everything`); whether the whole load has landed."""
        while load.copies and load.copies[0].query():
            load.copies.popleft()
        while load.todo and (everything or len(load.copies) < LOAD_INFLIGHT_CHUNKS):
            copy = self._copy_in(*load.todo.popleft())
            if copy is not None:
                load.copies.append(copy)
        return not load.todo and not load.copies

    def _leading(self, keys: list[str]) -> list[torch.Tensor]:
        """The host tier's blocks for `keys`, up to the first it lacks."""
        blocks = []
        for k in keys:
            b = self.host.get(k)
            if b is None:
                break
            blocks.append(b)
        return blocks

    def _copy_in(self, blocks: list[torch.Tensor], ids: list[int]):
        """Host blocks (each [block_bytes]) into device blocks `ids`. On a GPU on the load
        stream, after the work already on the compute stream (the blocks may have been
        freed by a request whose last step still runs) and overlapping the steps after it;
        returns the copy (None: done already). The blocks are stacked into the host tier's
        pinned memory: torch.stack's own result is pageable, and a non-blocking copy from
        pageable memory is a synchronous one."""
        host = torch.stack(blocks, out=self.host.new_buffer(len(blocks)))
        if not self.cuda:
            self._scatter(host, ids)
            return None
        stream = self._side_stream("load")
        with torch.cuda.stream(stream):
            self._scatter(host, ids)
            ev = torch.cuda.Event()
            ev.record(stream)
        return _DeviceCopy(ev, host, self.device)

    def _side_stream(self, kind: str) -> "torch.cuda.Stream":
        """The offload's own CUDA stream for `kind` ("store", "load"; made on first use),
        ordered after the work already queued on the compute stream."""
        stream = self._streams.get(kind)
        if stream is None:
            stream = self._streams[kind] = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        return stream

    def _scatter(self, host: torch.Tensor, ids: list) -> None:
        """The stacked host blocks into the cache tensors' blocks `ids`, on the current
        stream (temporaries are allocated on it, so they are not reused before it ran)."""
        dev = host.to(self.device, non_blocking=True)
        off = 0
        for name in self.names:
            t = self.cache.tensors[name]
            per = t[0].numel() * t.element_size()
            part = dev[:, off:off + per].contiguous().view(t.dtype).view((len(ids),) + t.shape[1:])
            off += per
            g = self.group_of[name]
            rows = [j for j, e in enumerate(ids) if _block_id(e, g) is not None]
            if not rows:
                continue
            idx = upload_values([_block_id(ids[j], g) for j in rows], torch.int64, self.device)
            if len(rows) < len(ids):        # a window group fills only its window's blocks
                part = part[upload_values(rows, torch.int64, self.device)]
            t.index_copy_(0, idx, part)

    # ----------------------------------------------------------------- store

    def store(self, blocks: list[int], keys: list[str]) -> None:
        """Device blocks (just entered the prefix cache) to the host tier, and on to the
        lower tier."""
        if self.peers is not None and blocks:   # every other rank stores its slice of them
            self.peers.send("store", list(blocks), list(keys))
        todo = [(b, k) for b, k in zip(blocks, keys) if k not in self.host]
        if not todo:
            return
        t = time.perf_counter()
        idx = {g: upload_values([_block_id(b, g) for b, _ in todo], torch.int64, self.device)
               for g in set(self.group_of.values())}
        # the gather runs on the compute stream, ordered after the step that computed the
        # blocks and before any that could reuse them: a snapshot of their KV, written
        # tensor by tensor into one buffer (one tensor's part at a time beside it, not a
        # second copy of the whole: a prefill step's blocks can be a GiB)
        gathered = torch.empty((len(todo), self.block_bytes), dtype=torch.uint8,
                               device=self.device)
        off = 0
        for n in self.names:
            part = self.cache.tensors[n].index_select(0, idx[self.group_of[n]]) \
                .view(len(todo), -1).view(torch.uint8)
            gathered[:, off:off + part.shape[1]].copy_(part)
            off += part.shape[1]
        keys = [k for _, k in todo]
        if self.cuda:
            self._pending.append(self._copy_out(gathered, keys))
        else:
            self._stored(gathered, keys)
        self.counters["store_seconds"] += time.perf_counter() - t
        self.counters["stores"] += 1

    def _copy_out(self, gathered: torch.Tensor, keys: list[str]):
        """The device-to-host copy of gathered blocks on the offload's own stream: on the
        compute stream it would hold the next step's kernels back until it ended; here it
        overlaps them (the copy engine, not the SMs). -> (its end event, the host buffer,
        keys), which `poll` takes into the host tier once the event has passed."""
        buf = self.host.new_buffer(len(keys))
        stream = self._side_stream("store")     # after the gather
        with torch.cuda.stream(stream):
            buf.copy_(gathered, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(stream)
        # allocated on the compute stream: not to be reused before this stream has read it
        gathered.record_stream(stream)
        return ev, buf, keys

    def _stored(self, host: torch.Tensor, keys: list[str]) -> None:
        for row, k in zip(host, keys):
            self.host.put(k, row)       # HostStore.put copies it out of the buffer
        self.counters["store_blocks"] += len(keys)
        self.counters["store_bytes_host"] += len(keys) * self.block_bytes
        if self._io is None:
            return
        # the writes queued hold at most the host tier's size (WRITE_BACKLOG_MIN_BYTES at
        # least): a lower tier slower than the traffic (or down, each block a timeout) must
        # not grow the server without bound
        limit = max(self.host_bytes, WRITE_BACKLOG_MIN_BYTES)
        with self._lock:
            room = max(0, (limit - self._backlog) // self.block_bytes)
            take = min(room, len(keys))
            self._backlog += take * self.block_bytes
            dropped = len(keys) - take
            self.counters["store_failures"] += dropped
        if dropped and not self._said_backlog:
            self._said_backlog = True
            log.warning("KV tier %s is behind: its queued block writes reached the host "
                        "tier's size (--kv-offload-cpu-gb, 1 GiB at least), so blocks past "
                        "it are not written (counted in braze_kv_offload_failures_total)",
                        self.lower.where)
        if take:
            payloads = [(k, row.numpy().tobytes()) for row, k in zip(host[:take], keys)]
            self._io.submit(self._write_through, payloads)

    def _write_through(self, payloads) -> None:
        for k, data in payloads:
            try:
                self.lower.put(k, data)
            except StoreError:
                with self._lock:
                    self.counters["store_failures"] += 1
                continue
            finally:
                with self._lock:
                    self._backlog -= len(data)
            with self._lock:
                self.counters["store_bytes_lower"] += len(data)

    def poll(self) -> None:
        """Pick up the copies that finished (GPU): stored blocks enter the host tier; loads
        queue their next chunks."""
        for load in self._loading.values():
            self._pump(load)
        if not self._pending:
            return
        keep = []
        for ev, buf, keys in self._pending:
            if ev.query():
                if keys is not None:
                    self._stored(buf, keys)     # (None: an abandoned load that has ended)
            else:
                keep.append((ev, buf, keys))
        self._pending = keep

    def drain(self) -> None:
        """Wait for every copy and lower-tier write in flight (tests, shutdown)."""
        for ev, _, _ in self._pending:
            ev.synchronize()
        for load in self._loading.values():
            while not self._pump(load, everything=True):
                load.copies[0].synchronize()
        self.poll()
        if self._io is not None:
            self._io.submit(lambda: None).result()
        if self.peers is not None and not self.peers.closed:
            self._ask("drain")      # and every other rank's

    def close(self, timeout: float | None = None) -> None:
        """Shutdown: the copies in flight into the host tier, then the lower tier's writes
        still queued, waited for up to `timeout` seconds (default CLOSE_WAIT_S), so that a
        restarted server finds the blocks of its last requests there; the writes left
        after that are dropped, and said (their blocks are computed again when needed)."""
        for ev, _, _ in self._pending:
            ev.synchronize()
        self.poll()
        if self._reader is not None:
            self._reader.shutdown(wait=False, cancel_futures=True)
        if self._io is None:
            return
        io, self._io = self._io, None
        limit = CLOSE_WAIT_S if timeout is None else timeout
        finished = wait([io.submit(lambda: None)], timeout=limit)[0]
        if not finished:
            dropped = io._work_queue.qsize()
            log.warning("KV tier %s: %d batch(es) of block writes still queued after %.0f s "
                        "at shutdown are dropped; their blocks are computed again when "
                        "needed", self.lower.where, dropped, limit)
        io.shutdown(wait=False, cancel_futures=True)

    # ----------------------------------------------------------------- stats

    def stats(self) -> dict:
        if self.peers is not None and not self.peers.closed:
            try:
                self._ask("report")     # the other ranks' bytes and failures
            except BrazeError:          # a rank gone: the counts it last gave
                pass
        c = self._own()
        for k in SUMMED:
            c[k] += self._peer_counters[k]
        c["host_blocks"] = len(self.host)
        c["host_capacity_blocks"] = self.host.capacity_blocks
        c["host_evictions"] = self.host.evictions
        c["lower_tier"] = self.lower.name if self.lower is not None else None
        cap = getattr(self.lower, "capacity_bytes", None)
        if cap is not None:
            c["lower_capacity_bytes"] = cap * self.ranks
        return c

    def _own(self) -> dict:
        """This rank's counters, with its lower tier's evictions and bytes held (a disk
        tier's; 0 for the others)."""
        with self._lock:
            c = dict(self.counters)
        c["lower_evictions"] = getattr(self.lower, "evictions", 0)
        c["lower_bytes"] = getattr(self.lower, "bytes", 0)
        return c

    def summary(self) -> dict:
        """The tiers in effect (for /server_info): the host tier's size, the lower tier."""
        cap = getattr(self.lower, "capacity_bytes", None)
        return {"host_gb": self.host_bytes / GIB,
                "host_capacity_blocks": self.host.capacity_blocks,
                "lower_tier": self.lower.name if self.lower is not None else None,
                "lower": self.lower.where if self.lower is not None else None,
                **({"lower_gb": cap * self.ranks / GIB} if cap is not None else {})}

    # ---------------------------------------------------- tensor parallelism

    def _ask(self, *cmd) -> list[float]:
        """Rank 0: send `cmd` (after the queued ones) and take every other rank's answer:
        its value for `cmd` (one per rank), and its counters summed into ours."""
        rows = self.peers.ask(cmd, REPLY_LEN)
        self._peer_counters = {k: int(sum(r[1 + i] for r in rows))
                               for i, k in enumerate(SUMMED)}
        return [r[0] for r in rows]

    def _agree(self, request_id: str, keys: list[str]) -> int:
        """Rank 0: how many of `keys` (whose blocks it holds) every rank holds too."""
        return int(min([len(keys)] + self._ask("hold", request_id, keys)))

    def apply(self, op: str, *args) -> float:
        """A rank > 0: perform one of rank 0's decisions on this rank's slices; the value
        rank 0 asked for (`hold`: how many of the blocks this rank holds)."""
        if op == "store":
            self.store(*args)
        elif op == "stage":
            rid, keys = args
            if self._reader is not None:
                self._staging[rid] = _Staging(self._reader.submit(self._stage, keys), keys)
        elif op == "hold":
            rid, keys = args
            st = self._staging.pop(rid, None)
            if st is not None:          # rank 0 saw its own staging done: wait for ours,
                wait([st.future], timeout=HOLD_WAIT_S)  # within bounds (late ones: computed)
            self._held[rid] = self._leading(keys)
            return float(len(self._held[rid]))
        elif op == "copy":
            rid, ids = args
            blocks = self._held.pop(rid, [])[:len(ids)]
            if blocks:
                load = self._start(blocks, ids, set())
                if load is not None:
                    self._loading[rid] = load
                with self._lock:
                    self.counters["load_bytes_host"] += len(blocks) * self.block_bytes
        elif op == "settle":        # before the step that reads or reuses the blocks
            load = self._loading.pop(args[0], None)
            if load is not None:        # rank 0's has landed: queue what is left of ours
                self._pump(load, everything=True)
                self._settle(load)
        elif op == "drop":
            self._drop(*args)
        elif op == "drain":
            self.drain()
        elif op != "report":
            raise BrazeError(f"unknown KV offload command {op!r} from rank 0")
        return 0.0

    def reply(self, value: float) -> list[float]:
        c = self._own()
        return [value] + [float(c[k]) for k in SUMMED]


def run_commands(offload, cmds: list, cache, device, rank: int, ranks: int):
    """A rank > 0: perform rank 0's KV offload commands in order (the first, `setup`,
    opens this rank's tiers). Returns the offload and its answer to the last command."""
    value = 0.0
    for op, *args in cmds:
        if op == "setup":
            try:
                offload = _open(args[0], cache, b"", device, rank, ranks)
                value = 1.0
            except BrazeError as e:
                import logging
                logging.getLogger("braze.runtime").error("rank %d: %s", rank, e)
                offload, value = None, -1.0
            continue
        if offload is None:
            return None, [-1.0] + [0.0] * len(SUMMED)
        value = offload.apply(op, *args)
    return offload, (offload.reply(value) if offload is not None
                     else [value] + [0.0] * len(SUMMED))


def _block_id(block, group: int):
    """A block's id in a KV cache group: a plain id is every group's; a hybrid cache's
    block is a tuple of ids per group (None: that group holds no copy)."""
    return block if isinstance(block, int) else block[group]


def make_offload(options, cache, manifest: dict, device, group_of=None) -> KVOffload | None:
    """The offload tiers the engine options ask for, or None. `group_of`: a hybrid cache's
    KV cache group of each cache tensor (runtime/hybrid_cache.py)."""
    if not (options.kv_offload_cpu_gb or options.kv_offload_dir or options.kv_offload_s3):
        return None
    if not options.enable_prefix_caching:
        raise BrazeError("KV offload keeps the blocks of the prefix cache: it needs prefix "
                         "caching on (drop --no-enable-prefix-caching / --no-prefix-caching, "
                         "or the engine option enable_prefix_caching=False)")
    if options.kv_offload_dir and options.kv_offload_s3:
        raise BrazeError("choose one lower KV tier: --kv-offload-dir or --kv-offload-s3, "
                         "not both")
    group = current_group()
    rank, ranks = (group.rank, group.size) if group is not None else (0, 1)
    tiers = {"cpu_gb": options.kv_offload_cpu_gb, "dir": options.kv_offload_dir,
             "dir_gb": options.kv_offload_dir_gb,
             "s3": options.kv_offload_s3, "group_of": dict(group_of or {})}
    check_host_memory(options.kv_offload_cpu_gb or DEFAULT_HOST_GB, ranks)
    identity = model_identity(manifest, cache.block_size, cache._layout, ranks)
    off = _open(tiers, cache, identity, device, rank, ranks)
    if group is not None:       # the other ranks open theirs, each under its rank's names
        off.peers = group
        bad = [r for r, ok in enumerate(off._ask("setup", tiers), start=1) if ok < 0]
        if bad:
            raise BrazeError(f"tensor-parallel rank {bad[0]} could not open its KV offload "
                             f"tiers (its log says why); check --kv-offload-dir/-s3 there")
    return off


def check_host_memory(gb: float, ranks: int = 1) -> None:
    """A host tier fills as traffic comes: one larger than the machine's memory ends, hours
    later, in the OOM killer. Refused above the memory (every rank keeps its own tier);
    more than half of it is said."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError, AttributeError):      # not a POSIX host: not checked
        return
    need = gb * ranks
    each = f" on each of {ranks} tensor-parallel ranks" if ranks > 1 else ""
    if need > total:
        raise BrazeError(f"--kv-offload-cpu-gb {gb:g}{each} asks for {need:g} GiB of host "
                         f"memory; this host has {total:.1f} GiB in all: give less (the "
                         f"tier fills as traffic comes)")
    if need > total / 2:
        log.warning("--kv-offload-cpu-gb %g%s takes %.0f%% of this host's %.1f GiB of memory "
                    "once full", gb, each, 100 * need / total, total)


def _open(tiers: dict, cache, identity: bytes, device, rank: int, ranks: int) -> KVOffload:
    """One rank's tiers: its host memory, and its objects in the lower tier (named with its
    rank at tensor parallelism)."""
    suffix = f".rank{rank}" if ranks > 1 else ""
    lower = None
    if tiers["dir"]:
        # the cap is the directory's: each rank keeps its share of it
        gb = tiers.get("dir_gb") or DEFAULT_DIR_GB
        cap = int(gb * GIB / ranks)
        lower = DirectoryStore(tiers["dir"], suffix=suffix, capacity_bytes=cap)
        if rank == 0:
            check_disk_space(lower, gb, given=bool(tiers.get("dir_gb")))
    elif tiers["s3"]:
        lower = S3Store(tiers["s3"], suffix=suffix)
    gb = tiers["cpu_gb"] if tiers["cpu_gb"] else DEFAULT_HOST_GB
    off = KVOffload(cache, identity, int(gb * GIB), lower, device)
    off.ranks = ranks
    off.group_of.update(tiers["group_of"])
    return off


DEFAULT_HOST_GB = 4.0      # the host tier when only a lower tier is named
DEFAULT_DIR_GB = 64.0      # the disk tier's cap when --kv-offload-dir-gb is not given


def check_disk_space(store: DirectoryStore, gb: float, given: bool = True) -> None:
    """A cap larger than what the directory's filesystem has free (beside the blocks
    already there) fills the disk before the cap is reached: the writes then fail (counted,
    never fatal), so that is said, not refused."""
    try:
        st = os.statvfs(store.root)
    except (OSError, AttributeError):
        return
    room = st.f_bavail * st.f_frsize + store.bytes
    if gb * GIB > room:
        log.warning("--kv-offload-dir-gb %g%s: %s has %.1f GiB free for KV blocks; the disk "
                    "fills first (its failed writes are counted in "
                    "braze_kv_offload_failures_total): give --kv-offload-dir-gb at most that",
                    gb, "" if given else " (the default)", store.root, room / GIB)
