"""The service's metrics (docs/operations.md), through Ray's metrics agent.

Recorded where the work happens, all in the server replicas: requests, latency and in-flight
requests by the data plane (for every protocol), decode time by each model's host, and images,
batch size, queue wait and inference time by each model. Ray exports
them with a `ray_` prefix at every node's metrics port (`--metrics-port`, default 8080),
next to Ray Serve's own `ray_serve_*` series.
"""

from __future__ import annotations

from functools import cache

from ray.serve.metrics import Counter, Gauge, Histogram

LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
FAST_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


class RequestMetrics:
    def __init__(self):
        self.requests = Counter(
            "convnext_serve_requests_total",
            description="Requests by endpoint, model, version and status code.",
            tag_keys=("endpoint", "model", "version", "status"),
        )
        self.duration = Histogram(
            "convnext_serve_request_duration_seconds",
            description="End-to-end request latency in the server replica.",
            boundaries=LATENCY_BUCKETS,
            tag_keys=("endpoint", "model", "version"),
        )
        self.decode = Histogram(
            "convnext_serve_decode_seconds",
            description="Time to decode and resize one image.",
            boundaries=FAST_BUCKETS,
            tag_keys=("endpoint",),
        )
        self.in_flight = Gauge(
            "convnext_serve_in_flight_requests",
            description="Requests being handled by this server replica.",
            tag_keys=("endpoint",),
        )


class ModelMetrics:
    def __init__(self, model: str, version: str):
        tags = {"model": model, "version": version}
        self.images = Counter(
            "convnext_serve_images_total",
            description="Images run through the model.",
            tag_keys=("model", "version"),
        )
        self.batch_size = Histogram(
            "convnext_serve_batch_size",
            description="Images per batch the model ran.",
            boundaries=BATCH_BUCKETS,
            tag_keys=("model", "version"),
        )
        self.inference = Histogram(
            "convnext_serve_batch_inference_seconds",
            description="Time to run one batch through the model.",
            boundaries=LATENCY_BUCKETS,
            tag_keys=("model", "version"),
        )
        self.queue_wait = Histogram(
            "convnext_serve_queue_wait_seconds",
            description="Time an image waited in the replica before its batch started.",
            boundaries=[*FAST_BUCKETS, 2.5, 5, 10],
            tag_keys=("model", "version"),
        )
        self.info = Gauge(
            "convnext_serve_model_info",
            description="1 for each served model, labelled with what it runs on.",
            tag_keys=("model", "version", "arch", "task", "device", "precision"),
        )
        for metric in (self.images, self.batch_size, self.inference, self.queue_wait):
            metric.set_default_tags(dict(tags))  # Ray adds its tags to the dict in place


class PipelineMetrics:
    def __init__(self):
        self.stage = Histogram(
            "convnext_serve_pipeline_stage_seconds",
            description="Time a pipeline request spent in each stage: decode (the images), "
            "detect (the detector) and second (every box's second model).",
            boundaries=LATENCY_BUCKETS,
            tag_keys=("pipeline", "stage"),
        )
        self.boxes = Counter(
            "convnext_serve_pipeline_boxes_total",
            description="Boxes a pipeline found, by what became of them: sent (to a second "
            "model), unmatched (no step takes the label) or held_back (beyond the bounds, "
            "empty).",
            tag_keys=("pipeline", "outcome"),
        )


@cache
def pipeline_metrics() -> PipelineMetrics:
    """The pipeline metrics of this process."""
    return PipelineMetrics()


@cache
def request_metrics() -> RequestMetrics:
    """The request metrics of this process (Ray's metrics are registered once a process)."""
    return RequestMetrics()
