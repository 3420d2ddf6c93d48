"""Starting the ranks of a tensor-parallel artifact on one host (runtime/parallel.py).

Rank 0 (the engine's process) opens the rendezvous store itself, on a port the system
picks, and starts ranks 1..N-1 with torch.multiprocessing (spawn). Each rank marks the
store as it gets further: `joined` (connected, about to join the process group),
`opened` (the artifact opened and checked: it waits for rank 0's runner settings), `ready`
(weights loaded, KV cache sized; rank 0 waits for it before the collectives of capture),
and `failed` (its error, when it cannot go on). Rank 0 waits for each stage polling the
store and watching the processes, so a rank that dies on the way (an exception at start,
a script without a `__main__` guard, out of memory while loading) ends the start at once
with its exit code and error, not after the collective timeout with a rendezvous error.

The ranks ignore SIGINT: Ctrl-C reaches rank 0, which stops them (runtime/parallel.py
Group.close), so one Ctrl-C prints one "interrupted", not a traceback from every rank.
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

from braze.ir.errors import BrazeError

_SPAWN_HINT = ("its error is above; a script that opens a tensor-parallel artifact must do "
               "so under `if __name__ == \"__main__\":`, since the ranks start with "
               "multiprocessing's spawn and import the script again")


def mark(store, stage: str, rank: int, value: str = "") -> None:
    store.set(f"braze/{stage}/{rank}", value)


def reported_error(store, rank: int) -> str | None:
    """The error rank `rank` reported before it exited (None: it reported none)."""
    key = f"braze/failed/{rank}"
    try:
        if store is None or not store.check([key]):
            return None
        return store.get(key).decode(errors="replace")
    except Exception:           # the store is gone with the group: nothing to add
        return None


# how long rank 0 waits for a live rank to start or load its weights (a large model's
# shards from a slow disk take minutes); a rank that exits ends the wait at once, and a
# collective timeout set short to catch hung steps does not cut a long load short
START_TIMEOUT_S = 1800.0


def await_ranks(group, stage: str, doing: str) -> None:
    """Rank 0 of the ranks it started: wait until every other rank has reached `stage`
    (a no-op under torchrun, whose launcher watches its processes). A rank that exits
    first ends this with its exit code and error; so does START_TIMEOUT_S, or the
    collective timeout where that is longer."""
    if group.store is None:
        return
    keys = [f"braze/{stage}/{r}" for r in range(1, group.size)]
    limit = max(group.timeout_s, START_TIMEOUT_S)
    deadline = time.monotonic() + limit
    while not group.store.check(keys):
        for r, p in enumerate(group.procs, start=1):
            if p.exitcode is not None:
                msg = group.exited(r, p, doing)
                if p.exitcode == 1 and stage == "joined" and reported_error(group.store, r) \
                        is None:
                    msg += f" ({_SPAWN_HINT})"
                raise BrazeError(msg)
        if time.monotonic() > deadline:
            waiting = [r for r in range(1, group.size)
                       if not group.store.check([f"braze/{stage}/{r}"])]
            raise BrazeError(f"tensor-parallel rank(s) {waiting} did not finish {doing} within "
                             f"{limit:g} s")
        time.sleep(0.02)


def start_local(artifact, options, n: int, device_type: str, timeout: datetime.timedelta):
    """Rank 0: start ranks 1..n-1 on this host and form the group with them."""
    import torch.multiprocessing as mp
    from dataclasses import asdict

    from .parallel import Group, init_group
    if device_type == "cuda" and torch.cuda.device_count() < n:
        raise BrazeError(f"artifact {artifact.root} needs {n} GPUs (--tensor-parallel-size {n}); "
                         f"{torch.cuda.device_count()} are visible")
    addr = "127.0.0.1"
    try:        # port 0: the system picks a free one, so no other process can take it first
        store = dist.TCPStore(addr, 0, n, is_master=True, timeout=timeout,
                              wait_for_workers=False)
    except Exception as e:
        raise BrazeError(f"could not open the rendezvous port of the {n}-rank tensor-parallel "
                         f"group on {addr}: {e}") from None
    ctx = mp.get_context("spawn")
    group = Group(0, n)
    group.store, group.timeout_s = store, options.collective_timeout_s
    procs = group.procs
    try:
        with _sigint_ignored():         # inherited across exec: the ranks never see Ctrl-C
            for r in range(1, n):
                p = ctx.Process(target=worker_entry, daemon=True, name=f"braze-tp-rank{r}",
                                args=(r, n, addr, store.port, str(artifact.root),
                                      asdict(options), device_type))
                p.start()
                procs.append(p)
        if device_type == "cuda":
            torch.cuda.set_device(0)
        await_ranks(group, "joined", "starting")
        init_group(device_type, store=store, rank=0, world_size=n, timeout=timeout)
    except BaseException as e:
        for p in procs:
            p.kill()
            p.join(timeout=5)
        if isinstance(e, Exception) and not isinstance(e, BrazeError):
            raise BrazeError(f"could not start the {n}-rank tensor-parallel group: "
                             f"{e}") from None
        raise
    return group


class _sigint_ignored:
    """SIGINT ignored while the ranks start (from the main thread only; elsewhere as is)."""

    def __enter__(self):
        self.old = None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGINT, signal.SIG_IGN)

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)


def worker_entry(rank, n, addr, port, root, options, device_type) -> None:
    """A rank started by rank 0 on this host: join, load, follow rank 0's steps. An error
    is reported to rank 0 (which names it) and printed as one line, exit status 1."""
    from . import parallel
    from .options import EngineOptions
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    opts = EngineOptions(**options)
    timeout = datetime.timedelta(seconds=opts.collective_timeout_s)
    store = None
    try:
        store = dist.TCPStore(addr, port, n, is_master=False, timeout=timeout)
        mark(store, "joined", rank)
        if device_type == "cuda":
            torch.cuda.set_device(rank)
        parallel.init_group(device_type, store=store, rank=rank, world_size=n,
                            timeout=timeout)
        parallel._GROUP = g = parallel.Group(rank, n)
        g.device = torch.device(device_type)
        from .loader import open_artifact
        art = open_artifact(root, check_hashes=False, trusted_keys=opts.trusted_keys,
                            trust_artifact=opts.trust_artifact)
        mark(store, "opened", rank)
        parallel.follow(art, opts, store)
        sys.stdout.flush()
        sys.stderr.flush()
        # told to stop, group left: skip the interpreter's teardown, whose C++ destructors
        # (torch.distributed's threads) sometimes abort a rank that did nothing wrong
        # ('terminate called without an active exception')
        os._exit(0)
    except Exception as e:
        msg = str(e) if isinstance(e, BrazeError) else f"{type(e).__name__}: {e}"
        try:
            if store is not None:
                mark(store, "failed", rank, msg[:2000])
        except Exception:       # rank 0 is gone with its store
            pass
        if os.environ.get("BRAZE_DEBUG"):
            raise
        if not msg.startswith(f"tensor-parallel rank {rank}"):
            msg = f"tensor-parallel rank {rank}: {msg}"
        print(f"braze: error: {msg}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)             # no teardown: it aborts a rank whose peer went away
