"""Run a tensor-parallel artifact on torch.distributed: one process per rank.

The artifact's graph is the same on every rank (passes/shard.py); each rank loads its
own weight files and keeps its own KV cache. Rank 0 owns the engine (scheduler, block
manager, sampler). Every step it broadcasts a small header and the step's static input
buffers; every rank then replays the same graph segments, whose `all_reduce` and
`all_gather` ops meet across ranks (gloo on CPUs, NCCL on GPUs). The logits come back
whole on every rank and only rank 0 samples. The `mtp` proposer's calls of the MTP graph
(runtime/mtp_proposer.py) reach the other ranks the same way (`distribute_mtp`): a header
of their own, the call's inputs, then every rank runs the sharded MTP graph.

How the ranks start:

- one host, no launcher: the engine's process becomes rank 0 and starts ranks 1..N-1
  with torch.multiprocessing (spawn), watching them as they start (runtime/parallel_start.py);
- torchrun (or any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
  MASTER_PORT): every process runs the same command; rank 0 serves, the other ranks
  follow its steps and exit when it stops. WORLD_SIZE must equal the artifact's
  tensor_parallel_size.

LoRA (runtime/lora.py): rank 0's LoRAManager decides which adapter goes into which slot;
each slot write is sent to the other ranks between steps (a header with cmd _LORA, then
the adapter's name and directory), and each rank reads the directory and writes its own
share of the adapter into the same slot. The per-token `lora_slots` step input is
broadcast with the step's other buffers.

KV offload (runtime/kv_offload.py) at tensor parallelism: rank 0's engine decides what is
stored, staged, loaded and dropped, and queues each decision as a command (`Group.send`);
the queue goes out with the next step's header (or at once: `flush`, `ask`), so every rank
performs the commands on its own KV slice at the same point between steps. `ask` also
collects one small answer from each rank (an all-gather), e.g. how many blocks it holds.

Failures end the run with a message, never a hang: before each step rank 0 checks that
the ranks it started are alive, and every collective has the group's timeout
(`EngineOptions.collective_timeout_s`), after which it raises in every surviving rank.
Stopping: rank 0 tells the others (Group.close) between steps; a step cut short (Ctrl-C,
a failure) leaves them inside it, so those it started are terminated instead.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import logging
import os
import socket
import weakref

import torch
import torch.distributed as dist

from braze.ir.errors import BrazeError

from .uploads import upload, upload_values

log = logging.getLogger("braze.runtime")

_RUN, _STOP, _MTP, _LORA = 1, 0, 2, 3
_ASK, _CMDS = 4, 5      # commands that every rank answers; commands alone (no step)
_STEP_BUFFERS = ("input_ids", "positions", "slot_mapping", "query_start_loc", "seq_lens",
                 "block_tables", "logits_indices")
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def tensor_parallel_size(manifest: dict) -> int:
    return int((manifest.get("parallel") or {}).get("tensor_parallel_size", 1))


# vLLM's LLM() options for parallelism, which braze fixes when it compiles the artifact
VLLM_OPTIONS = ("tensor_parallel_size", "enable_expert_parallel", "pipeline_parallel_size")


def check_vllm_options(manifest: dict, root, **asks) -> None:
    """BrazeError, naming the compile flag, where vLLM's tensor_parallel_size /
    enable_expert_parallel / pipeline_parallel_size (`asks`, VLLM_OPTIONS; None: not
    asked) want other than what the artifact at `root` was compiled for."""
    tp, ep, pp = (asks.get(k) for k in VLLM_OPTIONS)
    for key, v in (("tensor_parallel_size", tp), ("pipeline_parallel_size", pp)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise BrazeError(f"{key} must be a positive integer, got {v!r}", param=key)
    if ep not in (None, True, False):
        raise BrazeError(f"enable_expert_parallel must be True or False, got {ep!r}",
                         param="enable_expert_parallel")
    n = tensor_parallel_size(manifest)
    if tp is not None and tp != n:
        raise BrazeError(f"tensor_parallel_size={tp}: artifact {root} was compiled for "
                         f"--tensor-parallel-size {n}, and braze compiles the split into the "
                         f"artifact: braze compile MODEL -o ARTIFACT --tensor-parallel-size "
                         f"{tp} (or leave tensor_parallel_size out)",
                         param="tensor_parallel_size")
    has_ep = bool((manifest.get("parallel") or {}).get("expert_parallel"))
    if ep is not None and ep != has_ep:
        raise BrazeError(f"enable_expert_parallel={ep}: artifact {root} was compiled "
                         f"{'with' if has_ep else 'without'} --expert-parallel; braze compiles "
                         f"it in: braze compile MODEL -o ARTIFACT --tensor-parallel-size N "
                         f"--expert-parallel (or leave enable_expert_parallel out)",
                         param="enable_expert_parallel")
    if pp not in (None, 1):
        raise BrazeError(f"pipeline_parallel_size={pp}: braze has no pipeline parallelism; "
                         f"compile with --tensor-parallel-size N", param="pipeline_parallel_size")


def launcher_world_size() -> int:
    """WORLD_SIZE where a launcher (torchrun) set its variables, else 1."""
    return int(os.environ["WORLD_SIZE"]) if all(v in os.environ for v in _TORCHRUN_VARS) else 1


def torchrun_follower() -> bool:
    """Whether this process is a rank > 0 started by torchrun (it serves nothing itself)."""
    return launcher_world_size() > 1 and os.environ["RANK"] != "0"


def current_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _backend(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def _free_port() -> int:
    # a port free now (the tests' torchrun runs take one); the ranks braze starts itself
    # let the system pick their rendezvous port (runtime/parallel_start.py)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_device_type(artifact, options) -> str:
    """Where the ranks run ("cuda": rank r on its own GPU, NCCL; "cpu": gloo): where the
    executor puts the tensors, from the backend and device it resolves (an `auto` backend
    without a launch plan, or `--device cpu`, runs on the CPU even on a GPU host)."""
    from .executor import resolve_backend, resolve_device
    backend = resolve_backend(options.backend, has_plan="plan" in artifact.manifest)
    device = resolve_device(options.device, backend)
    if device.type == "cuda" and device.index is not None:
        raise BrazeError(f"device {options.device!r}: a tensor-parallel artifact puts each "
                         f"rank on its own GPU (rank r on cuda:r, or LOCAL_RANK's under "
                         f"torchrun); give --device cuda, or leave it out (choose the GPUs "
                         f"with CUDA_VISIBLE_DEVICES)")
    return device.type


def init_group(device_type: str, **kw) -> None:
    """dist.init_process_group for this device type. One that fails leaves torch's count of
    group names raised (it names the group before the rendezvous), so the next group this
    process joins would be named "1" while fresh ranks look for "0" and wait out the
    timeout: put it back, as destroy_process_group does."""
    try:
        dist.init_process_group(_backend(device_type), **kw)
    except BaseException:
        if not dist.is_initialized():
            from torch.distributed import distributed_c10d
            distributed_c10d._world.group_count = 0
        raise


class Group:
    """This process's place in the tensor-parallel group (and the ranks it started)."""

    def __init__(self, rank: int, size: int, procs=(), torchrun: bool = False):
        self.rank, self.size, self.procs, self.torchrun = rank, size, list(procs), torchrun
        self.closed = False
        self.commands: list = []        # rank 0: KV offload commands not yet sent
        # rank 0: whether the other ranks have their runner settings (they wait for those
        # first, for step headers after), and whether a step or command is under way (a
        # failure inside one leaves them in a collective: close() then ends them instead)
        self.configured = self.busy = False
        self.broken: str | None = None  # rank 0: why a step or command failed part way
        self.owner = None               # rank 0: weakref to the LeaderGraphs running on it
        self.root = None                # the artifact it was started for
        self.store = None               # the ranks it started: their rendezvous store

    @contextlib.contextmanager
    def talking(self):
        """Rank 0: a step or command the other ranks follow to its end. An exception inside
        (a peer gone, the collective timeout, Ctrl-C) leaves `busy` set, so close() does not
        send them more, and the group broken: the others may still be inside that step, so
        no later one can be sent."""
        if self.broken is not None:
            raise BrazeError(f"an earlier step of this tensor-parallel group failed part way "
                             f"({self.broken}); its ranks cannot follow another: close it "
                             f"(LLM.close()) and open the artifact again")
        self.busy = True
        try:
            yield
        except BaseException as e:
            self.broken = f"{type(e).__name__}: {str(e)[:200]}"
            raise
        self.busy = False

    def send(self, *cmd) -> None:
        """Rank 0: queue a command (JSON-able) for the other ranks' KV offload."""
        self.commands.append(cmd)

    def take(self) -> torch.Tensor | None:
        """Rank 0: the queued commands as bytes to broadcast (None when there are none)."""
        if not self.commands:
            return None
        data = json.dumps(self.commands).encode()
        self.commands = []
        return upload(torch.frombuffer(bytearray(data), dtype=torch.uint8), self.device)

    def flush(self, kind: int = _CMDS) -> None:
        """Rank 0: send the queued commands now, between steps."""
        self.check_alive()
        payload = self.take()
        if payload is None:
            return
        try:
            with self.talking():
                dist.broadcast(_header(kind, 0, 0, 0, 0, self.device, payload.numel()), 0)
                dist.broadcast(payload, 0)
        except Exception as e:
            raise BrazeError(_failure(self, e)) from None

    def ask(self, cmd: tuple, reply_len: int) -> list[list[float]]:
        """Rank 0: send the queued commands and `cmd`, then every other rank's answer to
        `cmd` (`reply_len` numbers each), in rank order."""
        self.send(*cmd)
        self.flush(_ASK)
        mine = torch.zeros(reply_len, dtype=torch.float64, device=self.device)
        out = [torch.empty_like(mine) for _ in range(self.size)]
        try:
            with self.talking():
                dist.all_gather(out, mine)
        except Exception as e:
            raise BrazeError(_failure(self, e)) from None
        return [t.tolist() for t in out[1:]]

    def check_alive(self) -> None:
        if self.closed:
            raise BrazeError("this tensor-parallel group was closed (LLM.close(), or its engine "
                             "stopped); open the artifact again to generate")
        for r, p in enumerate(self.procs, start=1):
            if p.exitcode is not None:
                raise BrazeError(self.exited(r, p))

    def exited(self, r: int, p, doing: str = "") -> str:
        """Why rank `r` (process `p`, which exited) stopped the run, with the error it
        reported, if it could."""
        from .parallel_start import reported_error
        err = reported_error(self.store, r)
        return (f"tensor-parallel rank {r} (pid {p.pid}) exited with code {p.exitcode}"
                + (f" while {doing}" if doing else "") + (f": {err}" if err else "")
                + "; the run cannot continue without it")

    def close(self) -> None:
        """Tell the other ranks to stop, then leave the group (rank 0). Ranks it started
        that cannot be told (a step cut short, a rank gone) are terminated."""
        if self.closed:
            return
        self.closed = True
        told = False
        if dist.is_initialized() and not self.busy and all(p.exitcode is None
                                                            for p in self.procs):
            try:
                if self.configured:
                    dist.broadcast(_header(_STOP, 0, 0, 0, 0, self.device), 0)
                else:           # they still wait for their runner settings (follow)
                    dist.broadcast_object_list([None], 0)
                told = True
            except Exception:        # a rank already gone: nothing left to tell
                pass
        for p in self.procs:
            p.join(timeout=10 if told else 0)
            if p.exitcode is None:
                p.terminate()
                p.join(timeout=5)
            if p.exitcode is None:
                p.kill()
                p.join(timeout=5)
        if dist.is_initialized():
            dist.destroy_process_group()
        self.store = None           # its listening socket, not kept for the process's life
        atexit.unregister(self.close)

    device = torch.device("cpu")
    timeout_s = 0.0


