"""KV blocks below the device (runtime/kv_offload.py, runtime/kv_stores.py): a tiny device
cache, a host tier and a disk or S3 tier (moto's server on 127.0.0.1).

Prompts that share a prefix are interleaved with enough other traffic to push the prefix out
of the device cache, then out of host memory. The outputs must equal an engine that keeps
everything on the device, and the loads must come from the tier the traffic left them in.
Faults (a corrupt block, a tier that errors, a full disk) are counted and never change an
output.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from braze.ir.errors import BrazeError
from braze.runtime import kv_offload, kv_stores
from braze.runtime.block_manager import BlockManager
from braze.runtime.engine import Engine
from braze.runtime.kv_offload import GIB, KVTransferPolicy
from braze.runtime.kv_stores import HostStore, StoreError, seal, unseal
from braze.runtime.sampler import SamplingParams

from conftest import prompts_of, run_all

GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)
SHARED = prompts_of([70], seed=3)[0]                 # 4 full blocks of 16 to load
FIRST, SECOND = (SHARED + t for t in prompts_of([5, 9], seed=4))
FILLERS = prompts_of([60, 61, 62, 63, 64, 65], seed=5)     # traffic that evicts the prefix
DEVICE_BLOCKS = 12


def _block_bytes(art) -> int:
    return Engine(art, backend="reference", num_kv_blocks=DEVICE_BLOCKS).runner.executor \
        .cache.bytes_per_block


def _host_gb(art, blocks: int) -> float:
    return blocks * _block_bytes(art) / GIB


@pytest.fixture(scope="module")
def art(store):
    return store.artifact("llama")


@pytest.fixture(scope="module")
def want(art):
    """The outputs with everything on the device (a cache large enough for all of it)."""
    eng = Engine(art, backend="reference", num_kv_blocks=256)
    return [o.token_ids for o in _traffic(eng)]


def _traffic(eng, second_params=None, meanwhile=None):
    """FIRST, the fillers, then SECOND; the outputs. `eng.before_second` keeps the offload
    stats from before SECOND, so a test can tell SECOND's loads from the fillers' (a
    preempted filler's computed blocks come back from the host tier too). `meanwhile()`
    runs before SECOND, once the lower tier has every block."""
    out = run_all(eng, [FIRST], GREEDY)
    out += run_all(eng, FILLERS, GREEDY)
    if eng.offload is not None:
        eng.offload.drain()
        if meanwhile is not None:
            meanwhile()
        eng.before_second = _offload_stats(eng)
    if second_params is None:
        out += run_all(eng, [SECOND], GREEDY)
    else:
        eng.add_request("second", SECOND, GREEDY, kv_transfer_params=second_params)
        out.append(eng.run_to_completion(["second"])["second"])
    if eng.offload is not None:
        eng.offload.drain()
    return out


def _offload_stats(eng) -> dict:
    return {k[len("kv_offload_"):]: v for k, v in eng.stats().items()
            if k.startswith("kv_offload_")}


def _second_loads(eng) -> tuple[int, int]:
    """(blocks from host, blocks from the lower tier) that SECOND loaded."""
    now, before = _offload_stats(eng), eng.before_second
    return (now["load_blocks_host"] - before["load_blocks_host"],
            now["load_blocks_lower"] - before["load_blocks_lower"])


def test_a_prefix_evicted_from_the_device_comes_back_from_host_memory(art, want):
    eng = Engine(art, backend="reference", num_kv_blocks=DEVICE_BLOCKS,
                 kv_offload_cpu_gb=_host_gb(art, 64))
    got = _traffic(eng)
    assert [o.token_ids for o in got] == want
    s = _offload_stats(eng)
    assert _second_loads(eng) == (4, 0)
    assert s["store_blocks"] >= 4 + len(FILLERS) * 3 and s["load_failures"] == 0
    # all 4 loadable blocks came from host: the device cache had lost the whole prefix
    assert got[-1].metrics["num_cached_tokens"] == 4 * 16


def test_loads_copy_from_the_host_tiers_own_buffers(art, want):
    """A load stacks its blocks into memory from HostStore.new_buffer (pinned on a GPU host)
    before the non-blocking copy to the device: torch.stack alone makes pageable memory,
    from which a non-blocking copy is silently synchronous (seen only on a GPU)."""
    eng = Engine(art, backend="reference", num_kv_blocks=DEVICE_BLOCKS,
                 kv_offload_cpu_gb=_host_gb(art, 64))
    made, new_buffer = [], eng.offload.host.new_buffer
    eng.offload.host.new_buffer = lambda n: made.append(new_buffer(n)) or made[-1]
    assert [o.token_ids for o in _traffic(eng)] == want
    loaded = _offload_stats(eng)["load_blocks_host"]
    assert loaded and sum(b.shape[0] for b in made) == loaded
    assert all(any(torch.equal(row, blk) for blk in eng.offload.host._blocks.values())
               for b in made for row in b[-1:])


def test_evicted_from_host_too_it_comes_back_from_disk(art, want, tmp_path):
    eng = Engine(art, backend="reference", num_kv_blocks=DEVICE_BLOCKS,
                 kv_offload_cpu_gb=_host_gb(art, 8), kv_offload_dir=str(tmp_path / "kv"))
    got = _traffic(eng)
    assert [o.token_ids for o in got] == want
    s = _offload_stats(eng)
    assert _second_loads(eng) == (0, 4)
    assert s["store_bytes_lower"] >= s["store_blocks"] * _block_bytes(art)
    assert len(list((tmp_path / "kv").rglob("*.kv"))) == s["store_blocks"]


def test_a_second_engine_loads_what_the_first_stored_on_disk(art, want, tmp_path):
    kv = str(tmp_path / "kv")
    first = Engine(art, backend="reference", num_kv_blocks=DEVICE_BLOCKS, kv_offload_dir=kv)
    run_all(first, [FIRST], GREEDY)
    first.offload.drain()
    fresh = Engine(art, backend="reference", num_kv_blocks=DEVICE_BLOCKS, kv_offload_dir=kv)
    assert run_all(fresh, [SECOND], GREEDY)[0].token_ids == want[-1]
    assert _offload_stats(fresh)["load_blocks_lower"] == 4


def test_two_artifacts_sharing_a_directory_never_share_blocks(art, store, tmp_path):
    """The same weights and cache layout with another RoPE: equal token prefixes, other
    KV. The second artifact finds none of the first's blocks and its output is its own."""
    kv = str(tmp_path / "kv")
    first = Engine(art, backend="reference", num_kv_blocks=DEVICE_BLOCKS,
                   kv_offload_cpu_gb=_host_gb(art, 8), kv_offload_dir=kv)
    _traffic(first)
    first.offload.close()
    other = store.artifact("llama-linearrope")
    own = [o.token_ids for o in run_all(Engine(other, backend="reference", num_kv_blocks=256),
                                        [SECOND], GREEDY)]
    eng = Engine(other, backend="reference", num_kv_blocks=DEVICE_BLOCKS,
                 kv_offload_cpu_gb=_host_gb(other, 8), kv_offload_dir=kv)
    assert eng.offload.block_bytes == first.offload.block_bytes
    assert [o.token_ids for o in run_all(eng, [SECOND], GREEDY)] == own
    s = _offload_stats(eng)
    assert s["load_blocks_lower"] == s["load_failures"] == 0


def test_the_request_policy_caps_and_disables_loads_and_stores(art, want, tmp_path):
    host = _host_gb(art, 64)
    eng = Engine(art, backend="reference", num_kv_blocks=DEVICE_BLOCKS, kv_offload_cpu_gb=host)
    assert _traffic(eng, {"max_load_tokens": 0})[-1].token_ids == want[-1]
    assert _second_loads(eng) == (0, 0)
    eng = Engine(art, backend="reference", num_kv_blocks=DEVICE_BLOCKS, kv_offload_cpu_gb=host)
    assert _traffic(eng, {"max_load_tokens": 40})[-1].token_ids == want[-1]
    assert _second_loads(eng) == (2, 0)                          # 40 tokens: 2 whole blocks
    eng = Engine(art, backend="reference", num_kv_blocks=DEVICE_BLOCKS, kv_offload_cpu_gb=host)
    eng.add_request("private", FIRST, GREEDY, kv_transfer_params={"store": False})
    eng.run_to_completion(["private"])
    assert _offload_stats(eng)["store_blocks"] == 0


def test_llm_generate_takes_kv_transfer_params(art, want, tmp_path):
    """braze.LLM passes the per-request policy as the server does: one for every prompt or
    one per prompt; a bad one is refused by name before any prompt runs."""
    from braze.runtime import LLM
    llm = LLM(art, backend="reference", num_kv_blocks=DEVICE_BLOCKS,
              kv_offload_cpu_gb=_host_gb(art, 64))
    eng = llm.engine
    llm.generate([FIRST], GREEDY)
    llm.generate(FILLERS, GREEDY)
    eng.offload.drain()
    before = _offload_stats(eng)
    with pytest.raises(BrazeError, match="kv_transfer_params.max_load_tokens"):
        llm.generate([SECOND], GREEDY, kv_transfer_params={"max_load_tokens": -1})
    with pytest.raises(BrazeError, match="2 kv_transfer_params for 1 prompts"):
        llm.generate([SECOND], GREEDY, kv_transfer_params=[{}, {}])
    out = llm.generate([SECOND], GREEDY, kv_transfer_params={"max_load_tokens": 0})
    assert out[0].outputs[0].token_ids == want[-1]
    assert _offload_stats(eng)["load_blocks_host"] == before["load_blocks_host"]
    assert not eng.requests
    private = LLM(art, backend="reference", num_kv_blocks=DEVICE_BLOCKS,
                  kv_offload_cpu_gb=_host_gb(art, 64))
    private.generate([FIRST], GREEDY, kv_transfer_params=[{"store": False}])
    private.engine.offload.drain()
    assert _offload_stats(private.engine)["store_blocks"] == 0
    private.generate(FILLERS[:1], GREEDY, kv_transfer_params=[None])
    private.engine.offload.drain()
    assert _offload_stats(private.engine)["store_blocks"] >= len(FILLERS[0]) // 16


@pytest.mark.parametrize("params,fragment", [
    ({"max_load_tokens": -1}, "max_load_tokens must be an integer >= 0"),
    ({"store": "no"}, "store must be true or false"),
    ({"do_remote_prefill": True}, "no field 'do_remote_prefill'"),
    ([1], "must be an object"),
])
def test_bad_transfer_params_are_refused_by_name(params, fragment):
    with pytest.raises(BrazeError, match=fragment):
        KVTransferPolicy.of(params)


# -- faults -------------------------------------------------------------------------------

def test_metrics_show_every_tiers_counters_as_the_engine_counts_them(art, want, tmp_path):
    """/metrics renders each tier's counters from the engine's own: blocks and bytes per
    tier and direction, and the host tier's evictions (what says --kv-offload-cpu-gb is
    too small); a later scrape never shows less."""
    pytest.importorskip("prometheus_client")
    from braze.serving.metrics import Metrics
    from serve_helpers import parse_metrics
    eng = Engine(art, backend="reference", num_kv_blocks=DEVICE_BLOCKS,
                 kv_offload_cpu_gb=_host_gb(art, 4), kv_offload_dir=str(tmp_path / "kv"))
    metrics = Metrics("m")
    scrapes = []
    _traffic(eng, meanwhile=lambda: scrapes.append(parse_metrics(metrics.render(eng.stats()))))
    s = _offload_stats(eng)
    m = parse_metrics(metrics.render(eng.stats()))
    assert s["host_evictions"] > 0
    want_rows = {
        "braze_kv_offload_host_evictions_total": s["host_evictions"],
        'braze_kv_offload_loaded_blocks_total{tier="host"}': s["load_blocks_host"],
        'braze_kv_offload_loaded_blocks_total{tier="disk"}': s["load_blocks_lower"],
        'braze_kv_offload_bytes_total{direction="store",tier="disk"}': s["store_bytes_lower"],
        'braze_kv_offload_bytes_total{direction="load",tier="disk"}': s["load_bytes_lower"],
        'braze_kv_offload_failures_total{direction="store"}': s["store_failures"],
        "braze_kv_offload_host_capacity_blocks": 4}
    assert {k: m[k] for k in want_rows} == want_rows
    assert all(m[k] >= v for k, v in scrapes[0].items() if k.endswith("_total"))


def test_a_corrupt_disk_block_is_a_counted_miss_and_is_computed(art, want, tmp_path):
    kv = tmp_path / "kv"
    first = Engine(art, backend="reference", num_kv_blocks=DEVICE_BLOCKS,
                   kv_offload_dir=str(kv))
    run_all(first, [FIRST], GREEDY)
    first.offload.drain()
    keys = first.offload.keys(_probe(FIRST), 4)
    victim = kv / keys[2][:2] / f"{keys[2]}.kv"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    fresh = Engine(art, backend="reference", num_kv_blocks=DEVICE_BLOCKS,
                   kv_offload_dir=str(kv))
    assert run_all(fresh, [SECOND], GREEDY)[0].token_ids == want[-1]
    s = _offload_stats(fresh)
    assert s["load_failures"] == 1 and s["load_blocks_lower"] == 2     # up to the bad one
    # the corrupt file is not kept (a restart finds it, and the cap counts it): the block,
    # computed again, is written again
    fresh.offload.drain()
    assert unseal(victim.read_bytes(), keys[2], "here") == \
        first.offload.host.get(keys[2]).numpy().tobytes()


def _probe(tokens):
    """A stand-in request with the fields KVOffload.keys reads."""
    class R:
        request_id = "probe"
        all_token_ids = tokens
        cache_salt = None
    return R


def test_a_full_disk_is_counted_and_changes_no_output(art, want, tmp_path, monkeypatch):
    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    eng = Engine(art, backend="reference", num_kv_blocks=DEVICE_BLOCKS,
                 kv_offload_cpu_gb=_host_gb(art, 8), kv_offload_dir=str(tmp_path / "kv"))
    # from here on every block file the disk tier opens for writing fails as on a full disk
    # (after the engine opened the artifact, which reads through os.fdopen too)
    monkeypatch.setattr(kv_stores.os, "fdopen", no_space)
    assert [o.token_ids for o in _traffic(eng)] == want
    s = _offload_stats(eng)
    assert s["store_failures"] == s["store_blocks"] > 0 and s["store_bytes_lower"] == 0
    assert not [f for f in (tmp_path / "kv").rglob("*") if f.is_file()]   # no block, no temp


def _file_bytes(art) -> int:
    """A block file's size: the block, sealed."""
    return len(seal(bytes(_block_bytes(art))))


def _disk_bytes(kv: Path) -> int:
    return sum(f.stat().st_size for f in kv.rglob("*") if f.is_file())


def test_the_disk_tier_keeps_to_its_cap_least_recently_used_first(art, want, tmp_path,
                                                                 monkeypatch):
    """A long-running server filled the disk: --kv-offload-dir had no cap. With one, the
    least recently used block files are deleted for room (counted, and in /metrics), the
    files never exceed it, and the outputs are those of an engine that keeps it all."""
    pytest.importorskip("prometheus_client")
    from braze.serving.metrics import Metrics
    from serve_helpers import parse_metrics
    kv = tmp_path / "kv"
    cap_files = 5
    sizes, written = [], []
    real_put = kv_stores.DirectoryStore.put
    monkeypatch.setattr(kv_stores.DirectoryStore, "put",
                        lambda self, k, p: (real_put(self, k, p), written.append(k),
                                            sizes.append(_disk_bytes(kv))))
    eng = Engine(art, backend="reference", num_kv_blocks=DEVICE_BLOCKS,
                 kv_offload_cpu_gb=_host_gb(art, 64), kv_offload_dir=str(kv),
                 kv_offload_dir_gb=cap_files * _file_bytes(art) / GIB)
    assert [o.token_ids for o in _traffic(eng)] == want
    s = _offload_stats(eng)
    files = list(kv.rglob("*.kv"))
    assert len(files) == cap_files and max(sizes) <= cap_files * _file_bytes(art)
    assert s["lower_evictions"] == s["store_blocks"] - cap_files > 0
    assert s["lower_bytes"] == _disk_bytes(kv) and s["store_failures"] == 0
    m = parse_metrics(Metrics("m").render(eng.stats()))
    assert m['braze_kv_offload_lower_evictions_total{tier="disk"}'] == s["lower_evictions"]
    assert m['braze_kv_offload_lower_bytes{tier="disk"}'] == s["lower_bytes"]
    # the last written are the ones kept
    assert {f.name[:-3] for f in files} == set(list(dict.fromkeys(reversed(written)))[:5])


def test_a_restart_reuses_the_disk_tiers_blocks_within_its_cap(art, want, tmp_path):
    """The block files an earlier run left are loaded by the next, and count against its
    cap: one smaller than them deletes the least recently used at start."""
    kv = tmp_path / "kv"
    first = Engine(art, backend="reference", num_kv_blocks=DEVICE_BLOCKS,
                   kv_offload_cpu_gb=_host_gb(art, 64), kv_offload_dir=str(kv))
    run_all(first, [FIRST, *FILLERS], GREEDY)
    first.offload.close()
    shared = {f"{k}.kv" for k in first.offload.keys(_probe(FIRST), 4)}
    files = sorted(kv.rglob("*.kv"))
    assert len(files) > 6 and shared <= {f.name for f in files}
    for age, f in enumerate(files):         # FIRST's blocks the most recently used
        t = 1_000_000 + (10_000 if f.name in shared else age)
        os.utime(f, (t, t))
    fb = _file_bytes(art)
    fresh = Engine(art, backend="reference", num_kv_blocks=DEVICE_BLOCKS,
                   kv_offload_dir=str(kv), kv_offload_dir_gb=6 * fb / GIB)
    s = _offload_stats(fresh)
    assert s["lower_evictions"] == len(files) - 6 and s["lower_bytes"] == 6 * fb
    left = {f.name for f in kv.rglob("*.kv")}
    assert len(left) == 6 and shared <= left
    assert run_all(fresh, [SECOND], GREEDY)[0].token_ids == want[-1]
    assert _offload_stats(fresh)["load_blocks_lower"] == 4


def test_the_disk_tier_cap_is_checked(art, tmp_path, monkeypatch, caplog):
    with pytest.raises(BrazeError, match="kv_offload_dir_gb must be a positive number"):
        Engine(art, backend="reference", kv_offload_dir=str(tmp_path), kv_offload_dir_gb=0)
    with pytest.raises(BrazeError, match="kv_offload_dir_gb caps the disk tier.*--kv-offload-dir"):
        Engine(art, backend="reference", kv_offload_cpu_gb=1, kv_offload_dir_gb=2)
    eng = Engine(art, backend="reference", kv_offload_dir=str(tmp_path))
    assert eng.offload.lower.capacity_bytes == 64 * GIB     # the default: finite
    assert eng.offload.summary()["lower_gb"] == 64
    # a cap the filesystem has no room for is said at start, naming the flag and the room
    real = os.statvfs(tmp_path)
    monkeypatch.setattr(kv_offload.os, "statvfs", lambda p: os.statvfs_result(
        (real.f_bsize, 1 << 20, 0, 0, 1024, 0, 0, 0, 0, 255)))       # 1 GiB free
    caplog.clear()
    with caplog.at_level("WARNING", logger="braze.runtime"):
        Engine(art, backend="reference", kv_offload_dir=str(tmp_path))
        Engine(art, backend="reference", kv_offload_dir=str(tmp_path), kv_offload_dir_gb=0.5)
    said = [r.getMessage() for r in caplog.records if "--kv-offload-dir-gb" in r.getMessage()]
    assert len(said) == 1 and "64 (the default)" in said[0] and "1.0 GiB free" in said[0]


def test_a_load_from_disk_never_waits_behind_the_tiers_queued_writes(art, want, tmp_path,
                                                                    monkeypatch):
    """Reads and writes shared one background thread: a request whose prefix is on disk
    waited in the scheduler behind every block write queued before it (a prefill's
    thousands, or each try of a store that is down), and so did every cold request.
    Its blocks are now read while the writes still wait."""
    import threading
    kv = str(tmp_path / "kv")
    first = Engine(art, backend="reference", num_kv_blocks=DEVICE_BLOCKS, kv_offload_dir=kv)
    run_all(first, [FIRST], GREEDY)
    first.offload.close()
    gate, gave_up = threading.Event(), []
    real_put = kv_stores.DirectoryStore.put

    def slow_put(self, k, p):
        if not gate.wait(5):            # the writes wait till SECOND is done (at most 5 s)
            gave_up.append(k)
            gate.set()
        real_put(self, k, p)
    monkeypatch.setattr(kv_stores.DirectoryStore, "put", slow_put)
    eng = Engine(art, backend="reference", num_kv_blocks=DEVICE_BLOCKS, kv_offload_dir=kv)
    try:
        run_all(eng, FILLERS[:2], GREEDY)       # their blocks' writes now wait
        assert run_all(eng, [SECOND], GREEDY)[0].token_ids == want[-1]
        assert not gave_up, "SECOND's load waited for the writes queued before it"
        assert _offload_stats(eng)["load_blocks_lower"] == 4
    finally:
        gate.set()
    eng.offload.close()


def test_writes_a_slow_tier_cannot_take_wait_within_the_host_tiers_size(art, want, tmp_path,
                                                                       monkeypatch):
    """Every stored block was queued for the lower tier, a copy of its bytes each, however
    far behind the tier was: a store that is down (each block a connect timeout) or slower
    than the traffic grew the server's memory without bound. The queue now holds at most
    the host tier's size (1 GiB at least; no floor here); the blocks past it are counted
    failed stores, and computed when needed."""
    import threading
    gate, taken = threading.Event(), []
    real_put = kv_stores.DirectoryStore.put

    def stuck_put(self, k, p):
        gate.wait(10)
        taken.append(k)
        real_put(self, k, p)
    monkeypatch.setattr(kv_stores.DirectoryStore, "put", stuck_put)
    monkeypatch.setattr(kv_offload, "WRITE_BACKLOG_MIN_BYTES", 0)
    host_blocks = 8
    kv = tmp_path / "kv"
    eng = Engine(art, backend="reference", num_kv_blocks=DEVICE_BLOCKS,
                 kv_offload_cpu_gb=_host_gb(art, host_blocks), kv_offload_dir=str(kv))
    try:
        got = run_all(eng, [FIRST, *FILLERS], GREEDY)
        s = _offload_stats(eng)
        assert s["store_blocks"] > host_blocks + 1
        assert s["store_failures"] >= s["store_blocks"] - host_blocks
    finally:
        gate.set()
    eng.offload.drain()
    s = _offload_stats(eng)
    assert len(taken) == len(list(kv.rglob("*.kv"))) == s["store_blocks"] - s["store_failures"]
    assert [o.token_ids for o in got] == want[:len(got)]


def test_a_tier_that_errors_is_left_alone_for_a_while(art, want, tmp_path, monkeypatch):
    """Every cold request asked the lower tier first and waited in the scheduler for its
    answer: with a store that is down, each one's first token came a connect timeout (and
    its retries) late. After a read fails, the tier is not read for TIER_RETRY_S; then it
    is tried again. A corrupt block is not the tier's failure."""
    asked = []

    def down(self, k):
        asked.append(k)
        raise StoreError(f"KV block {k} cannot be read (connection timed out)")
    eng = Engine(art, backend="reference", num_kv_blocks=DEVICE_BLOCKS,
                 kv_offload_dir=str(tmp_path / "kv"))
    monkeypatch.setattr(kv_stores.DirectoryStore, "get", down)
    got = [run_all(eng, [p], GREEDY)[0] for p in [FIRST, *FILLERS]]
    assert [o.token_ids for o in got] == want[:len(got)]
    assert len(asked) == 1 and _offload_stats(eng)["load_failures"] == 1
    monkeypatch.setattr(kv_offload, "TIER_RETRY_S", 0.0)         # the while is over
    run_all(eng, prompts_of([40], seed=9), GREEDY)                # a prompt no tier holds
    assert len(asked) == 2 and _offload_stats(eng)["load_failures"] == 2


def test_blocks_staged_for_an_aborted_request_count_as_host_hits_later(art, want, tmp_path,
                                                                      monkeypatch):
    """Every block staged from the lower tier was remembered until some request loaded it:
    staged for a request aborted meanwhile (a client gone), it stayed remembered for the
    server's life, and the next load of it, from the host tier, counted as the lower
    tier's. A load counts a block as the lower tier's only when its own staging read it."""
    import threading
    kv = str(tmp_path / "kv")
    first = Engine(art, backend="reference", num_kv_blocks=DEVICE_BLOCKS, kv_offload_dir=kv)
    run_all(first, [FIRST], GREEDY)
    first.offload.close()
    gate = threading.Event()
    real_get = kv_stores.DirectoryStore.get
    monkeypatch.setattr(kv_stores.DirectoryStore, "get",
                        lambda self, k: (gate.wait(10), real_get(self, k))[1])
    eng = Engine(art, backend="reference", num_kv_blocks=DEVICE_BLOCKS, kv_offload_dir=kv)
    eng.add_request("gone", SECOND, GREEDY)
    eng.step()
    assert eng.num_waiting() == 1               # waiting for its blocks from disk
    eng.abort_request("gone")
    eng.step()
    gate.set()
    import time
    last = eng.offload.keys(_probe(SECOND), 4)[-1]
    while last not in eng.offload.host:         # the staging ends in the background
        time.sleep(0.01)
    assert run_all(eng, [SECOND], GREEDY)[0].token_ids == want[-1]
    s = _offload_stats(eng)
    assert (s["load_blocks_host"], s["load_blocks_lower"]) == (4, 0)
    assert s["load_bytes_lower"] == 4 * _block_bytes(art)       # what the staging read


def test_closing_finishes_the_disk_tiers_writes_within_a_bound(art, tmp_path, monkeypatch,
                                                                caplog):
    """`braze serve` exits without the interpreter's teardown: the blocks still queued for
    the disk tier were lost, and a restarted server computed them again. Closing the
    engine (the server does on shutdown) writes them; a tier that hangs is given up on
    after a bound, and said."""
    import threading
    import time
    from braze.runtime import LLM
    real_put = kv_stores.DirectoryStore.put
    monkeypatch.setattr(kv_stores.DirectoryStore, "put",
                        lambda self, k, p: (time.sleep(0.02), real_put(self, k, p)))
    kv = tmp_path / "kv"
    llm = LLM(art, backend="reference", num_kv_blocks=DEVICE_BLOCKS,
              kv_offload_cpu_gb=_host_gb(art, 64), kv_offload_dir=str(kv))
    llm.generate([FIRST, *FILLERS], GREEDY)
    stored = _offload_stats(llm.engine)["store_blocks"]
    llm.close()
    assert len(list(kv.rglob("*.kv"))) == stored > 0
    assert not list(kv.rglob(".tmp-*"))

    gate = threading.Event()
    monkeypatch.setattr(kv_stores.DirectoryStore, "put", lambda self, k, p: gate.wait(30))
    eng = Engine(art, backend="reference", num_kv_blocks=DEVICE_BLOCKS,
                 kv_offload_cpu_gb=_host_gb(art, 64), kv_offload_dir=str(tmp_path / "kv2"))
    run_all(eng, [FIRST, *FILLERS], GREEDY)
    try:
        with caplog.at_level("WARNING", logger="braze.runtime"):
            eng.offload.close(timeout=0.2)
    finally:
        gate.set()
    assert any("dropped" in r.getMessage() and str(tmp_path / "kv2") in r.getMessage()
               for r in caplog.records), caplog.text


def test_a_disk_tier_directory_that_cannot_be_written_is_refused_at_start(art, tmp_path):
    """Every store would fail, counted but never said: refused when the tier opens, naming
    the directory (a file in the way, or a directory nobody may write: /proc/self)."""
    in_the_way = tmp_path / "file"
    in_the_way.write_text("x")
    dirs = [in_the_way / "kv"] + ([Path("/proc/self")] if Path("/proc/self").is_dir() else [])
    for d in dirs:
        with pytest.raises(BrazeError, match=rf"KV offload directory {d}.*--kv-offload-dir"):
            Engine(art, backend="reference", kv_offload_dir=str(d))


def test_blocks_seal_with_a_checksum():
    payload = bytes(range(256)) * 4
    assert unseal(seal(payload), "k", "here") == payload
    bad = bytearray(seal(payload))
    bad[40] ^= 1
    with pytest.raises(StoreError, match="corrupt"):
        unseal(bytes(bad), "k", "here")
    with pytest.raises(StoreError, match="not a braze KV block"):
        unseal(b"hello", "k", "here")


def test_the_host_tier_evicts_least_recently_used_first():
    import torch
    h = HostStore(3 * 8, 8)
    for k in "abc":
        h.put(k, torch.zeros(8, dtype=torch.uint8))
    assert h.get("a") is not None            # a is now the most recent
    h.put("d", torch.zeros(8, dtype=torch.uint8))
    assert "b" not in h and all(k in h for k in "acd") and h.evictions == 1
    with pytest.raises(BrazeError, match="cannot hold one block"):
        HostStore(4, 8)


def test_the_host_tier_holds_no_more_memory_than_its_budget():
    """A GPU store copies several blocks into one pinned buffer and puts its rows: kept
    as views, one surviving row would hold the whole buffer alive, so the tier's memory
    could grow to (blocks per store) times its budget. Each kept block owns its bytes."""
    import torch
    h = HostStore(3 * 8, 8)
    for i in range(4):
        buf = torch.full((5, 8), i, dtype=torch.uint8)
        for j, row in enumerate(buf):
            h.put(f"{i}.{j}", row)
    kept = list(h._blocks.values())
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept}
    assert len(kept) == 3 and sum(held.values()) <= 3 * 8
    assert [int(t[0]) for t in kept] == [3, 3, 3]


