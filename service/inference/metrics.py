"""Prometheus metrics of the inference path, on a registry per app (tests build many apps).

With several API processes on one port (`thaw api`, `THAW_API_PROCESSES`), a scrape reaches
whichever process accepts it, so each process writes its values to files in the folder
`PROMETHEUS_MULTIPROC_DIR` names (prometheus_client's multiprocess mode, chosen when the client
is imported) and a scrape reads all of them: counters and histograms summed over the processes,
gauges as each one's `multiprocess_mode` says.
"""

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"

# The version id only: whoever holds the scrape token reads every tenant's series, and a
# model's name is its tenant's own (an id names a version across tenants without revealing it).
LABELS = ("version_id",)


class InferenceMetrics:
    def __init__(self) -> None:
        # prometheus_client chose how it stores values when it was imported, by this variable.
        self.pooled = MULTIPROCESS_DIR in os.environ
        self.registry = CollectorRegistry()
        self.request_seconds = Histogram(
            "thaw_predict_request_seconds",
            "Predict call latency, from parsed request to answer.",
            LABELS,
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.images = Counter(
            "thaw_predict_images", "Images received by predict.", LABELS, registry=self.registry
        )
        self.batch_size = Histogram(
            "thaw_inference_batch_size",
            "Images per forward pass.",
            LABELS,
            registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.queue_depth = Gauge(
            "thaw_inference_queue_depth",
            "Inputs (images or texts) of accepted predict calls not yet in a forward pass.",
            LABELS,
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        # Where an accepted call's time goes: waiting for its pass, and the pass itself
        # (batch normalisation or padding, then the model); their sum bounds its latency.
        self.queue_seconds = Histogram(
            "thaw_inference_queue_seconds",
            "Time a predict request waited in its model's queue for a forward pass.",
            LABELS,
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.forward_seconds = Histogram(
            "thaw_inference_forward_seconds",
            "Time of one forward pass, from gathered requests to logits.",
            LABELS,
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.rejected = Counter(
            "thaw_inference_rejected",
            "Predict requests refused with 503 because their model's queue was full.",
            LABELS,
            registry=self.registry,
        )
        # Monitoring: the latest closed window of each version (whichever process closed it).
        self.shift_score = Gauge(
            "thaw_monitor_shift_score",
            "The latest window's squared MMD against the version's reference profile.",
            LABELS,
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.shift_p_value = Gauge(
            "thaw_monitor_shift_p_value",
            "The latest window's permutation p-value of the shift test.",
            LABELS,
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.shifted = Gauge(
            "thaw_monitor_shifted",
            "1 when the latest window shifted (p-value below the significance), else 0.",
            LABELS,
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.estimated_accuracy = Gauge(
            "thaw_monitor_estimated_accuracy",
            "The latest window's accuracy estimated from calibrated confidences.",
            LABELS,
            registry=self.registry,
            multiprocess_mode="mostrecent",
        )
        self.monitor_failures = Counter(
            "thaw_monitor_failures",
            "Predictions or windows monitoring could not record or test (predict answered).",
            registry=self.registry,
        )
        self.capture_failures = Counter(
            "thaw_capture_failures",
            "Inputs a capturing model could not keep (predict answered; the label can still be "
            "fed back, the input will not train an update).",
            registry=self.registry,
        )
        self.webhook_deliveries = Counter(
            "thaw_webhook_deliveries",
            "Webhook delivery attempts by outcome: delivered (2xx), retried (failed, another "
            "attempt due after backoff) or failed (given up, or its URL refused).",
            ("outcome",),
            registry=self.registry,
        )
        self.rejected_at_admission = Counter(
            "thaw_predict_rejected_at_admission",
            "Predict calls refused with 503 on arrival: THAW_PREDICT_MAX_IN_FLIGHT calls were "
            "already in progress in this process.",
            registry=self.registry,
        )
        self.cache_hits = Counter(
            "thaw_model_cache_hits",
            "Predict calls served by a loaded model.",
            LABELS,
            registry=self.registry,
        )
        self.cache_loads = Counter(
            "thaw_model_cache_loads", "Model loads (cache misses).", LABELS, registry=self.registry
        )
        self.cache_evictions = Counter(
            "thaw_model_cache_evictions", "Models unloaded.", LABELS, registry=self.registry
        )
        self.backend = Gauge(
            "thaw_inference_backend",
            "1 per loaded version: the backend serving it (onnx or torch) and, for torch, why "
            "not ONNX Runtime.",
            (*LABELS, "backend", "reason"),
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.cache_bytes = Gauge(
            "thaw_model_cache_bytes",
            "Estimated memory of the loaded models (every API process's, summed).",
            registry=self.registry,
            multiprocess_mode="livesum",
        )

    def unloaded(self, version_id: str, backend: str, reason: str) -> None:
        """A version left this process's cache: its `thaw_inference_backend` series goes, or
        with pooled metrics (which cannot drop a series) reads 0 from this process."""
        if self.pooled:
            self.backend.labels(version_id, backend, reason).set(0)
        else:
            self.backend.remove(version_id, backend, reason)

    def exposition(self) -> bytes:
        """What a scrape answers: this process's metrics, or every API process's pooled."""
        if not self.pooled:
            return generate_latest(self.registry)
        pooled = CollectorRegistry()
        MultiProcessCollector(pooled)
        return generate_latest(pooled)

    def close(self) -> None:
        """At the process's exit: its live gauges leave the pool (its counters stay, as
        Prometheus expects of a counter)."""
        if self.pooled:
            mark_process_dead(os.getpid())