_GROUP: Group | None = None


def ensure_group(artifact, options) -> Group | None:
    """For a tensor-parallel artifact: join (torchrun) or start (one host) its group, once
    per process. None for an artifact of one rank."""
    global _GROUP
    n = tensor_parallel_size(artifact.manifest)
    if n == 1:
        return None
    if _GROUP is not None and not _GROUP.closed:
        if _engine_of(_GROUP) is not None or _GROUP.torchrun:
            # its ranks follow that engine's steps: a second engine's would mix with them
            raise BrazeError(
                f"this process already runs tensor-parallel artifact {_GROUP.root} on its "
                f"{_GROUP.size} ranks, for an LLM or engine still open; close that one first "
                f"(LLM.close(), or open it with `with braze.LLM(...)`) before opening "
                f"{artifact.root}" + (" (under torchrun, one engine per run)"
                                      if _GROUP.torchrun else ""))
        shutdown()              # the engine it ran for is gone: start afresh
    timeout = datetime.timedelta(seconds=options.collective_timeout_s)
    device_type = group_device_type(artifact, options)
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        if world != n:
            raise BrazeError(f"the torch.distributed group has {world} ranks; artifact "
                             f"{artifact.root} was compiled for --tensor-parallel-size {n}")
        _GROUP = Group(rank, n, torchrun=True)
    elif all(v in os.environ for v in _TORCHRUN_VARS):
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        if world != n:
            raise BrazeError(f"WORLD_SIZE={world} but artifact {artifact.root} was compiled for "
                             f"--tensor-parallel-size {n}; start {n} processes (torchrun "
                             f"--nproc-per-node ... so that nodes x processes = {n})")
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        try:
            init_group(device_type, rank=rank, world_size=n, timeout=timeout)
        except Exception as e:      # the port taken on rank 0's host, or rank 0 not there
            raise BrazeError(f"RANK={rank} could not join the {n}-rank tensor-parallel group at "
                             f"MASTER_ADDR:MASTER_PORT {where} ({type(e).__name__}: "
                             f"{str(e)[:300]}); rank 0 listens there: choose a port free on "
                             f"its host, which every rank can reach") from None
        _GROUP = Group(rank, n, torchrun=True)
    else:
        from .parallel_start import start_local
        _GROUP = start_local(artifact, options, n, device_type, timeout)
    _GROUP.root = artifact.root
    _GROUP.device = torch.device(device_type)
    _GROUP.timeout_s = options.collective_timeout_s
    if _GROUP.rank == 0:
        atexit.register(_GROUP.close)
    log.info("tensor-parallel rank %d of %d (%s)", _GROUP.rank, n, _backend(device_type))
    return _GROUP