def test_adopt_registers_blocks_after_the_hits_and_leaves_a_token_to_compute():
    bm = BlockManager(8, block_size=4)
    tokens = list(range(1, 15))              # 14 tokens: 3 full blocks, 3 loadable at most
    assert bm.cached_prefix_blocks(tokens) == 0
    bm.allocate("a", tokens)
    ids = bm.adopt("a", 2)
    assert ids == bm.block_table("a")[:2]
    assert bm.cached_prefix_blocks(tokens) == 2
    with pytest.raises(BrazeError, match="at least one token"):
        bm.adopt("a", 2)
    bm.free("a")
    bm.allocate("b", tokens)                 # the adopted blocks are ordinary prefix hits now
    assert bm.block_table("b")[:2] == ids


# -- S3 ----------------------------------------------------------------------------------

def test_an_s3_tier_on_a_real_s3_server(art, want, s3):
    eng = Engine(art, backend="reference", num_kv_blocks=DEVICE_BLOCKS,
                 kv_offload_cpu_gb=_host_gb(art, 8), kv_offload_s3="s3://braze-kv/models/a")
    got = _traffic(eng)
    assert [o.token_ids for o in got] == want
    s = _offload_stats(eng)
    assert s["lower_tier"] == "s3" and _second_loads(eng) == (0, 4) and s["store_failures"] == 0
    import boto3
    listed = boto3.client("s3").list_objects_v2(Bucket="braze-kv", Prefix="models/a/")
    assert listed["KeyCount"] == s["store_blocks"]


