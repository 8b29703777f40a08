"""Prometheus metrics of one app, in a registry of its own so that several apps in a process (tests, replicas) never
collide."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2)


ENGINE_GAUGES = {
    "queue_depth": ("llmpq_queue_depth", "Requests waiting in the engine's queue"),
    "resumed_requests": ("llmpq_requests_resumed",
                         "Requests prefilled again with their tokens, on new stages (a re-plan) or a reopened ring"),
    "pipeline_down_s": ("llmpq_pipeline_down_seconds",
                        "How long a lost stage has kept requests waiting (exported only while it does)"),
}


class _EngineGauges:
    """Fields of the engine's health (ENGINE_GAUGES), read at scrape time, each exported only while reported."""

    def __init__(self, read: Callable[[], dict]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        health = self._read()
        for key, (name, doc) in ENGINE_GAUGES.items():
            if health.get(key) is not None:
                yield GaugeMetricFamily(name, doc, value=health[key])


class ServerMetrics:
    def __init__(self, health: Callable[[], dict]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("llmpq_requests", "Generation requests by endpoint and HTTP status",
                                ["endpoint", "status"], registry=self.registry)
        self.engine_errors = Counter("llmpq_engine_errors", "Requests the engine failed, mid-stream ones included",
                                     registry=self.registry)
        self.cancelled = Counter("llmpq_requests_cancelled", "Requests whose client went away before the end",
                                 registry=self.registry)
        self.running = Gauge("llmpq_requests_running", "Requests handed to the engine and not finished",
                             registry=self.registry)
        self.ttft = Histogram("llmpq_time_to_first_token_seconds",
                              "From handing a request to the engine to its first token", buckets=TTFT_BUCKETS,
                              registry=self.registry)
        self.tpot = Histogram("llmpq_time_per_output_token_seconds",
                              "Mean time between a request's tokens after the first", buckets=TPOT_BUCKETS,
                              registry=self.registry)
        self.registry.register(_EngineGauges(health))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestCounter:
    """ASGI middleware counting requests to `paths` by the status they were answered with, whether by a route or by
    an error handler (e.g. a body that fails validation)."""

    def __init__(self, app: ASGIApp, counter: Counter, paths: frozenset[str]) -> None:
        self.app = app
        self.counter = counter
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            # The router has put the matched route into the scope by now; matching on it rather than on the raw path
            # keeps the label's values to the few known paths, whatever URLs clients send.
            route = scope.get("route")
            if message["type"] == "http.response.start" and route is not None and route.path in self.paths:
                self.counter.labels(route.path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
