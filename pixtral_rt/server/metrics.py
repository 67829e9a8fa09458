"""Prometheus metrics of the HTTP server (GET /metrics), one registry per app.

Engine state (running / waiting requests, KV pages per state, token counters, preemptions) is read from `engine.metrics()` at
scrape time, so it is never stale; latencies are measured by the server as clients see them: time to first
token from the request's arrival (image fetch and tokenisation included), and the gap between tokens.
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_GAUGES = [("running", "pixtral_rt_requests_running", "requests in the running batch"),
           ("waiting", "pixtral_rt_requests_waiting", "requests queued, waiting for a batch slot or KV pages"),
           ("kv_pages_used", "pixtral_rt_kv_pages_used", "KV-cache pages held by running requests"),
           ("kv_pages_cached", "pixtral_rt_kv_pages_cached",
            "KV-cache pages held by no request that keep a cached prefix (evicted least recently used first)"),
           ("kv_pages_free", "pixtral_rt_kv_pages_free", "KV-cache pages free"),
           ("kv_pages_total", "pixtral_rt_kv_pages_total", "KV-cache pages in all")]
_COUNTERS = [("prompt_tokens_total", "pixtral_rt_prompt_tokens", "prompt tokens admitted (text + image)"),
             ("generation_tokens_total", "pixtral_rt_generation_tokens", "tokens generated"),
             ("cached_prompt_tokens_total", "pixtral_rt_cached_prompt_tokens", "prompt tokens from the prefix cache"),
             ("requests_finished_total", "pixtral_rt_requests_finished", "requests finished"),
             ("preemptions_total", "pixtral_rt_preemptions",
              "running requests preempted when KV pages ran out (resumed later by recomputation)")]


class _EngineCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        m = self.engine.metrics()
        for key, name, doc in _GAUGES:
            yield GaugeMetricFamily(name, doc, value=m[key])
        for key, name, doc in _COUNTERS:
            yield CounterMetricFamily(name, doc, value=m[key])  # exposed as <name>_total

    def describe(self):
        return []  # names are fixed; no need to call the engine when registering


class ServerMetrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        self.ttft = Histogram("pixtral_rt_time_to_first_token_seconds",
                              "request arrival to its first generated token",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
                              registry=self.registry)
        self.itl = Histogram("pixtral_rt_inter_token_latency_seconds", "time between two tokens of one answer",
                             buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56),
                             registry=self.registry)

        self.prepare = Histogram("pixtral_rt_request_prepare_seconds",
                                 "host work before a request reaches the engine, by stage: body (receiving it, from "
                                 "its headers), parse (JSON and validation), encode (images and tokens)",
                                 labelnames=("stage",),
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
                                 registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