def test_an_s3_tier_that_errors_is_counted_and_changes_no_output(art, want, s3):
    s3.stop()                                # every S3 call now fails to connect
    eng = Engine(art, backend="reference", num_kv_blocks=DEVICE_BLOCKS,
                 kv_offload_cpu_gb=_host_gb(art, 8), kv_offload_s3="s3://braze-kv/x")
    assert [o.token_ids for o in _traffic(eng)] == want
    s = _offload_stats(eng)
    assert s["store_failures"] > 0 and s["load_failures"] >= 1 and _second_loads(eng)[1] == 0


def _no_aws_credentials(monkeypatch, tmp_path):
    """An environment where boto3 finds no credentials anywhere (no variables, no files, no
    instance metadata service)."""
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
              "AWS_DEFAULT_PROFILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
              "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_an_s3_tier_without_credentials_is_refused_at_start(art, tmp_path, monkeypatch):
    """Every store and load would fail, counted but never said: refused when it is made."""
    pytest.importorskip("boto3")
    _no_aws_credentials(monkeypatch, tmp_path)
    with pytest.raises(BrazeError, match=r"--kv-offload-s3.*credentials.*AWS_ACCESS_KEY_ID"):
        Engine(art, backend="reference", kv_offload_s3="s3://braze-kv/x")


def test_an_s3_bucket_that_does_not_exist_is_refused_at_start(art, s3):
    with pytest.raises(BrazeError, match=r"--kv-offload-s3.*bucket 'no-such-bucket'"):
        Engine(art, backend="reference", kv_offload_s3="s3://no-such-bucket/x")


def _s3_user(monkeypatch, actions):
    """An IAM user of the moto server allowed `actions` on braze-kv's objects, its keys in
    the AWS variables, and moto checking every request's credentials from now on."""
    import json
    import uuid

    import boto3
    from moto import settings
    monkeypatch.setenv("AWS_ENDPOINT_URL_IAM", os.environ["AWS_ENDPOINT_URL_S3"])
    iam, user = boto3.client("iam"), f"kv-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="objects", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions,
                                                "Resource": "arn:aws:s3:::braze-kv/*"}]}))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)


@pytest.mark.parametrize("bad,code", [("AWS_ACCESS_KEY_ID", "InvalidAccessKeyId"),
                                      ("AWS_SECRET_ACCESS_KEY", "SignatureDoesNotMatch")])
def test_s3_credentials_the_store_refuses_are_refused_at_start(art, s3, monkeypatch, bad,
                                                                code):
    """A key id the endpoint does not know, or a secret that does not match, fails every
    store and load: refused when the tier is made, naming the variables to fix, not taken
    for a store that is down for a while."""
    _s3_user(monkeypatch, ["s3:GetObject", "s3:PutObject"])
    monkeypatch.setenv(bad, "AKIAWRONGWRONGWRONG1")
    with pytest.raises(BrazeError, match=rf"--kv-offload-s3 s3://braze-kv/x.*{code}"
                                         r".*AWS_ACCESS_KEY_ID"):
        Engine(art, backend="reference", kv_offload_s3="s3://braze-kv/x")


