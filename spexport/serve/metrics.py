"""The server's Prometheus metrics (GET /metrics), one registry per app.

The HTTP edge records requests by status and queue depth; the execution side calls `tokens`, `first_token`,
`inter_token` and `batch` as it generates (all are cheap and thread-safe)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Counters, gauges and histograms of one server, labelled by task where a request has one."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("spexport_requests", "HTTP requests answered, by route, status and task",
                                ["route", "status", "task"], registry=r)
        self.prompt_tokens = Counter("spexport_prompt_tokens", "Prompt tokens admitted", ["task"], registry=r)
        self.completion_tokens = Counter("spexport_completion_tokens", "Tokens generated", ["task"], registry=r)
        self.queue_depth = Gauge("spexport_queue_depth", "Generations admitted and not finished", registry=r)
        self.batch_size = Histogram("spexport_batch_size", "Rows per model step", buckets=BATCH_BUCKETS, registry=r)
        self.ttft = Histogram("spexport_time_to_first_token_seconds", "From admission to a generation's first token",
                              ["task"], buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("spexport_inter_token_latency_seconds", "Between two tokens of one generation",
                             ["task"], buckets=LATENCY_BUCKETS, registry=r)

    def request(self, route: str, status: int, task: str = "") -> None:
        self.requests.labels(route, str(status), task).inc()

    def tokens(self, task: str, prompt: int = 0, completion: int = 0) -> None:
        if prompt:
            self.prompt_tokens.labels(task).inc(prompt)
        if completion:
            self.completion_tokens.labels(task).inc(completion)

    def first_token(self, task: str, seconds: float) -> None:
        self.ttft.labels(task).observe(seconds)

    def inter_token(self, task: str, seconds: float) -> None:
        self.itl.labels(task).observe(seconds)

    def batch(self, rows: int) -> None:
        self.batch_size.observe(rows)

    def queue(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
