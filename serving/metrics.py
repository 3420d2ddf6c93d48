"""Server metrics in the Prometheus text exposition format (version 0.0.4), by hand.

Counters and histograms are updated on the event-loop thread as engine outputs arrive;
gauges come from the engine-thread snapshot (`AsyncEngine.snapshot()`) at scrape time.
`braze_kv_cache_usage` is kv_blocks_used / kv_blocks_total where "used" means held by a
live request: blocks kept only for the prefix cache are free to reuse and do not count.
"""

from __future__ import annotations

import bisect
import math

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                0.5, 0.75, 1.0, 2.5)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0,
                   80.0, 160.0)
FINISH_REASONS = ("stop", "length", "abort", "error")


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help, tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)     # last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float | None) -> None:
        if value is None or math.isnan(value):
            return
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for le, c in zip(self.buckets, self.counts):
            total += c
            lines.append(f'{self.name}_bucket{{le="{_num(le)}"}} {total}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{self.name}_sum {_num(self.sum)}")
        lines.append(f"{self.name}_count {self.count}")
        return lines


def _num(v: float) -> str:
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) < 1e15):
        return str(int(v)) if isinstance(v, int) else f"{v:.1f}"
    return repr(float(v))


class Metrics:
    def __init__(self, model_name: str):
        self.model_name = model_name
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.requests = {r: 0 for r in FINISH_REASONS}
        self.rejected = 0
        self.ttft = Histogram("braze_time_to_first_token_seconds",
                              "Seconds from arrival to the first generated token.", TTFT_BUCKETS)
        self.tpot = Histogram("braze_time_per_output_token_seconds",
                              "Mean seconds per output token after the first, per request.",
                              TPOT_BUCKETS)
        self.latency = Histogram("braze_e2e_request_latency_seconds",
                                 "Seconds from arrival to the last token.", LATENCY_BUCKETS)
        self.queue_time = Histogram("braze_request_queue_time_seconds",
                                    "Seconds a request waited before its first step.",
                                    LATENCY_BUCKETS)

    def on_admitted(self, num_prompt_tokens: int) -> None:
        self.prompt_tokens += num_prompt_tokens

    def on_tokens(self, n: int) -> None:
        self.generation_tokens += n

    def on_finished(self, finish_reason: str | None, metrics: dict, latency: float | None) -> None:
        reason = finish_reason if finish_reason in self.requests else "error"
        self.requests[reason] += 1
        self.ttft.observe(metrics.get("ttft"))
        self.tpot.observe(metrics.get("tpot"))
        self.queue_time.observe(metrics.get("queue_time"))
        self.latency.observe(latency)

    def render(self, snap: dict) -> str:
        """`snap`: running, waiting, kv_blocks_used, kv_blocks_total, preemptions,
        prefix_cache_hit_tokens (missing keys read as 0)."""
        total = snap.get("kv_blocks_total") or 0
        usage = (snap.get("kv_blocks_used") or 0) / total if total else 0.0
        out: list[str] = []

        def one(name, kind, help, value, labels=""):
            out.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}",
                        f"{name}{labels} {_num(value)}"])

        one("braze_requests_running", "gauge", "Requests in the running batch.",
            snap.get("running", 0))
        one("braze_requests_waiting", "gauge", "Requests accepted and waiting to be scheduled.",
            snap.get("waiting", 0))
        one("braze_kv_cache_usage", "gauge",
            "Fraction of KV-cache blocks held by live requests (0 to 1).", float(usage))
        one("braze_kv_cache_blocks_total", "gauge", "KV-cache blocks in the pool.", total)
        one("braze_prompt_tokens_total", "counter", "Prompt tokens of accepted requests.",
            self.prompt_tokens)
        one("braze_generation_tokens_total", "counter", "Generated tokens.",
            self.generation_tokens)
        one("braze_preemptions_total", "counter",
            "Times a running request was preempted for lack of KV blocks.",
            snap.get("preemptions", 0))
        one("braze_prefix_cache_hit_tokens_total", "counter",
            "Prompt tokens served from the prefix cache.", snap.get("prefix_cache_hit_tokens", 0))
        out += ["# HELP braze_kernels Kernel specialisations launched, by where their code came "
                "from (cubin: built ahead of time for them; cubin_less_specialised; jit: compiled "
                "from source on this host, e.g. for an artifact built with another Triton).",
                "# TYPE braze_kernels gauge"]
        out += [f'braze_kernels{{source="{k}"}} {snap.get("kernels_" + k, 0)}'
                for k in ("cubin", "cubin_less_specialised", "jit")]
        if snap.get("kv_offload_lower_tier", "absent") != "absent":
            out += _offload_metrics(snap)
        if "spec_decode_method" in snap:
            out += _spec_decode_metrics(snap)
        if snap.get("kv_groups"):
            out += _kv_group_metrics(snap["kv_groups"])
        one("braze_requests_rejected_total", "counter",
            "Requests refused with 503 (queue full, draining or engine down).", self.rejected)
        out += ["# HELP braze_requests_total Finished requests by finish reason.",
                "# TYPE braze_requests_total counter"]
        out += [f'braze_requests_total{{finish_reason="{r}"}} {n}' for r, n in self.requests.items()]
        for h in (self.ttft, self.tpot, self.latency, self.queue_time):
            out += h.render()
        return "\n".join(out) + "\n"