def test_s3_credentials_for_the_objects_alone_serve_the_tier(art, want, s3, monkeypatch,
                                                            caplog):
    """A policy that grants the objects but not the bucket's listing (HeadBucket: 403) is
    a working tier: said, and used."""
    _s3_user(monkeypatch, ["s3:GetObject", "s3:PutObject"])
    with caplog.at_level("WARNING", logger="braze.runtime"):
        eng = Engine(art, backend="reference", num_kv_blocks=DEVICE_BLOCKS,
                     kv_offload_cpu_gb=_host_gb(art, 8), kv_offload_s3="s3://braze-kv/x")
    assert any("s3:GetObject" in r.getMessage() for r in caplog.records), caplog.text
    assert [o.token_ids for o in _traffic(eng)] == want
    s = _offload_stats(eng)
    assert _second_loads(eng) == (0, 4) and s["store_failures"] == 0


def test_an_s3_tier_down_at_start_is_said_and_the_engine_starts(art, s3, caplog):
    s3.stop()
    with caplog.at_level("WARNING", logger="braze.runtime"):
        eng = Engine(art, backend="reference", kv_offload_s3="s3://braze-kv/x")
    assert eng.offload.lower.name == "s3"
    assert any("s3://braze-kv/x" in r.getMessage() and "cannot be reached" in r.getMessage()
               for r in caplog.records), caplog.text