def health() -> tuple[dict | None, str | None]:
    """For rank 0's health endpoint: (the group's size and collective timeout, or None
    without a group; why it cannot serve, or None). A rank that exited shows here before
    the next step fails on it."""
    g = _GROUP
    if g is None or g.rank != 0 or g.closed:
        return None, None
    info = {"size": g.size, "collective_timeout_s": g.timeout_s}
    try:
        g.check_alive()
    except BrazeError as e:
        return info, str(e)
    return info, None


def current_group() -> Group | None:
    """The tensor-parallel group this process runs (None without one, or once closed)."""
    return _GROUP if _GROUP is not None and not _GROUP.closed else None


def shutdown(group: Group | None = None) -> None:
    """Rank 0: stop `group`, by default the group this process started or joined (a no-op
    without one, or for one already stopped)."""
    global _GROUP
    g = _GROUP if group is None else group
    if g is _GROUP:
        _GROUP = None
    if g is not None and g.rank == 0:
        g.close()


def _engine_of(g: Group):
    """The LeaderGraphs `g` runs for, or None once its engine is gone (or not built yet)."""
    if g.owner is None:
        return None
    if g.owner() is not None:
        import gc
        gc.collect()            # an LLM dropped without close() may sit in a cycle
    return g.owner()


def _header(cmd: int, n_tok: int, n_seq: int, decode_only: int, wide: int,
            device, n_bytes: int = 0) -> torch.Tensor:
    """A step's header: run, stop or KV offload commands alone, its tokens and sequences,
    decode-only, whether it runs its bucket's wide variant (prompt logprobs on a pruned LM
    head), and the bytes of KV offload commands that follow it (0: none)."""
    return upload_values([cmd, n_tok, n_seq, decode_only, wide, n_bytes], torch.int64, device)


