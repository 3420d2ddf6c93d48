"""Server metrics for Prometheus, through `prometheus_client` (one registry per server).

Counters and histograms are updated on the event-loop thread as engine outputs arrive;
gauges and the engine's own counters come from the engine-thread snapshot
(`AsyncEngine.snapshot()`) at scrape time, through a collector that reads the snapshot
handed to `render`. `braze_kv_cache_usage` is kv_blocks_used / kv_blocks_total where
"used" means held by a live request: blocks kept only for the prefix cache are free to
reuse and do not count.

The families vLLM's dashboards and alerts read are exported under vLLM's names too
(`vllm:num_requests_running{model_name=...}`, ...: VLLM_NAMES), renamed at scrape time
from the braze_* families, so both always say the same.
"""

from __future__ import annotations

import math

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                0.5, 0.75, 1.0, 2.5)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0,
                   80.0, 160.0)
FINISH_REASONS = ("stop", "length", "abort", "error")
CONTENT_TYPE = CONTENT_TYPE_LATEST

# braze family -> vLLM's name of the same measure (vllm/v1/metrics/loggers.py); vLLM's
# per-request mean time per output token is request_time_per_output_token_seconds
VLLM_NAMES = {
    "braze_requests_running": "vllm:num_requests_running",
    "braze_requests_waiting": "vllm:num_requests_waiting",
    "braze_kv_cache_usage": "vllm:kv_cache_usage_perc",
    "braze_preemptions": "vllm:num_preemptions",
    "braze_prompt_tokens": "vllm:prompt_tokens",
    "braze_generation_tokens": "vllm:generation_tokens",
    "braze_requests": "vllm:request_success",
    "braze_prefix_cache_query_tokens": "vllm:prefix_cache_queries",
    "braze_prefix_cache_hit_tokens": "vllm:prefix_cache_hits",
    "braze_time_to_first_token_seconds": "vllm:time_to_first_token_seconds",
    "braze_time_per_output_token_seconds": "vllm:request_time_per_output_token_seconds",
    "braze_e2e_request_latency_seconds": "vllm:e2e_request_latency_seconds",
    "braze_request_queue_time_seconds": "vllm:request_queue_time_seconds",
    # speculative decoding (vLLM's SpecDecodingProm; acceptance rates it leaves to queries)
    "braze_spec_decode_num_drafts": "vllm:spec_decode_num_drafts",
    "braze_spec_decode_num_draft_tokens": "vllm:spec_decode_num_draft_tokens",
    "braze_spec_decode_num_accepted_tokens": "vllm:spec_decode_num_accepted_tokens",
    "braze_spec_decode_num_accepted_tokens_per_pos": "vllm:spec_decode_num_accepted_tokens_per_pos",
}
VLLM_LABELS = {"finish_reason": "finished_reason"}


