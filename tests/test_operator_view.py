"""What an operator reads back from a server: /server_info says the options in effect (the
engine's resolved values, not only the flags as typed) and /metrics has a series only for
what exists. Checked on `serving.utility_routes.describe` and `serving.metrics.Metrics`
over real engines, against the engine's own objects."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")

from braze.runtime.engine import Engine  # noqa: E402
from braze.runtime.kv_offload import DEFAULT_DIR_GB, DEFAULT_HOST_GB, GIB  # noqa: E402
from braze.serving.options import ServerOptions  # noqa: E402
from braze.serving.utility_routes import describe  # noqa: E402

from serve_helpers import parse_metrics  # noqa: E402


def _info(engine) -> dict:
    svc = SimpleNamespace(aengine=SimpleNamespace(engine=engine), model_name="m")
    return describe(svc, ServerOptions())["engine"]


def test_server_info_shows_the_kv_tiers_in_effect(store, tmp_path):
    """A lower tier alone gets a host tier of DEFAULT_HOST_GB: the flags say null, the
    engine runs 4 GiB of host memory and a disk tier of DEFAULT_DIR_GB at most."""
    eng = Engine(store.artifact("llama"), backend="reference", num_kv_blocks=32,
                 kv_offload_dir=str(tmp_path / "kv"))
    info = _info(eng)
    assert info["options"]["kv_offload_cpu_gb"] is None
    host = eng.offload.host
    assert info["kv_offload"] == {
        "host_gb": DEFAULT_HOST_GB, "host_capacity_blocks": host.capacity_blocks,
        "lower_tier": "disk", "lower": str(tmp_path / "kv"), "lower_gb": DEFAULT_DIR_GB}
    assert host.capacity_blocks == int(DEFAULT_HOST_GB * GIB) // eng.offload.block_bytes
    plain = Engine(store.artifact("llama"), backend="reference", num_kv_blocks=32)
    assert _info(plain)["kv_offload"] is None


def test_server_info_shows_the_lora_cache_in_effect(store):
    """--max-cpu-loras below the artifact's slots is raised to them (its help says so):
    /server_info says what the engine keeps, not the flag."""
    art = store.artifact("llama", lora_slots=2, max_lora_rank=8)
    eng = Engine(art, backend="reference", num_kv_blocks=32, max_cpu_loras=1)
    info = _info(eng)
    assert info["lora"] == {"slots": eng.lora.contract.slots,
                            "max_loras": eng.lora.max_loras,
                            "max_rank": eng.lora.contract.max_rank,
                            "max_cpu_loras": eng.lora.max_cpu_loras}
    assert info["lora"]["max_cpu_loras"] == 2 and info["options"]["max_cpu_loras"] == 1
    assert _info(Engine(store.artifact("llama"), backend="reference",
                        num_kv_blocks=32))["lora"] is None


def test_server_info_says_no_cuda_graphs_off_the_cuda_backend(store):
    """--cudagraph-mode is for the cuda backend; on the others no graph is captured."""
    eng = Engine(store.artifact("llama"), backend="reference", num_kv_blocks=32,
                 cudagraph_mode="piecewise")
    info = _info(eng)
    assert info["options"]["cudagraph_mode"] == "piecewise"
    assert eng.runner.graphs.stats["cuda_graphs_captured"] == 0
    assert info["cudagraph_mode"] == "none"


def test_host_only_offload_metrics_name_no_lower_tier(store):
    """With --kv-offload-cpu-gb alone there is no lower tier: no series may be labelled
    with one (it used to show tier="lower", a tier that does not exist)."""
    from braze.serving.metrics import Metrics
    eng = Engine(store.artifact("llama"), backend="reference", num_kv_blocks=32,
                 kv_offload_cpu_gb=0.01)
    snap = eng.stats()
    assert snap["kv_offload_lower_tier"] is None
    got = parse_metrics(Metrics("m").render(snap))
    tiers = {k for k in got if k.startswith("braze_kv_offload_") and "tier=" in k}
    assert tiers and all('tier="host"' in k for k in tiers), sorted(tiers)
    assert got["braze_kv_offload_host_capacity_blocks"] == eng.offload.host.capacity_blocks