def follow(artifact, options, store=None) -> None:
    """Ranks > 0: build the same runner as rank 0 and replay every step it broadcasts,
    until it says stop. A rank 0 that dies or hangs ends this with a BrazeError (at once,
    or at the collective timeout). `store`: the rendezvous store of a rank that rank 0
    started, told when this rank has loaded its weights."""
    try:
        _follow(artifact, options, store)
    except BrazeError:
        raise
    except Exception as e:          # gloo/NCCL: rank 0 gone, or the collective timeout
        raise BrazeError(f"tensor-parallel rank {dist.get_rank()} stops: {type(e).__name__}: "
                         f"{str(e)[:300]} (rank 0 exited, or hung past the "
                         f"{options.collective_timeout_s:g} s collective timeout)") from None
    dist.destroy_process_group()


def _follow(artifact, options, store) -> None:
    from .executor import Executor
    from .graph_runner import GraphRunner
    from .input_batch import static_buffers
    from .lora import Contract, add_slots_buffer, read_adapter, write_slot
    init = [None]
    dist.broadcast_object_list(init, 0)
    cfg = init[0]
    if cfg is None:             # rank 0's engine failed before it ran: stop
        return
    ex = Executor(artifact, backend=cfg["backend"], device=options.device, num_blocks=1)
    # as many logits rows as rank 0 (k + 1 per sequence when it speculates), so the LM
    # head's all_gather meets tensors of the same shape on every rank
    static = static_buffers(cfg["max_num_tokens"], cfg["max_num_seqs"], ex.max_blocks, ex.device,
                            cfg["max_logits_rows"])
    add_slots_buffer(static, ex)
    contract = Contract.from_manifest(artifact.manifest, rank=dist.get_rank())
    # each cache tensor's blocks as rank 0 has them (a hybrid cache's window pools differ)
    ex.cache.resize(cfg["num_kv_blocks"], cfg.get("cache_blocks"), cfg.get("cache_shared"))
    if store is not None:       # rank 0 waits for this before the collectives of capture
        from .parallel_start import mark
        mark(store, "ready", dist.get_rank())
    graphs = GraphRunner(ex, static, cfg["buckets"], cfg["max_num_seqs"], mode=cfg["mode"],
                         debug=cfg["debug"], wide_rows=cfg["wide_rows"])
    graphs.capture()
    head = _header(0, 0, 0, 0, 0, ex.device)
    mtp = None
    offload = None          # this rank's KV offload tiers, once rank 0 opens its own
    while True:
        dist.broadcast(head, 0)
        cmd, n_tok, n_seq, decode_only, wide, n_bytes = (int(x) for x in head.tolist())
        if cmd == _STOP:
            break
        if n_bytes:
            offload = _offload_commands(offload, ex, n_bytes, cmd == _ASK)
        if cmd == _MTP:         # n_tok: the blocks of rank 0's MTP cache (0: the target's)
            if mtp is None or mtp.blocks != n_tok:
                mtp = _FollowerMTP(artifact, ex, n_tok)
            mtp.call()
        elif cmd == _LORA:      # n_tok: the slot; the adapter's name and directory follow
            got = [None]
            dist.broadcast_object_list(got, 0)
            name, path = got[0]
            try:
                host = read_adapter(name, path, contract)
            except BrazeError as e:
                raise BrazeError(f"tensor-parallel rank {contract.rank}: {e} (rank 0 read it; "
                                 f"every rank reads each adapter itself, so its directory must "
                                 f"be at the same path on every host)") from None
            write_slot(ex.lora_pools, contract, n_tok, host)
        elif cmd == _RUN:
            _exchange(graphs, static, n_tok, n_seq, bool(wide))
            graphs.run(n_tok, n_seq, bool(decode_only), wide=bool(wide))
        if offload is not None:
            offload.poll()
    if offload is not None:
        offload.close()


