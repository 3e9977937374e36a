"""Prometheus series as TGIS names them (name, kind and labels of its router's table), and those
added here: time to first token, inter-token latency, KV-cache blocks, batch weight, preemptions.

TGIS's exporter writes a counter's samples under its bare name (``tgi_request_count``);
prometheus_client under ``NAME_total``. Dashboards are written against either, so each counter is
scraped under both: the counters live in a registry of their own, and ``_CountersUnderBothNames``
writes every sample twice into the default one. ``/metrics`` serves the Prometheus text format
0.0.4, as TGIS does (``exposition``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Summary,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
# TGIS's makeup label: what kinds of request a step holds; every step here holds single requests.
STEP_MAKEUP = "single_only"

_COUNTERS = CollectorRegistry(auto_describe=True)
disable_created_metrics()  # no *_created series: TGIS's exporter has none


def _counter(name: str, documentation: str, labels: Sequence[str] = ()) -> Counter:
    return Counter(name, documentation, labels, registry=_COUNTERS)


class _CountersUnderBothNames(Collector):
    def collect(self) -> Iterator[Metric]:
        for family in _COUNTERS.collect():
            both = Metric(family.name, family.documentation, "counter")
            for sample in family.samples:
                if sample.name == f"{family.name}_total":  # not _created
                    both.add_sample(family.name, sample.labels, sample.value)
                    both.add_sample(sample.name, sample.labels, sample.value)
            yield both


REGISTRY.register(_CountersUnderBothNames())


def exposition() -> tuple[bytes, str]:
    """The body and content type of a scrape."""
    return generate_latest(REGISTRY), CONTENT_TYPE_PLAIN_0_0_4


# Requests --------------------------------------------------------------------------------------
request_count = _counter("tgi_request_count", "Generate calls (a batch of n counts as 1)", ["kind"])
request_input_count = _counter("tgi_request_input_count", "Generate inputs (a batch of n counts as n)")
request_success = _counter("tgi_request_success", "Inputs finished successfully", ["stop_reason", "kind"])
request_failure = _counter("tgi_request_failure", "Calls or inputs that failed, by error", ["err"])
request_max_new_tokens = Histogram(
    "tgi_request_max_new_tokens", "max_new_tokens of each input, after defaults", buckets=_TOKEN_BUCKETS
)
request_input_length = Histogram("tgi_request_input_length", "Input tokens per input", buckets=_TOKEN_BUCKETS)
request_raw_input_length = Summary(
    "tgi_request_raw_input_length", "Input tokens per input before truncation, too-long inputs included"
)
request_validation_duration = Histogram(
    "tgi_request_validation_duration", "Seconds from arrival to queued (validation)", buckets=_LATENCY_BUCKETS
)
request_queue_duration = Histogram(
    "tgi_request_queue_duration", "Seconds from arrival to prefill", buckets=_LATENCY_BUCKETS
)
request_generated_tokens = Histogram(
    "tgi_request_generated_tokens", "Generated tokens per input", buckets=_TOKEN_BUCKETS
)
request_total_tokens = Histogram(
    "tgi_request_total_tokens", "Input plus generated tokens per input", buckets=_TOKEN_BUCKETS
)
request_inference_duration = Histogram(
    "tgi_request_inference_duration", "Seconds from prefill to finish", buckets=_LATENCY_BUCKETS
)
request_mean_time_per_token_duration = Histogram(
    "tgi_request_mean_time_per_token_duration",
    "Inference seconds per generated token, per input",
    buckets=_LATENCY_BUCKETS,
)
request_duration = Histogram("tgi_request_duration", "Seconds from arrival to finish", buckets=_LATENCY_BUCKETS)
request_time_to_first_token = Histogram(
    "tgi_request_time_to_first_token", "Seconds from arrival to the first generated token", buckets=_LATENCY_BUCKETS
)
request_inter_token_latency = Histogram(
    "tgi_request_inter_token_latency", "Seconds between consecutive tokens of an input", buckets=_LATENCY_BUCKETS
)
request_preemptions = _counter(
    "tgi_request_preemptions", "Requests preempted when the KV cache ran full (recomputed later)"
)

# Steps (TGIS's method: "prefill" for a step with prompt tokens, else "next_token") ----------------
batch_inference_count = _counter("tgi_batch_inference_count", "Model steps", ["method"])
batch_inference_success = _counter("tgi_batch_inference_success", "Model steps that succeeded", ["method"])
batch_inference_failure = _counter(
    "tgi_batch_inference_failure", "Model steps that failed (oom, connection, error)", ["method", "reason"]
)
batch_inference_batch_size = Histogram(
    "tgi_batch_inference_batch_size", "Requests per model step", ["method"], buckets=_TOKEN_BUCKETS
)
batch_inference_duration = Histogram(
    "tgi_batch_inference_duration",
    "Seconds per model step, as the router waits for it",
    ["method", "makeup"],
    buckets=_LATENCY_BUCKETS,
)
batch_inference_forward_duration = Histogram(
    "tgi_batch_inference_forward_duration",
    "Seconds from a step's launch on the shard to its tokens (it launches while the step before it computes)",
    ["method", "makeup"],
    buckets=_LATENCY_BUCKETS,
)
batch_inference_tokproc_duration = Histogram(
    "tgi_batch_inference_tokproc_duration",
    "Seconds the router spent handing out a step's tokens (text, stopping, events)",
    ["method", "makeup"],
    buckets=_LATENCY_BUCKETS,
)
batch_next_tokens = Summary("tgi_batch_next_tokens", "Prompt tokens in each step with prompt tokens")
batch_concatenation_count = _counter(
    "tgi_batch_concatenation_count", "Steps in which new requests joined a running batch"
)

# The batch and the queue --------------------------------------------------------------------------
batch_current_size = Gauge("tgi_batch_current_size", "Requests in the running batch")
batch_input_tokens = Gauge("tgi_batch_input_tokens", "Input tokens of the requests in the running batch")
batch_max_remaining_tokens = Gauge(
    "tgi_batch_max_remaining_tokens", "Most tokens any request of the running batch may still generate"
)
queue_size = Gauge("tgi_queue_size", "Inputs waiting for a batch")
requests_in_flight = Gauge("tgi_requests_in_flight", "Inputs queued or running")
batch_weight = Gauge("tgi_batch_weight_bytes", "Projected peak memory of the running batch")
batch_weight_limit = Gauge("tgi_batch_weight_limit_bytes", "Memory available to batches")
kv_cache_blocks = Gauge("tgi_kv_cache_blocks", "Blocks of the paged KV cache")
kv_cache_blocks_used = Gauge("tgi_kv_cache_blocks_used", "Blocks of the paged KV cache held by requests")

# Admission --------------------------------------------------------------------------------------
prefill_weight_limit_exceeded = _counter(
    "tgi_prefill_weight_limit_exceeded", "Admissions where a waiting request did not fit in memory"
)
prefill_padding_limit_exceeded = _counter(
    "tgi_prefill_padding_limit_exceeded", "Admissions where a waiting request would pad the prefill too much"
)
prefill_tokens_limit_exceeded = _counter(
    "tgi_prefill_tokens_limit_exceeded", "Admissions where the prefill pass itself would be too large"
)
queue_jumps = _counter("tgi_queue_jump", "Requests admitted ahead of an earlier one that did not fit")
# TGIS counts admissions its second, finer memory estimate allowed; admission here makes one exact
# estimate, so this stays at 0 and is kept for dashboards that read it.
granular_batch_addition = _counter(
    "tgi_granular_batch_addition", "Admissions a finer memory estimate allowed (one exact estimate here: 0)"
)
add_on_waits = _counter("tgi_batch_add_on_wait", "Steps a small add-on waited (MAX_WAITING_TOKENS)")

# Prompt prefixes and the Tokenize call -------------------------------------------------------------
prompt_load_failure = _counter("tgi_prompt_load_failure", "Prompt prefixes that could not be loaded")
prompt_load_duration = Histogram(
    "tgi_prompt_load_duration", "Seconds to look up (and load) a prompt prefix", buckets=_LATENCY_BUCKETS
)
tokenize_request_count = _counter("tgi_tokenize_request_count", "Tokenize calls (a batch of n counts as 1)")
tokenize_request_input_count = _counter(
    "tgi_tokenize_request_input_count", "Tokenize inputs (a batch of n counts as n)"
)
tokenize_request_tokens = Histogram(
    "tgi_tokenize_request_tokens", "Tokens per Tokenize call", buckets=tuple(1 << x for x in range(6, 20))
)
tokenize_request_duration = Histogram(
    "tgi_tokenize_request_duration", "Seconds per Tokenize call", buckets=_LATENCY_BUCKETS
)


class StepSeries:
    """The per-step series of one kind of step (TGIS's ``method`` label), looked up once."""

    def __init__(self, method: str):
        self.duration = batch_inference_duration.labels(method=method, makeup=STEP_MAKEUP)
        self.forward_duration = batch_inference_forward_duration.labels(method=method, makeup=STEP_MAKEUP)
        self.tokproc_duration = batch_inference_tokproc_duration.labels(method=method, makeup=STEP_MAKEUP)
        self.batch_size = batch_inference_batch_size.labels(method=method)
        self.count = batch_inference_count.labels(method=method)
        self.success = batch_inference_success.labels(method=method)
        self.method = method

    def failed(self, reason: str) -> None:
        batch_inference_failure.labels(method=self.method, reason=reason).inc()


STEP_SERIES = {method: StepSeries(method) for method in ("prefill", "next_token")}


def metrics_markdown() -> str:
    """The READMEs' table of series (a test keeps them equal to it)."""
    rows = ["| series | kind | labels | what it measures |", "|---|---|---|---|"]
    for metric in globals().values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        (family,) = metric.describe()
        name = f"`{family.name}`, `{family.name}_total`" if family.type == "counter" else f"`{family.name}`"
        labels = ", ".join(metric._labelnames)  # prometheus_client keeps them only there
        rows.append(f"| {name} | {family.type} | {labels} | {family.documentation} |")
    return "\n".join(rows) + "\n"
