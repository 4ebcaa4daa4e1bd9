"""Prometheus metrics of the server, named like vLLM's with a ``minicpm:`` prefix.

Contract: one private registry per server. Gauges and the engine's own counters (requests
running and waiting, KV cache usage, KV blocks used and total, preemptions, prefix-cache queries
and hits, the attention backend serving, kernel failures, requests ended by an error, the persistent
prefix cache's ``kv_store_*`` counters and its size in bytes, the CPU engine's thread count and its
drops under other processes' load) are read
from the engine's statistics when ``/metrics`` is scraped; per-request counters and histograms
(prompt and generation tokens, finished requests by reason, time to first token, inter-token
latency, end-to-end latency, queue time) are recorded as requests finish.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from ..engine.client import EngineClient

LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)

# the persistent prefix cache's counters (engine stats ``kv_store_<name>``; 0 without --kv-cache-dir)
KV_STORE_COUNTERS = {
    "hits": "KV blocks loaded from the persistent prefix cache.",
    "writes": "KV blocks written to the persistent prefix cache.",
    "skipped": "Persistent prefix cache files skipped by a check (truncated, foreign, corrupt, unreadable).",
    "dropped": "KV blocks not written because the writer's queue was full.",
    "write_errors": "Persistent prefix cache writes that failed (e.g. a full disk).",
    "evicted": "Persistent prefix cache files evicted (least recently used) to keep its bound.",
}


class _EngineCollector:
    def __init__(self, engine: EngineClient) -> None:
        self.engine = engine

    def collect(self) -> Any:
        s = self.engine.stats()
        used = s["num_blocks"] - s["free_blocks"]
        yield GaugeMetricFamily("minicpm:num_requests_running", "Requests in the running batch.", s["running"])
        yield GaugeMetricFamily("minicpm:num_requests_waiting", "Requests waiting to be scheduled.", s["waiting"])
        yield GaugeMetricFamily(
            "minicpm:kv_cache_usage_perc",
            "KV cache usage (1 = full).",
            used / s["num_blocks"] if s["num_blocks"] else 0,
        )
        yield GaugeMetricFamily("minicpm:kv_cache_blocks_used", "KV blocks held by requests.", used)
        yield GaugeMetricFamily("minicpm:kv_cache_blocks_total", "KV blocks in the cache.", s["num_blocks"])
        yield CounterMetricFamily("minicpm:num_preemptions", "Requests preempted.", s["preemptions"])
        yield CounterMetricFamily(
            "minicpm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s["prompt_tokens"]
        )
        yield CounterMetricFamily(
            "minicpm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", s["cached_prompt_tokens"]
        )
        kv = GaugeMetricFamily(
            "minicpm:kv_cache_info",
            "How the KV cache stores keys and values, and the bytes a token takes (1).",
            labels=["dtype", "bytes_per_token", "capacity_tokens"],
        )
        kv.add_metric([s["kv_cache_dtype"], str(s["kv_bytes_per_token"]), str(s["kv_capacity_tokens"])], 1)
        yield kv
        backend = GaugeMetricFamily(
            "minicpm:attention_backend_info", "The attention backend serving now (1).", labels=["backend"]
        )
        backend.add_metric([s["attention_backend"]], 1)
        yield backend
        yield CounterMetricFamily(
            "minicpm:kernel_failures",
            "Attention kernels that failed mid-serving (each moved the engine to its backend's fallback).",
            s["kernel_failures"],
        )
        yield CounterMetricFamily(
            "minicpm:request_errors", "Requests ended by an error inside an engine step.", s["request_errors"]
        )
        yield GaugeMetricFamily(
            "minicpm:cpu_threads", "Threads the CPU engine computes with now (0 on a GPU).", s.get("cpu_threads", 0)
        )
        yield CounterMetricFamily(
            "minicpm:cpu_thread_drops",
            "Times the CPU engine dropped threads because other processes kept cores busy.",
            s.get("cpu_thread_drops", 0),
        )
        yield CounterMetricFamily(
            "minicpm:cpu_reduced_seconds",
            "Seconds the CPU engine spent on fewer threads than it started with.",
            s.get("cpu_reduced_seconds", 0.0),
        )
        for name, text in KV_STORE_COUNTERS.items():
            yield CounterMetricFamily(f"minicpm:kv_store_{name}", text, s.get(f"kv_store_{name}", 0))
        yield GaugeMetricFamily(
            "minicpm:kv_store_bytes",
            "Bytes of block files in the persistent prefix cache's directory (0 without --kv-cache-dir).",
            s.get("kv_store_bytes", 0),
        )


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.prompt_tokens = Counter("minicpm:prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("minicpm:generation_tokens", "Tokens generated.", registry=r)
        self.success = Counter(
            "minicpm:request_success", "Finished requests by reason.", ["finished_reason"], registry=r
        )
        self.ttft = Histogram(
            "minicpm:time_to_first_token_seconds", "Time to first token.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "minicpm:inter_token_latency_seconds", "Time between tokens.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "minicpm:e2e_request_latency_seconds", "Request latency.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue = Histogram(
            "minicpm:request_queue_time_seconds", "Time waiting to be scheduled.", buckets=LATENCY_BUCKETS, registry=r
        )

    def bind(self, engine: EngineClient) -> None:
        self.registry.register(_EngineCollector(engine))

    def finished(self, choice: Any, seconds: float, counted_prompt: bool) -> None:
        if counted_prompt:
            self.prompt_tokens.inc(choice.prompt_tokens)
        self.generation_tokens.inc(len(choice.token_ids))
        self.success.labels(finished_reason=choice.finish_reason or "abort").inc()
        self.e2e.observe(seconds)
        if choice.queue_time is not None:
            self.queue.observe(choice.queue_time)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