def _offload_commands(offload, ex, n_bytes: int, answer: bool):
    """Ranks > 0: perform rank 0's KV offload commands on this rank's KV slices, and
    answer the last one when rank 0 asks."""
    from .kv_offload import run_commands
    buf = torch.empty(n_bytes, dtype=torch.uint8, device=ex.device)
    dist.broadcast(buf, 0)
    cmds = json.loads(bytes(buf.cpu().numpy()).decode())
    offload, reply = run_commands(offload, cmds, ex.cache, ex.device, dist.get_rank(),
                                  dist.get_world_size())
    if answer:
        mine = upload_values(reply, torch.float64, ex.device)
        dist.all_gather([torch.empty_like(mine) for _ in range(dist.get_world_size())], mine)
    return offload


def _exchange(graphs, static, n_tok: int, n_seq: int, wide: bool = False) -> None:
    """Broadcast the step's padded inputs from rank 0: its bucket's rows of each buffer,
    and all R_pad logits rows (from `wide_indices` in a wide step), not one per sequence."""
    from .graph_runner import group_inputs
    from .lora import SLOTS_INPUT
    T, S = graphs.bucket_for(n_tok, n_seq)
    # and a hybrid cache's KV cache groups' slot mappings and tables (runtime/hybrid_cache.py),
    # and a LoRA artifact's per-token adapter slots
    lora = (SLOTS_INPUT,) if SLOTS_INPUT in static else ()
    for name in _STEP_BUFFERS + tuple(group_inputs(static)) + lora:
        if name == "logits_indices":
            src = graphs.wide_indices if wide else static[name]
            dist.broadcast(src[:graphs.rows_for(T, wide)], 0)
            continue
        rows = T if name.startswith(("input_ids", "positions", "slot_mapping", SLOTS_INPUT)) else \
            S + 1 if name == "query_start_loc" else S
        dist.broadcast(static[name][:rows], 0)


