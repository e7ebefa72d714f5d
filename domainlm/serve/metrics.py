"""The server's Prometheus metrics (GET /metrics, text format): requests by route and status,
prompt and generated tokens, latency and time to first token, the scheduler's queue and batch,
and the open connections. One registry per server, so servers in one process stay apart."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from domainlm.serve.scheduler import Stats

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _SchedulerCollector:
    """Counters read from the scheduler's own statistics at scrape time."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[CounterMetricFamily]:
        s = self.stats
        yield CounterMetricFamily("domainlm_decode_steps", "Decoding steps run (every sequence "
                                  "in the batch advances one token per step)", value=s.steps)
        yield CounterMetricFamily("domainlm_decode_rows", "Sequences advanced, summed over "
                                  "steps (divided by steps: the mean batch size)", value=s.rows)
        yield CounterMetricFamily("domainlm_prefills", "Prompts prefilled (the n choices of a "
                                  "request share one)", value=s.prefills)


class Metrics:
    """Everything /metrics reports for one server."""

    def __init__(self, stats: Stats, connections: Callable[[], tuple[int, int]]) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("domainlm_requests", "HTTP requests answered, by route and "
                                "status", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("domainlm_prompt_tokens", "Prompt tokens of completed "
                                     "generation requests", registry=r)
        self.generation_tokens = Counter("domainlm_generation_tokens", "Tokens generated",
                                         registry=r)
        self.latency = Histogram("domainlm_request_latency_seconds", "Time from a request's "
                                 "arrival to its last byte, by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.first_token = Histogram("domainlm_time_to_first_token_seconds", "Time from a "
                                     "streamed request's arrival to its first text",
                                     buckets=LATENCY_BUCKETS, registry=r)
        Gauge("domainlm_requests_waiting", "Sequences waiting to join the batch",
              registry=r).set_function(lambda: stats.waiting)
        Gauge("domainlm_requests_running", "Sequences in the batch",
              registry=r).set_function(lambda: stats.running)
        Gauge("domainlm_connections_open", "Open client connections",
              registry=r).set_function(lambda: connections()[0])
        Gauge("domainlm_connections_idle", "Open connections waiting for a request",
              registry=r).set_function(lambda: connections()[1])
        r.register(_SchedulerCollector(stats))

    def render(self) -> tuple[bytes, str]:
        """The text exposition format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