def test_offload_options_are_checked(art, tmp_path):
    with pytest.raises(BrazeError, match="kv_offload_cpu_gb must be a positive number"):
        Engine(art, backend="reference", kv_offload_cpu_gb=0)
    with pytest.raises(BrazeError, match="choose one lower KV tier"):
        Engine(art, backend="reference", kv_offload_dir=str(tmp_path), kv_offload_s3="s3://a/b")
    # an S3-compatible server's address is not the bucket's: the message says where it goes
    with pytest.raises(BrazeError, match="wants s3://BUCKET.*AWS_ENDPOINT_URL"):
        Engine(art, backend="reference", kv_offload_s3="http://example.com/x")
    # it says what to drop, not to pass the very option at fault
    with pytest.raises(BrazeError, match="prefix caching.*drop --no-enable-prefix-caching.*"
                                         "enable_prefix_caching=False\\)$") as e:
        Engine(art, backend="reference", kv_offload_cpu_gb=1, enable_prefix_caching=False)
    assert "or enable_prefix_caching=False" not in str(e.value)


def test_a_host_tier_larger_than_the_hosts_memory_is_refused_at_start(art, caplog):
    """The tier fills as traffic comes: one larger than the machine's memory ends hours
    later in the OOM killer. Refused when the tier opens, naming the flag and the memory;
    more than half of it is said."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    with pytest.raises(BrazeError, match=r"--kv-offload-cpu-gb.*this host has"):
        Engine(art, backend="reference", kv_offload_cpu_gb=total * 1.5)
    with caplog.at_level("WARNING", logger="braze.runtime"):
        eng = Engine(art, backend="reference", kv_offload_cpu_gb=total * 0.6)
    assert eng.offload.host_bytes == int(total * 0.6 * GIB)
    assert any("--kv-offload-cpu-gb" in r.getMessage() for r in caplog.records), caplog.text


# -- from braze serve ------------------------------------------------------------------------

def test_serve_takes_the_tier_flags_and_kv_transfer_params(art, want, tmp_path):
    pytest.importorskip("fastapi")
    from serve_helpers import MODEL, Server
    s = Server(art, tmp_path, "--num-kv-blocks", str(DEVICE_BLOCKS),
               "--kv-offload-cpu-gb", repr(_host_gb(art, 64)),
               "--kv-offload-dir", str(tmp_path / "kv"))
    try:
        def complete(prompt, **extra):
            r = s.http.post("/v1/completions", json={
                "model": MODEL, "prompt": prompt, "max_tokens": GREEDY.max_tokens,
                "temperature": 0, "ignore_eos": True, **extra})
            return r
        for p in [FIRST, *FILLERS]:
            assert complete(p).status_code == 200
        before = s.metrics()
        r = complete(SECOND, kv_transfer_params={"max_load_tokens": 1000})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] is not None
        m = s.metrics()
        key = 'braze_kv_offload_loaded_blocks_total{tier="host"}'
        assert m[key] - before[key] == 4
        assert m['braze_kv_offload_bytes_total{direction="store",tier="disk"}'] > 0
        bad = complete(SECOND, kv_transfer_params={"max_load_tokens": "all"})
        assert bad.status_code == 400
        assert bad.json()["error"]["param"] == "kv_transfer_params"
    finally:
        s.stop()


def test_serve_beam_search_keeps_the_requests_kv_transfer_params(art, tmp_path):
    """use_beam_search runs as many one-token requests: each carries the request's policy,
    so `store: false` keeps a beam search's blocks out of the tiers as it does a sampled
    request's, and a bad policy is a 400 naming the field."""
    pytest.importorskip("fastapi")
    from serve_helpers import MODEL, Server
    s = Server(art, tmp_path, "--kv-offload-cpu-gb", repr(_host_gb(art, 64)))
    stored = 'braze_kv_offload_bytes_total{direction="store",tier="host"}'
    try:
        def beam(prompt, kv):
            return s.http.post("/v1/completions", json={
                "model": MODEL, "prompt": prompt, "max_tokens": 3, "n": 2,
                "use_beam_search": True, "ignore_eos": True, "kv_transfer_params": kv})
        r = beam(FIRST, {"store": False})
        assert r.status_code == 200, r.text
        assert s.metrics()[stored] == 0
        r = beam(FIRST, {"max_load_tokens": "all"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "kv_transfer_params"
        assert beam(FILLERS[0], None).status_code == 200
        assert s.metrics()[stored] > 0
    finally:
        s.stop()


# -- tensor parallelism ----------------------------------------------------------------------
# Two ranks (gloo), each with its own slice of every block (one of the two KV heads), its
# own host tier and its own objects in the disk tier; rank 0 decides, rank 1 repeats.

@pytest.fixture(scope="module")
def tp_wants(store):
    """Per case: one rank, no offload, a device cache large enough for all of it."""
    wants = {}

    def want(case):
        if case not in wants:
            eng = Engine(store.artifact(case, opt_level=2), backend="reference",
                         num_kv_blocks=256)
            wants[case] = [o.token_ids for o in _traffic(eng)]
        return wants[case]
    return want


@pytest.fixture(scope="module")
def tp_want(tp_wants):
    return tp_wants("llama")


def _tp_engine(store, host_blocks: int, kv=None, case="llama", **tier):
    from braze.runtime import LLM
    one = store.artifact(case, opt_level=2)
    per_rank = _block_bytes(one) // 2           # each rank holds half of the KV heads
    if kv is not None:
        tier["kv_offload_dir"] = str(kv)
    llm = LLM(store.artifact(case, opt_level=2, tensor_parallel_size=2),
              backend="reference", num_kv_blocks=DEVICE_BLOCKS,
              kv_offload_cpu_gb=host_blocks * per_rank / GIB, **tier)
    assert llm.engine.offload.block_bytes == per_rank
    return llm, per_rank


def _rank_files(kv, rank) -> dict:
    return {p.name.split(".")[0]: p for p in kv.rglob(f"*.rank{rank}.kv")}


def test_two_ranks_store_and_load_their_own_slices(store, tp_want, tmp_path):
    kv = tmp_path / "kv"
    llm, per_rank = _tp_engine(store, 64, kv)
    with llm:
        eng = llm.engine
        got = _traffic(eng)
        s = _offload_stats(eng)
        assert s["host_capacity_blocks"] == 64
    assert [o.token_ids for o in got] == tp_want
    assert _second_loads(eng) == (4, 0) and s["load_failures"] == s["store_failures"] == 0
    # bytes are summed over the ranks: both slices of every block went to disk
    assert s["store_bytes_lower"] == 2 * s["store_blocks"] * per_rank
    assert s["load_bytes_host"] - eng.before_second["load_bytes_host"] == 2 * 4 * per_rank
    r0, r1 = _rank_files(kv, 0), _rank_files(kv, 1)
    assert len(r0) == s["store_blocks"] and r0.keys() == r1.keys()
    assert len(list(kv.rglob("*.kv"))) == 2 * s["store_blocks"]     # nothing unranked
    key = next(iter(r0))
    assert r0[key].read_bytes() != r1[key].read_bytes()           # two different slices
    # one rank over the same directory finds none of them (another identity, no rank names)
    one = Engine(store.artifact("llama", opt_level=2), backend="reference",
                 num_kv_blocks=DEVICE_BLOCKS, kv_offload_dir=str(kv))
    assert run_all(one, [SECOND], GREEDY)[0].token_ids == tp_want[-1]
    assert _offload_stats(one)["load_blocks_lower"] == 0


def test_the_number_of_ranks_is_part_of_a_blocks_identity():
    from braze.runtime.kv_offload import model_identity
    manifest = {"files": {"graph.bir": "ab", "weights.safetensors": "cd"}}
    layout = {"k0": ((8, 16, 2, 4), "float32")}
    ids = {model_identity(manifest, 16, layout, n) for n in (1, 2, 4)}
    assert len(ids) == 3 and model_identity(manifest, 16, layout) in ids


def test_a_block_corrupt_on_rank_1_only_is_computed_by_both_ranks(store, tp_want, tmp_path):
    kv = tmp_path / "kv"
    llm, _ = _tp_engine(store, 8, kv)

    def corrupt_rank_1():
        key = llm.engine.offload.keys(_probe(FIRST), 4)[2]
        victim = _rank_files(kv, 1)[key]
        data = bytearray(victim.read_bytes())
        data[-1] ^= 0xFF
        victim.write_bytes(bytes(data))
    with llm:
        eng = llm.engine
        got = _traffic(eng, meanwhile=corrupt_rank_1)
        s = _offload_stats(eng)
    assert [o.token_ids for o in got] == tp_want
    # rank 0 staged all 4 blocks, rank 1 the 2 before its bad one: both load 2
    assert _second_loads(eng) == (0, 2)
    assert s["load_failures"] - eng.before_second["load_failures"] == 1


def test_two_ranks_on_an_s3_tier_name_their_objects_by_rank(store, tp_want, s3):
    llm, _ = _tp_engine(store, 8, kv_offload_s3="s3://braze-kv/tp")
    with llm:
        eng = llm.engine
        got = _traffic(eng)
        s = _offload_stats(eng)
    assert [o.token_ids for o in got] == tp_want
    assert _second_loads(eng) == (0, 4) and s["store_failures"] == s["load_failures"] == 0
    import boto3
    names = [o["Key"] for o in boto3.client("s3").list_objects_v2(
        Bucket="braze-kv", Prefix="tp/")["Contents"]]
    for r in (0, 1):
        assert len([n for n in names if n.endswith(f".rank{r}.kv")]) == s["store_blocks"]


def test_two_ranks_offload_a_hybrid_cache(store, tp_wants, tmp_path):
    """Gemma 3's local and global layers: several KV cache groups (the full layers, and the
    window layers cut into groups of as many layers), a block one id per group, on both
    ranks; the prefix comes back from disk."""
    case = "gemma3-sandwich-softcap"
    llm, _ = _tp_engine(store, 8, tmp_path / "kv", case=case)
    with llm:
        eng = llm.engine
        assert len(set(eng.offload.group_of.values())) >= 2
        got = _traffic(eng)
        s = _offload_stats(eng)
    assert [o.token_ids for o in got] == tp_wants(case)
    assert _second_loads(eng) == (0, 4) and s["load_failures"] == 0
    assert len(_rank_files(tmp_path / "kv", 1)) == s["store_blocks"]


def test_a_tensor_parallel_server_stops_its_ranks_and_their_tiers_cleanly(store, tmp_path):
    """SIGTERM on `braze serve` of a two-rank artifact: rank 1 is told to stop (it closed
    on a dropped connection, with a traceback in the log that read as a crash) and both
    ranks' blocks are on disk."""
    pytest.importorskip("fastapi")
    from serve_helpers import MODEL, Server
    art = store.artifact("llama", opt_level=2, tensor_parallel_size=2)
    kv = tmp_path / "kv"
    s = Server(art, tmp_path, "--kv-offload-dir", str(kv), "--num-kv-blocks",
               str(DEVICE_BLOCKS))
    try:
        for p in [FIRST, *FILLERS[:2]]:
            r = s.http.post("/v1/completions", json={"model": MODEL, "prompt": p,
                                                     "max_tokens": 2, "ignore_eos": True})
            assert r.status_code == 200, r.text
        stored = s.metrics()['braze_kv_offload_bytes_total{direction="store",tier="host"}']
    finally:
        assert s.stop() == 0
    err = s.stderr()
    assert "Traceback" not in err and "Connection closed" not in err, err[-3000:]
    assert len(_rank_files(kv, 0)) == len(_rank_files(kv, 1)) > 0
    assert stored > 0