def _mtp_inputs(graph, caches: dict) -> list:
    """The MTP graph's inputs rank 0 sends for each call: all but the caches, which every
    rank keeps for itself."""
    return [v for v in graph.inputs if v.name not in caches]


def _exchange_feeds(inputs, feeds: dict | None, device) -> dict:
    """Broadcast one MTP call's inputs from rank 0 (`feeds`; None on the other ranks):
    first their shapes, in one tensor, then each input. -> the inputs on this rank."""
    from braze.ir.types import torch_dtype
    dims = torch.zeros(sum(v.type.rank for v in inputs), dtype=torch.int64, device=device)
    if feeds is not None:
        dims.copy_(torch.tensor([d for v in inputs for d in feeds[v.name].shape],
                                dtype=torch.int64))
    dist.broadcast(dims, 0)
    shape, at, out = dims.tolist(), 0, {}
    for v in inputs:
        sh, at = shape[at:at + v.type.rank], at + v.type.rank
        dtype = torch_dtype(v.type.dtype)
        t = feeds[v.name].to(dtype).contiguous() if feeds is not None else \
            torch.empty(sh, dtype=dtype, device=device)
        dist.broadcast(t, 0)
        out[v.name] = t
    return out


class _FollowerMTP:
    """Ranks > 0: the artifact's MTP graph on this rank's shards, built at rank 0's first
    MTP call, with the caches it reads: DeepSeek's next-n layer its own, of as many blocks
    as rank 0's (`blocks`); Gemma 4's assistant this rank's part of the target's cache."""

    def __init__(self, artifact, ex, blocks: int):
        from .kv_cache import KVCache
        from .mtp_proposer import load_mtp, mtp_runner
        graph, params, _ = load_mtp(artifact, ex.params, ex.device)
        self.run, _ = mtp_runner(artifact, ex, graph, params)
        if blocks:
            self.caches = KVCache(graph, blocks, ex.device).tensors
        else:
            self.caches = {v.name: ex.cache.tensors[v.name] for v in graph.inputs
                           if v.name in ex.cache.tensors}
        self.inputs = _mtp_inputs(graph, self.caches)
        self.blocks, self.device = blocks, ex.device

    def call(self) -> None:
        feeds = _exchange_feeds(self.inputs, None, self.device)
        feeds.update(self.caches)
        self.run(feeds)


def distribute_mtp(run, graph, caches: dict, blocks: int = 0):
    """Rank 0 of a tensor-parallel group: wrap an MTP proposer's graph call `run(feeds)`
    so that each call first hands its inputs to the other ranks, which run the same call
    (its all_reduce and all_gather meet theirs). `caches`: the cache inputs every rank
    keeps for itself, an MTP cache of `blocks` blocks (0: the target's own cache, which
    Gemma 4's assistant reads). `run` itself without a group."""
    g = current_group()
    if g is None:
        return run
    inputs = _mtp_inputs(graph, caches)

    def call(feeds: dict) -> dict:
        g.check_alive()
        try:
            with g.talking():
                dev = feeds["input_ids"].device
                dist.broadcast(_header(_MTP, blocks, 0, 0, 0, dev), 0)
                _exchange_feeds(inputs, feeds, dev)
                return run(feeds)
        except BrazeError as e:
            err = _step_error(g, e)
            if err is e:
                raise
            raise err from None
        except Exception as e:          # gloo/NCCL: a peer gone, or the collective timeout
            raise BrazeError(_failure(g, e)) from None
    return call


