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
    """The metrics; `engine()` returns the attached engine (None while loading)."""

    def __init__(self, engine: Callable[[], Any]):
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

        for name, doc in (("queue_depth", "Choices waiting for a slot."),
                          ("active_slots", "Slots generating now."),
                          ("compile_count", "XLA compilations by the engine (flat after warm-up).")):
            Gauge(f"pgpt_engine_{name}", doc, registry=r).set_function(engine_value(name))
        Gauge("pgpt_ready", "1 once the model is loaded and warmed up.", registry=r).set_function(
            lambda: float(engine() is not None))


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
