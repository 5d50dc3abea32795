"""Prometheus metrics from Kamailio's forked workers (prometheus_client multiprocess mode).

PROMETHEUS_MULTIPROC_DIR must be set before prometheus_client is imported: launch puts it in
Kamailio's environment and empties the directory at each start (KAMAILIO-NOTES §6). No thread and no
HTTP server of ours: Kamailio's xhttp module asks the handler for `/metrics` and it answers with
`exposition()`, which sums every worker's files.
"""

from __future__ import annotations

import functools
import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class _Pid:
    """This process's PID without a getpid() system call on every counter update (prometheus_client
    asks for it at each inc/observe to notice a fork). app_python3 runs CPython's after-fork hooks
    in each child Kamailio forks, so the value is refreshed exactly when it changes."""

    value = os.getpid()

    @classmethod
    def refresh(cls) -> None:
        cls.value = os.getpid()

    @classmethod
    def get(cls) -> int:
        return cls.value


os.register_at_fork(after_in_child=_Pid.refresh)
if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    # Before any metric below exists: each takes its value class when it is created.
    values.ValueClass = values.MultiProcessValue(process_identifier=_Pid.get)  # type: ignore[no-untyped-call]

CALLS_ATTEMPTED = Counter(
    "kemi_o365_calls_attempted",
    "Initial INVITEs relayed, by direction (to_microsoft, to_cucm)",
    ["direction"],
)
CALLS_ANSWERED = Counter(
    "kemi_o365_calls_answered", "Calls answered (first 2xx), by direction", ["direction"]
)
CALLS_FAILED = Counter(
    "kemi_o365_calls_failed",
    "Calls that ended without an answer, by direction and final SIP code",
    ["direction", "code"],
)
MICROSOFT_REJECTIONS = Counter(
    "kemi_o365_microsoft_rejections",
    "Final 4xx-6xx answers from Microsoft, by the rule its Warning or ms-diagnostics names",
    ["rule", "code"],
)
ACTIVE_CALLS = Gauge(
    "kemi_o365_active_calls",
    "Calls holding a media session in rtpengine (read at scrape)",
    multiprocess_mode="mostrecent",
)
PROXY_UP = Gauge(
    "kemi_o365_microsoft_proxy_up",
    "1 when the dispatcher holds the Microsoft proxy active (OPTIONS answered), else 0",
    ["proxy"],
    multiprocess_mode="mostrecent",
)
RTPENGINE_ERRORS = Counter(
    "kemi_o365_rtpengine_errors", "rtpengine refusals and timeouts, by operation", ["operation"]
)
POLICY_RELOADS = Counter(
    "kemi_o365_policy_reloads", "Policy reloads per worker, by result (ok, refused)", ["result"]
)
HANDLER_EXCEPTIONS = Counter(
    "kemi_o365_handler_exceptions",
    "Exceptions caught in KEMI callbacks (answered 500 for requests)",
    ["handler"],
)
HANDLER_SECONDS = Histogram(
    "kemi_o365_handler_seconds",
    "Time spent in each KEMI callback, rtpengine round trips included",
    ["handler"],
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)


@functools.cache
def handler_seconds(handler: str) -> Histogram:
    """HANDLER_SECONDS for one handler, looked up once: labels() takes a lock and builds a key."""
    return HANDLER_SECONDS.labels(handler)


def exposition() -> bytes:
    """The text format of every worker's metrics (one process's own without multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest()