class LeaderGraphs:
    """Rank 0's GraphRunner: each run first hands the step to the other ranks."""

    def __init__(self, inner, group: Group, num_kv_blocks: int):
        self.inner, self.group = inner, group
        self.static = inner.static
        try:
            with group.talking():
                self._configure(inner, group, num_kv_blocks)
        except BrazeError:
            raise
        except Exception as e:          # gloo/NCCL: a peer gone, or the collective timeout
            raise BrazeError(_failure(group, e)) from None
        group.owner = weakref.ref(self)

    @staticmethod
    def _configure(inner, group: Group, num_kv_blocks: int) -> None:
        """Send the other ranks this runner's settings, then wait (watching the ranks it
        started) until each has loaded its weights: a rank that fails there ends this with
        its error, before the collectives of capture would wait on it."""
        from .parallel_start import await_ranks
        # the ranks it started open the artifact first (seconds, more than a short
        # collective timeout allows a collective to wait)
        await_ranks(group, "opened", "opening the artifact")
        group.configured = True
        dist.broadcast_object_list([{
            "backend": inner.executor.backend, "max_num_tokens": inner.max_num_tokens,
            "max_num_seqs": inner.max_num_seqs, "num_kv_blocks": num_kv_blocks,
            "max_logits_rows": inner.max_logits_rows, "wide_rows": inner.wide_rows,
            "cache_blocks": {n: int(t.shape[0]) for n, t in inner.executor.cache.tensors.items()},
            "cache_shared": inner.executor.cache.shared,
            "buckets": list(inner.buckets), "mode": inner.mode, "debug": inner.debug}], 0)
        await_ranks(group, "ready", "loading its weights")

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run(self, num_tokens: int, num_seqs: int, decode_only: bool, wide: bool = False):
        g = self.group
        g.check_alive()
        try:
            with g.talking():
                cmds = g.take()         # KV offload commands queued since the last step
                dist.broadcast(_header(_RUN, num_tokens, num_seqs, int(decode_only),
                                       int(wide), self.static["input_ids"].device,
                                       0 if cmds is None else cmds.numel()), 0)
                if cmds is not None:
                    dist.broadcast(cmds, 0)
                _exchange(self.inner, self.static, num_tokens, num_seqs, wide)
                return self.inner.run(num_tokens, num_seqs, decode_only, wide=wide)
        except BrazeError as e:
            err = _step_error(g, e)
            if err is e:
                raise
            raise err from None
        except Exception as e:          # gloo/NCCL: a peer gone, or the collective timeout
            raise BrazeError(_failure(g, e)) from None

    def write_lora(self, slot: int, req) -> None:
        """The LoRAManager is writing adapter `req` (a LoRARequest) into `slot`: every other
        rank reads it from the same directory and writes its own share there too."""
        g = self.group
        g.check_alive()
        try:
            with g.talking():
                dist.broadcast(_header(_LORA, slot, 0, 0, 0, self.static["input_ids"].device),
                               0)
                dist.broadcast_object_list([(req.lora_name, os.path.abspath(req.lora_path))],
                                           0)
        except Exception as e:
            raise BrazeError(_failure(g, e)) from None


def _exited(g: Group) -> str | None:
    """Why the run cannot go on where a rank it started exited (None: none did)."""
    import time
    end = time.monotonic() + 5      # a peer that closed its connection is likely exiting:
    for p in g.procs:               # give it a moment, so the message names it
        p.join(timeout=max(0.0, end - time.monotonic()))
    try:
        g.check_alive()
    except BrazeError as dead:
        return str(dead)
    return None


def _failure(g: Group, e: Exception) -> str:
    return _exited(g) or (f"a tensor-parallel collective failed ({type(e).__name__}: "
                          f"{str(e)[:300]}); a rank died or hung past the collective timeout")


def _step_error(g: Group, e: BrazeError) -> BrazeError:
    """A BrazeError from inside a step: the interpreter's or launch plan's node error
    chained from a RuntimeError (gloo's or NCCL's, a collective meeting a rank that is
    gone) names the rank that exited instead; any other is itself."""
    if isinstance(e.__cause__, RuntimeError):
        dead = _exited(g)
        if dead is not None:
            return BrazeError(dead)
    return e


def distribute(graphs, artifact, options, num_kv_blocks: int):
    """Rank 0: wrap the model runner's GraphRunner so every step reaches the other ranks.
    Ranks > 0 under torchrun: follow rank 0 until it stops, then leave the process."""
    g = _GROUP
    if g is None or tensor_parallel_size(artifact.manifest) == 1:
        return graphs
    if g.rank != 0:
        raise BrazeError("only rank 0 runs the engine")
    return LeaderGraphs(graphs, g, num_kv_blocks)
