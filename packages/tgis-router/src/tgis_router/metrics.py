"""Prometheus series with TGIS names, plus time-to-first-token and inter-token latency."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)

request_count = Counter("tgi_request_count", "Generation requests received (inputs)", ["kind"])
request_success = Counter("tgi_request_success", "Inputs finished successfully", ["stop_reason", "kind"])
request_failure = Counter("tgi_request_failure", "Calls or inputs that failed", ["err"])
request_input_length = Histogram("tgi_request_input_length", "Input tokens per input", buckets=_TOKEN_BUCKETS)
request_generated_tokens = Histogram(
    "tgi_request_generated_tokens", "Generated tokens per input", buckets=_TOKEN_BUCKETS
)
request_queue_duration = Histogram(
    "tgi_request_queue_duration", "Seconds from arrival to prefill", buckets=_LATENCY_BUCKETS
)
request_inference_duration = Histogram(
    "tgi_request_inference_duration", "Seconds from prefill to finish", buckets=_LATENCY_BUCKETS
)
request_duration = Histogram("tgi_request_duration", "Seconds from arrival to finish", buckets=_LATENCY_BUCKETS)
request_time_to_first_token = Histogram(
    "tgi_request_time_to_first_token", "Seconds from arrival to the first generated token", buckets=_LATENCY_BUCKETS
)
request_inter_token_latency = Histogram(
    "tgi_request_inter_token_latency", "Seconds between consecutive tokens of an input", buckets=_LATENCY_BUCKETS
)
batch_inference_batch_size = Histogram(
    "tgi_batch_inference_batch_size", "Requests per model step", ["method"], buckets=_TOKEN_BUCKETS
)
batch_inference_duration = Histogram(
    "tgi_batch_inference_duration", "Seconds per model step", ["method"], buckets=_LATENCY_BUCKETS
)
batch_inference_count = Counter("tgi_batch_inference_count", "Model steps", ["method"])
batch_current_size = Gauge("tgi_batch_current_size", "Requests in the running batch")
queue_size = Gauge("tgi_queue_size", "Inputs waiting for a batch")
requests_in_flight = Gauge("tgi_requests_in_flight", "Inputs queued or running")
batch_weight = Gauge("tgi_batch_weight_bytes", "Projected peak memory of the running batch")
batch_weight_limit = Gauge("tgi_batch_weight_limit_bytes", "Memory available to batches")
prefill_weight_limit_exceeded = Counter(
    "tgi_prefill_weight_limit_exceeded", "Admissions where a waiting request did not fit in memory"
)
prefill_padding_limit_exceeded = Counter(
    "tgi_prefill_padding_limit_exceeded", "Admissions where a waiting request would pad the prefill too much"
)
prefill_tokens_limit_exceeded = Counter(
    "tgi_prefill_tokens_limit_exceeded", "Admissions where the prefill pass itself would be too large"
)
queue_jumps = Counter("tgi_queue_jump", "Requests admitted ahead of an earlier one that did not fit")
add_on_waits = Counter("tgi_batch_add_on_wait", "Steps a small add-on waited (MAX_WAITING_TOKENS)")
kv_cache_blocks = Gauge("tgi_kv_cache_blocks", "Blocks of the paged KV cache")
kv_cache_blocks_used = Gauge("tgi_kv_cache_blocks_used", "Blocks of the paged KV cache held by requests")
request_preemptions = Counter(
    "tgi_request_preemptions", "Requests preempted when the KV cache ran full (recomputed later)"
)


class StepSeries:
    """The per-step series of one kind of step (TGIS's ``method`` label), looked up once."""

    def __init__(self, method: str):
        self.duration = batch_inference_duration.labels(method=method)
        self.batch_size = batch_inference_batch_size.labels(method=method)
        self.count = batch_inference_count.labels(method=method)


STEP_SERIES = {method: StepSeries(method) for method in ("prefill", "next_token")}
