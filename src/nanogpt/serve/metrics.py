"""What `GET /metrics` reports, in the Prometheus text format, through `prometheus_client`.

Each server has its own registry (two servers in one process, as in the tests, never share counts):
queue depth, active sequences and the scheduler's profile (`Engine.stats_now()`: seconds by phase, decode rows and
keys) are read from the engine when scraped; tokens, requests, request latency and time to first token are
counted as they happen (the engine reports through `on_event`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from nanogpt.errors import missing_extra

try:
    from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from prometheus_client.core import CounterMetricFamily
    from prometheus_client.registry import Collector
except ImportError as e:
    raise missing_extra(f"nanogpt serve needs prometheus_client ({e})", "serve") from None

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class EngineCollector(Collector):
    """The engine's `stats`, as counters read at each scrape (the scheduler keeps them; nothing per step here)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Iterator[CounterMetricFamily]:
        st = self.engine.stats_now()
        phases = CounterMetricFamily(
            "nanogpt_engine_seconds", "the scheduler's time by phase", labels=["phase"]
        )
        for phase, seconds in st.seconds.items():
            phases.add_metric([phase], seconds)
        yield phases
        for name, what, value in (
            ("decode_steps", "decode forwards (one new token for every stream)", st.decode_steps),
            ("decode_rows", "streams in decode forwards, summed over them", st.decode_rows),
            ("prefill_tokens", "prompt tokens read", st.prefill_tokens),
        ):
            yield CounterMetricFamily(f"nanogpt_{name}", what, value=value)
        keys = CounterMetricFamily(
            "nanogpt_decode_keys",
            "attention keys of decode rows: read (up to the longest row of the step) and needed (each row's own)",
            labels=["kind"],
        )
        keys.add_metric(["read"], st.keys_read)
        keys.add_metric(["needed"], st.keys_needed)
        yield keys


class Metrics:
    def __init__(self, engine: Any) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        queued = Gauge("nanogpt_queue_depth", "requests waiting for a slot in the batch", registry=r)
        queued.set_function(lambda: engine.queued)
        active = Gauge(
            "nanogpt_active_sequences", "sequences in the batch (reading, generating, scored)", registry=r
        )
        active.set_function(lambda: engine.active)
        r.register(EngineCollector(engine))
        self.tokens = Counter("nanogpt_generated_tokens", "new tokens sent to clients", registry=r)
        self.requests = Counter("nanogpt_requests", "HTTP requests answered", ["path", "status"], registry=r)
        self.latency = Histogram(
            "nanogpt_request_latency_seconds",
            "time from request to the last byte of the answer",
            ["path"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "nanogpt_time_to_first_token_seconds",
            "time from submission to the first new token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def on_event(self, kind: str, value: float) -> None:
        """The engine's report: a token sent ("token") or a first token's delay ("ttft")."""
        if kind == "token":
            self.tokens.inc(value)
        elif kind == "ttft":
            self.ttft.observe(value)

    def request(self, path: str, status: int, seconds: float) -> None:
        self.requests.labels(path, str(status)).inc()
        self.latency.labels(path).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE
