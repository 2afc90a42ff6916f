"""Prometheus metrics, fed by the engine's observer hooks. One registry per app (tests run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from nitrofusion.engine import Engine, EngineObserver, Job

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class PrometheusObserver(EngineObserver):
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("nitro_queue_depth", "Requests waiting for the engine", registry=r)
        self.active_rows = Gauge("nitro_active_rows", "Images being denoised right now", registry=r)
        self.batch_size = Histogram("nitro_batch_size", "Rows per UNet call (before bucket padding)",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.step_latency = Histogram("nitro_unet_step_seconds", "Time of one engine step (one UNet call)",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.request_latency = Histogram("nitro_request_seconds", "Queue + generation time by step count",
                                         ["steps"], buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("nitro_images", "Images generated", registry=r)
        self.rejections = Counter("nitro_rejections", "Requests refused", ["reason"], registry=r)
        self.cancellations = Counter("nitro_cancellations", "Requests cancelled (client gone, replaced)",
                                     registry=r)
        self.failures = Counter("nitro_failures", "Requests that failed", ["reason"], registry=r)
        self.auto_steps = Histogram("nitro_auto_steps", 'Steps chosen for "steps": "auto" requests',
                                    buckets=(1, 2, 3, 4), registry=r)
        self.auto_error = Histogram("nitro_auto_latency_error_seconds", 'For "auto" requests: actual minus '
                                    "predicted admission-to-image time", buckets=(-5, -1, -0.25, -0.05, 0, 0.05,
                                                                                   0.25, 1, 5), registry=r)

    def bind(self, engine: Engine) -> None:
        self.queue_depth.set_function(lambda: engine.queue_depth)
        self.active_rows.set_function(lambda: engine.active_rows)

    # EngineObserver hooks (called on the engine thread; prometheus_client is thread-safe)
    def iteration(self, batch_size: int, bucket: int, seconds: float) -> None:
        self.batch_size.observe(batch_size)
        self.step_latency.observe(seconds)

    def finished(self, job: Job, seconds: float, images: int) -> None:
        self.request_latency.labels(steps=str(job.steps)).observe(seconds)
        self.images.inc(images)
        if job.auto_steps is not None:
            self.auto_steps.observe(job.steps)
            if job.predicted_s is not None:
                self.auto_error.observe(seconds - job.predicted_s)

    def rejected(self, reason: str) -> None:
        self.rejections.labels(reason=reason).inc()

    def cancelled(self, job: Job) -> None:
        self.cancellations.inc()

    def failed(self, job: Job, reason: str) -> None:
        self.failures.labels(reason=reason).inc()
