"""The server's /metrics in Prometheus' text format, with the well-kept prometheus_client.

Each Service has its own registry (nothing global, so several servers in one process, or the
tests, never share counters). Queue length, running rows and sampled tokens are read from the
batcher when scraped; time to first token and request latency are histograms observed by the
app as requests go; connections the server closed or refused (the OverloadLog's counts, by
kind) are read at scrape time once the server is attached (`watch_connections`).
"""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# The OverloadLog kinds that close or refuse a connection (gpt2tf.serve.server)
CONNECTION_REASONS = ("connections", "header_timeout", "body_timeout", "accept")
SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _BatcherCounters:
    """Counters the worker thread keeps as plain integers, exposed at scrape time."""

    def __init__(self, batcher):
        self.batcher = batcher

    def collect(self):
        b = self.batcher
        yield CounterMetricFamily("gpt2tf_tokens_generated", "Tokens sampled for requests",
                                  value=b.tokens_sampled)
        yield CounterMetricFamily("gpt2tf_decode_steps", "Decode steps run", value=b.batches)
        yield CounterMetricFamily("gpt2tf_rows_cancelled",
                                  "Rows dropped because their client went away",
                                  value=b.rows_cancelled)


class _ConnectionCounters:
    """Connections closed or refused by the server's own limits, by reason, at scrape time."""

    def __init__(self, counts):
        self.counts = counts  # an OverloadLog's Counter: kind -> times since start

    def collect(self):
        family = CounterMetricFamily(
            "gpt2tf_connections_closed", "Connections closed or refused by the server's limits"
            " (connections: --max_connections; header_timeout, body_timeout; accept: out of file"
            " descriptors)", labels=["reason"])
        for kind in CONNECTION_REASONS:
            family.add_metric([kind], self.counts.get(kind, 0))
        yield family


class Metrics:
    def __init__(self, batcher):
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge("gpt2tf_queued_rows", "Rows waiting for room in the batch",
              registry=r).set_function(lambda: batcher.queued_rows)
        Gauge("gpt2tf_running_rows", "Rows being decoded",
              registry=r).set_function(lambda: batcher.active_rows)
        r.register(_BatcherCounters(batcher))
        self.requests = Counter("gpt2tf_requests", "Completion requests by outcome",
                                ["outcome"], registry=r)
        self.time_to_first_token = Histogram(
            "gpt2tf_time_to_first_token_seconds", "From a request's arrival to its first token",
            buckets=SECONDS, registry=r)
        self.latency = Histogram("gpt2tf_request_seconds",
                                 "From a request's arrival to its last token", buckets=SECONDS,
                                 registry=r)

    def watch_connections(self, counts) -> None:
        """Export the server's OverloadLog counts (called once, when the server is built)."""
        self.registry.register(_ConnectionCounters(counts))

    def render(self) -> bytes:
        return generate_latest(self.registry)