def _kv_group_metrics(groups: list[dict]) -> list[str]:
    """A hybrid cache's KV cache groups (runtime/hybrid_cache.py): each pool's blocks, held
    and total, labelled by group index and window (0 = full attention)."""
    out = []
    for name, key, help in (("braze_kv_group_blocks_used", "blocks_used",
                             "KV blocks of a KV cache group held by live requests."),
                            ("braze_kv_group_blocks_total", "blocks_total",
                             "KV blocks in a KV cache group's pool.")):
        out += [f"# HELP {name} {help}", f"# TYPE {name} gauge"]
        out += [f'{name}{{group="{i}",window="{g["window"]}"}} {_num(g[key])}'
                for i, g in enumerate(groups)]
    return out


def _spec_decode_metrics(snap: dict) -> list[str]:
    """Speculative decoding (runtime/speculative.py): proposals verified, accepted, and the
    acceptance of each guess position."""
    g = lambda k: _num(snap.get("spec_decode_" + k, 0))      # noqa: E731
    out = []
    for name, kind, key, help in (
            ("num_drafts_total", "counter", "num_drafts",
             "Verifications of speculative proposals (one per request and step that proposed)."),
            ("num_draft_tokens_total", "counter", "num_draft_tokens",
             "Speculative tokens proposed and scored by the target model."),
            ("num_accepted_tokens_total", "counter", "num_accepted_tokens",
             "Speculative tokens the target model accepted."),
            ("acceptance_rate", "gauge", "acceptance_rate",
             "Accepted over proposed speculative tokens (0 to 1)."),
            ("mean_acceptance_length", "gauge", "mean_acceptance_length",
             "Tokens per verification: accepted proposals plus the target's own token.")):
        out += [f"# HELP braze_spec_decode_{name} {help}",
                f"# TYPE braze_spec_decode_{name} {kind}", f"braze_spec_decode_{name} {g(key)}"]
    out += ["# HELP braze_spec_decode_num_accepted_tokens_per_pos_total Accepted speculative "
            "tokens by position in the proposal (0: the first guess).",
            "# TYPE braze_spec_decode_num_accepted_tokens_per_pos_total counter"]
    out += [f'braze_spec_decode_num_accepted_tokens_per_pos_total{{position="{j}"}} {_num(n)}'
            for j, n in enumerate(snap.get("spec_decode_accepted_per_position") or [])]
    return out


def _offload_metrics(snap: dict) -> list[str]:
    """The lower KV tiers (runtime/kv_offload.py): blocks loaded per tier, bytes moved, time
    spent, failures."""
    lower = snap.get("kv_offload_lower_tier") or "lower"
    g = lambda k: _num(snap.get("kv_offload_" + k, 0))      # noqa: E731
    out = ["# HELP braze_kv_offload_loaded_blocks_total KV blocks loaded back to the device, "
           "by the tier that held them.", "# TYPE braze_kv_offload_loaded_blocks_total counter",
           f'braze_kv_offload_loaded_blocks_total{{tier="host"}} {g("load_blocks_host")}',
           f'braze_kv_offload_loaded_blocks_total{{tier="{lower}"}} {g("load_blocks_lower")}',
           "# HELP braze_kv_offload_bytes_total KV bytes moved between tiers.",
           "# TYPE braze_kv_offload_bytes_total counter"]
    for direction, tier, key in (("store", "host", "store_bytes_host"),
                                 ("store", lower, "store_bytes_lower"),
                                 ("load", "host", "load_bytes_host"),
                                 ("load", lower, "load_bytes_lower")):
        out.append(f'braze_kv_offload_bytes_total{{direction="{direction}",tier="{tier}"}} '
                   f'{g(key)}')
    out += ["# HELP braze_kv_offload_seconds_total Time spent storing and loading KV blocks.",
            "# TYPE braze_kv_offload_seconds_total counter",
            f'braze_kv_offload_seconds_total{{direction="store"}} {g("store_seconds")}',
            f'braze_kv_offload_seconds_total{{direction="load"}} {g("load_seconds")}',
            "# HELP braze_kv_offload_operations_total Store and load operations (batches of "
            "blocks).", "# TYPE braze_kv_offload_operations_total counter",
            f'braze_kv_offload_operations_total{{direction="store"}} {g("stores")}',
            f'braze_kv_offload_operations_total{{direction="load"}} {g("loads")}',
            "# HELP braze_kv_offload_failures_total Failed KV block loads and stores (the "
            "blocks are computed instead).", "# TYPE braze_kv_offload_failures_total counter",
            f'braze_kv_offload_failures_total{{direction="store"}} {g("store_failures")}',
            f'braze_kv_offload_failures_total{{direction="load"}} {g("load_failures")}',
            "# HELP braze_kv_offload_host_blocks KV blocks held in the host tier.",
            "# TYPE braze_kv_offload_host_blocks gauge",
            f"braze_kv_offload_host_blocks {g('host_blocks')}"]
    return out
