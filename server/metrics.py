"""Prometheus metrics of one server: request counts by route and status, tokens, latencies, engine gauges.

Each app gets a registry of its own (several apps can live in one process, as in tests).
The engine's gauges are read when /metrics is scraped, from whatever engine is attached.
"""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Buckets: a tiny model on CPU answers in milliseconds, GPT-2 at batch 32 in tens of ms per token.
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)
_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """The metrics; `engine()` returns the attached engine (None while loading) and
    `warmup()` the warm-up's (programs compiled, programs in all).

    Besides ours (`pgpt_*`), the gauges that inference gateways read to pick a replica, under
    vLLM's names (the Gateway API Inference Extension's model-server protocol): requests
    waiting, requests running, and KV-cache utilisation as a fraction 0..1 (here the share of
    slots in use: each running choice holds one slot's rows of the preallocated cache).
    """

    def __init__(self, engine: Callable[[], Any], warmup: Callable[[], tuple] = lambda: (0, 0),
                 batches: Callable[[], Any] = lambda: None):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("pgpt_http_requests", "HTTP requests by route and status code.",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("pgpt_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("pgpt_generation_tokens",
                                         "Generated tokens of finished requests (best_of candidates included).",
                                         registry=r)
        self.ttft = Histogram("pgpt_time_to_first_token_seconds",
                              "Streaming requests: arrival to the first text chunk.", buckets=_TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("pgpt_time_per_output_token_seconds",
                              "Streaming requests: (last chunk - first chunk) / (tokens per choice - 1).",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.latency = Histogram("pgpt_request_latency_seconds", "Completed requests: arrival to the last byte.",
                                 buckets=_LATENCY_BUCKETS, registry=r)

        def engine_value(name: str) -> Callable[[], float]:
            return lambda: float(getattr(engine(), name)) if engine() is not None else 0.0

        self.batch_lines = Counter("pgpt_batch_lines", "Batch API lines this process ran to an end, by outcome.",
                                   ["outcome"], registry=r)
        Gauge("pgpt_batch_lines_in_flight", "Batch API lines on the engine now.", registry=r).set_function(
            lambda: float(batches().in_flight) if batches() is not None else 0.0)
        for name, doc in (("queue_depth", "Choices waiting for a slot."),
                          ("active_slots", "Slots generating now (batch work included)."),
                          ("batch_yields", "Times batch work gave its slots back to interactive work."),
                          ("compile_count", "XLA compilations by the engine (flat after warm-up)."),
                          ("prefix_cache_hit_rate", "Prefix cache: prompt tokens served from it / prompt tokens "
                                                    "looked up, since start (0..1)."),
                          ("prefix_cache_hit_tokens", "Prefix cache: prompt tokens served from it, since start."),
                          ("prefix_cache_queried_tokens", "Prefix cache: prompt tokens looked up, since start."),
                          ("prefix_cache_blocks_used", "Prefix cache: pool blocks holding a cached prompt block."),
                          ("prefix_cache_blocks", "Prefix cache: pool blocks in all (0: no prefix cache)."),
                          ("spec_proposed_tokens", "Speculative decoding: tokens proposed (n-gram), since start."),
                          ("spec_accepted_tokens", "Speculative decoding: proposed tokens accepted, since start.")):
            Gauge(f"pgpt_engine_{name}", doc, registry=r).set_function(engine_value(name))
        Gauge("pgpt_ready", "1 once the model is loaded and warmed up.", registry=r).set_function(
            lambda: float(engine() is not None))
        Gauge("pgpt_warmup_programs_done", "Programs compiled so far by the warm-up.", registry=r).set_function(
            lambda: float(warmup()[0]))
        Gauge("pgpt_warmup_programs_total", "Programs the warm-up compiles.", registry=r).set_function(
            lambda: float(warmup()[1]))
        for name, attr, doc in (
                ("vllm:num_requests_waiting", "requests_waiting", "Requests accepted and waiting for a slot."),
                ("vllm:num_requests_running", "requests_running", "Requests with a choice generating."),
                ("vllm:kv_cache_usage_perc", "kv_cache_usage", "KV-cache utilisation, 0..1 (slots in use)."),
                ("vllm:gpu_cache_usage_perc", "kv_cache_usage", "The same utilisation, under vLLM's older name.")):
            Gauge(name, doc, registry=r).set_function(engine_value(attr))


    def batch_line(self, ok: bool) -> None:
        self.batch_lines.labels("ok" if ok else "error").inc()


class CountRequests:
    """ASGI middleware: counts requests by route template (not raw path: bounded label values) and status."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # what the outer error middleware sends if the app raises

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, str(status)).inc()