class Metrics:
    def __init__(self, model_name: str):
        self.model_name = model_name
        self.registry = r = CollectorRegistry(auto_describe=True)
        self._prompt = Counter("braze_prompt_tokens", "Prompt tokens of accepted requests.",
                               registry=r)
        self._generation = Counter("braze_generation_tokens", "Generated tokens.", registry=r)
        self._requests = Counter("braze_requests", "Finished requests by finish reason.",
                                 ["finish_reason"], registry=r)
        for reason in FINISH_REASONS:           # every reason shows, at 0 until it happens
            self._requests.labels(reason)
        self._rejected = Counter("braze_requests_rejected", "Requests refused with 503 (queue "
                                 "full, draining or engine down).", registry=r)
        self.ttft = Histogram("braze_time_to_first_token_seconds",
                              "Seconds from arrival to the first generated token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("braze_time_per_output_token_seconds",
                              "Mean seconds per output token after the first, per request.",
                              buckets=TPOT_BUCKETS, registry=r)
        self.latency = Histogram("braze_e2e_request_latency_seconds",
                                 "Seconds from arrival to the last token.",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("braze_request_queue_time_seconds",
                                    "Seconds a request waited before its first step.",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self._snapshot = _Snapshot()
        r.register(self._snapshot)
        r.register(_VLLMNames(model_name, [self._prompt, self._generation, self._requests,
                                           self.ttft, self.tpot, self.latency,
                                           self.queue_time, self._snapshot]))

    def on_admitted(self, num_prompt_tokens: int) -> None:
        self._prompt.inc(num_prompt_tokens)

    def on_tokens(self, n: int) -> None:
        self._generation.inc(n)

    def on_rejected(self) -> None:
        self._rejected.inc()

    def on_finished(self, finish_reason: str | None, metrics: dict, latency: float | None) -> None:
        reason = finish_reason if finish_reason in FINISH_REASONS else "error"
        self._requests.labels(reason).inc()
        for hist, value in ((self.ttft, metrics.get("ttft")), (self.tpot, metrics.get("tpot")),
                            (self.queue_time, metrics.get("queue_time")),
                            (self.latency, latency)):
            if value is not None and not math.isnan(value):
                hist.observe(value)

    def render(self, snap: dict) -> str:
        """The exposition text (`CONTENT_TYPE`), the gauges read from `snap`: running,
        waiting, engine_stalled, kv_blocks_used, kv_blocks_total, preemptions,
        prefix_cache_hit_tokens,
        prefix_cache_queries,
        kernels_*, kv_groups, spec_decode_*, kv_offload_* (missing keys read as 0)."""
        self._snapshot.snap = snap
        try:
            return generate_latest(self.registry).decode()
        finally:
            self._snapshot.snap = {}


class _Snapshot:
    """A collector over the engine snapshot of the scrape in progress."""

    def __init__(self):
        self.snap: dict = {}

    def describe(self):
        return []           # its families depend on the snapshot: nothing to check up front

    def collect(self):
        snap = self.snap
        total = snap.get("kv_blocks_total") or 0
        usage = (snap.get("kv_blocks_used") or 0) / total if total else 0.0
        yield _gauge("braze_requests_running", "Requests in the running batch.",
                     snap.get("running", 0))
        yield _gauge("braze_requests_waiting", "Requests accepted and waiting to be scheduled.",
                     snap.get("waiting", 0))
        yield _gauge("braze_engine_stalled", "1 while the engine's current step has run longer "
                     "than --engine-iteration-timeout (then /health answers 503), else 0.",
                     snap.get("engine_stalled", 0))
        yield _gauge("braze_kv_cache_usage",
                     "Fraction of KV-cache blocks held by live requests (0 to 1).", usage)
        yield _gauge("braze_kv_cache_blocks_total", "KV-cache blocks in the pool.", total)
        yield CounterMetricFamily("braze_preemptions", "Times a running request was preempted "
                                  "for lack of KV blocks.", value=snap.get("preemptions", 0))
        yield CounterMetricFamily("braze_prefix_cache_hit_tokens", "Prompt tokens served from "
                                  "the prefix cache.",
                                  value=snap.get("prefix_cache_hit_tokens", 0))
        yield CounterMetricFamily("braze_prefix_cache_query_tokens", "Prompt tokens looked up "
                                  "in the prefix cache (hits over these: the hit rate).",
                                  value=snap.get("prefix_cache_queries", 0))
        kernels = GaugeMetricFamily(
            "braze_kernels", "Kernel specialisations launched, by where their code came from "
            "(cubin: built ahead of time for them; cubin_less_specialised; jit: compiled from "
            "source on this host, e.g. for an artifact built with another Triton).",
            labels=["source"])
        for k in ("cubin", "cubin_less_specialised", "jit"):
            kernels.add_metric([k], snap.get("kernels_" + k, 0))
        yield kernels
        if snap.get("kv_offload_lower_tier", "absent") != "absent":
            yield from _offload_metrics(snap)
        if "spec_decode_method" in snap:
            yield from _spec_decode_metrics(snap)
        if snap.get("kv_groups"):
            yield from _kv_group_metrics(snap["kv_groups"])


class _VLLMNames:
    """The `sources`' families that VLLM_NAMES names, again under vLLM's names, with its
    `model_name` label (and its `finished_reason` for braze's `finish_reason`)."""

    def __init__(self, model_name: str, sources: list):
        self.model_name, self.sources = model_name, sources

    def describe(self):
        return []

    def collect(self):
        for source in self.sources:
            for family in source.collect():
                name = VLLM_NAMES.get(family.name)
                if name is None:
                    continue
                out = Metric(name, family.documentation, family.type)
                for sample in family.samples:
                    labels = {VLLM_LABELS.get(k, k): v for k, v in sample.labels.items()}
                    out.samples.append(sample._replace(
                        name=name + sample.name[len(family.name):],
                        labels={"model_name": self.model_name, **labels}))
                yield out


def _gauge(name: str, help: str, value) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help, value=value)


def _labelled(kind, name: str, help: str, labels: list[str], rows) -> object:
    family = kind(name, help, labels=labels)
    for values, v in rows:
        family.add_metric(list(values), v)
    return family


def _kv_group_metrics(groups: list[dict]):
    """A hybrid cache's KV cache groups (runtime/hybrid_cache.py): each pool's blocks, held
    and total, labelled by group index and window (0 = full attention)."""
    for name, key, help in (("braze_kv_group_blocks_used", "blocks_used",
                             "KV blocks of a KV cache group held by live requests."),
                            ("braze_kv_group_blocks_total", "blocks_total",
                             "KV blocks in a KV cache group's pool.")):
        yield _labelled(GaugeMetricFamily, name, help, ["group", "window"],
                        (((str(i), str(g["window"])), g[key]) for i, g in enumerate(groups)))


def _spec_decode_metrics(snap: dict):
    """Speculative decoding (runtime/speculative.py): proposals verified, accepted, and the
    acceptance of each guess position."""
    def g(k):
        return snap.get("spec_decode_" + k, 0)
    for name, key, help in (
            ("num_drafts", "num_drafts",
             "Verifications of speculative proposals (one per request and step that proposed)."),
            ("num_draft_tokens", "num_draft_tokens",
             "Speculative tokens proposed and scored by the target model."),
            ("num_accepted_tokens", "num_accepted_tokens",
             "Speculative tokens the target model accepted.")):
        yield CounterMetricFamily("braze_spec_decode_" + name, help, value=g(key))
    yield _gauge("braze_spec_decode_acceptance_rate",
                 "Accepted over proposed speculative tokens (0 to 1).", g("acceptance_rate"))
    yield _gauge("braze_spec_decode_mean_acceptance_length",
                 "Tokens per verification: accepted proposals plus the target's own token.",
                 g("mean_acceptance_length"))
    yield _labelled(CounterMetricFamily, "braze_spec_decode_num_accepted_tokens_per_pos",
                    "Accepted speculative tokens by position in the proposal (0: the first "
                    "guess).", ["position"],
                    (((str(j),), n) for j, n in
                     enumerate(snap.get("spec_decode_accepted_per_position") or [])))


def _offload_metrics(snap: dict):
    """The lower KV tiers (runtime/kv_offload.py): blocks loaded per tier, bytes moved, time
    spent, failures."""
    lower = snap.get("kv_offload_lower_tier")      # None: a host tier only
    tiers = [("host", "host")] + ([(lower, "lower")] if lower else [])

    def g(k):
        return snap.get("kv_offload_" + k, 0)
    yield _labelled(CounterMetricFamily, "braze_kv_offload_loaded_blocks",
                    "KV blocks loaded back to the device, by the tier that held them.", ["tier"],
                    [((tier,), g("load_blocks_" + key)) for tier, key in tiers])
    yield _labelled(CounterMetricFamily, "braze_kv_offload_bytes",
                    "KV bytes moved between tiers.", ["direction", "tier"],
                    [((d, tier), g(f"{d}_bytes_{key}")) for d in ("store", "load")
                     for tier, key in tiers])
    yield _labelled(CounterMetricFamily, "braze_kv_offload_seconds",
                    "Time spent storing and loading KV blocks.", ["direction"],
                    [(("store",), g("store_seconds")), (("load",), g("load_seconds"))])
    yield _labelled(CounterMetricFamily, "braze_kv_offload_operations",
                    "Store and load operations (batches of blocks).", ["direction"],
                    [(("store",), g("stores")), (("load",), g("loads"))])
    yield _labelled(CounterMetricFamily, "braze_kv_offload_failures",
                    "Failed KV block loads and stores (the blocks are computed instead).",
                    ["direction"],
                    [(("store",), g("store_failures")), (("load",), g("load_failures"))])
    yield _gauge("braze_kv_offload_host_blocks", "KV blocks held in the host tier.",
                 g("host_blocks"))
    yield CounterMetricFamily("braze_kv_offload_host_evictions",
                              "KV blocks the host tier dropped for room, least recently used "
                              "first (often: --kv-offload-cpu-gb is small for the traffic).",
                              value=g("host_evictions"))
    yield _gauge("braze_kv_offload_host_capacity_blocks",
                 "KV blocks the host tier holds at most (--kv-offload-cpu-gb).",
                 g("host_capacity_blocks"))
    if lower:
        yield _labelled(CounterMetricFamily, "braze_kv_offload_lower_evictions",
                        "KV blocks the lower tier deleted for room, least recently used "
                        "first (a disk tier over --kv-offload-dir-gb).", ["tier"],
                        [((lower,), g("lower_evictions"))])
        yield _labelled(GaugeMetricFamily, "braze_kv_offload_lower_bytes",
                        "Bytes of KV blocks the lower tier holds (a disk tier's files).",
                        ["tier"], [((lower,), g("lower_bytes"))])
