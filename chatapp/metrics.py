"""Prometheus metrics: the series, the hooks that feed them, and ``GET /metrics``.

Labels are bounded sets only — model, provider, route, endpoint, status, status
class, kind — never a key, a user or a request id.  A model label is a name from
the catalog: any other name (a refused request's model is client input) counts as
``other``.

Two kinds of series:

- counters and histograms, fed on the hot path: ``observe_call`` at the end of
  ``Call.settle`` (requests, latency, time to first token, tokens, cost),
  ``observe_refusal`` when the limiter refuses, ``observe_attempt`` and
  ``observe_failure`` for each upstream attempt (``pipeline._attempts``);
- gauges of what a process holds right now (open WebSockets, running chat
  replies, the usage ledger's queue and lag, the local model's queue, circuit
  breakers), read by ``sample()`` from their owners at scrape time.

One process (Daphne, or uvicorn without ``--workers``): the default registry,
with prometheus_client's process and GC collectors.  Several processes on one
host (``uvicorn --workers N``, or several servers behind a proxy): set
``PROMETHEUS_MULTIPROC_DIR`` to one empty directory for all of them, and
prometheus_client's multiprocess mode keeps each process's values in files
there; a scrape of any process adds them up.  Counters of a process that exited
stay in the sum (totals never go back); its gauges are dropped at the next scrape.
In this mode each process also samples its gauges every ``SAMPLE_EVERY`` seconds
(a daemon thread, started by its first observation), since only the scraping
process runs ``sample()`` at scrape time.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import ipaddress
import logging
import os
import platform
import re
import threading
import time
import weakref
from datetime import datetime
from importlib import metadata
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.http import Http404, HttpRequest, HttpResponse
from django.utils import timezone
from django.views.decorators.http import require_GET
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    multiprocess,
)
from prometheus_client.exposition import choose_encoder

from accounts.throttle import client_address
from chatapp.relay import catalog, routing
from chatapp.relay.upstreams import local
from keys import ledger
from keys.exceptions import LimiterUnavailable, LimitExceeded

if TYPE_CHECKING:
    from chatapp.relay.errors import UpstreamError
    from chatapp.relay.pipeline import Call
    from chatapp.relay.upstreams import Target

logger = logging.getLogger(__name__)

MULTIPROCESS = settings.PROMETHEUS_MULTIPROC_DIR is not None
SAMPLE_EVERY = 1.0  # seconds between gauge samples of each process (multiprocess mode)
OTHER = "other"
REFUSAL_KINDS = (
    "rpm",
    "rpd",
    "tpm",
    "tpd",
    "concurrency",
    "token_budget",
    "money_budget",
    "unavailable",  # the limiter could not decide (its counters were being rebuilt)
)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)

# The _created series would double the number of series for no use on a dashboard.
disable_created_metrics()

REQUESTS = Counter(
    "switchboard_requests",
    "Requests by endpoint, model and outcome, refused ones included "
    "(status: ok, error, client_disconnected, stopped, interrupted).",
    ["endpoint", "model", "status", "status_class"],
)
LATENCY = Histogram(
    "switchboard_request_duration_seconds",
    "From a request's arrival to its settlement (a stream's end), for requests that reached an upstream.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
TTFT = Histogram(
    "switchboard_time_to_first_token_seconds",
    "From a request's arrival to the first token of its reply.",
    ["model"],
    buckets=TTFT_BUCKETS,
)
TOKENS = Counter(
    "switchboard_tokens",
    "Tokens billed, by model, provider and type (input includes cached; cached alone; output).",
    ["model", "provider", "type"],
)
COST = Counter(
    "switchboard_cost",
    "Cost billed, in the currency named by the label (as in the usage records).",
    ["model", "provider", "currency"],
)
REFUSALS = Counter(
    "switchboard_limiter_refusals",
    "Requests the key's limits or budgets refused, by kind.",
    ["kind"],
)
ATTEMPTS = Counter(
    "switchboard_upstream_attempts",
    "Requests sent to an upstream route (every attempt, retries included).",
    ["route", "provider"],
)
FAILURES = Counter(
    "switchboard_upstream_failures",
    "Upstream attempts that failed, by route and the upstream's status class "
    "(429, 4xx, 5xx; none: no HTTP answer).",
    ["route", "provider", "status_class"],
)
RETRIES = Counter(
    "switchboard_upstream_retries",
    "Attempts that were not a request's first: a retry of the same route or a failover to this one.",
    ["route", "provider"],
)
BREAKER = Gauge(
    "switchboard_circuit_breaker_state",
    "Circuit breaker of a route as this process sees it: 0 closed, 1 half-open, 2 open "
    "(the worst over processes in multiprocess mode).",
    ["route", "provider"],
    multiprocess_mode="livemax",
)
LEDGER_QUEUE = Gauge(
    "switchboard_ledger_queue_depth",
    "Usage records journaled but not yet written to the database.",
    multiprocess_mode="livesum",
)
LEDGER_LAG = Gauge(
    "switchboard_ledger_write_lag_seconds",
    "Age of the oldest usage record not yet written to the database (0 when none waits).",
    multiprocess_mode="livemax",
)
WEBSOCKETS = Gauge(
    "switchboard_websocket_connections",
    "Open chat WebSocket connections.",
    multiprocess_mode="livesum",
)
REPLIES = Gauge(
    "switchboard_chat_replies_running",
    "Browser chat replies being generated.",
    multiprocess_mode="livesum",
)
LOCAL_QUEUE = Gauge(
    "switchboard_local_queue_depth",
    "Requests holding a place in the local model's queue (waiting, or being generated).",
    multiprocess_mode="livesum",
)
BUILD = Gauge(
    "switchboard_build_info",
    "The running version of Switchboard (always 1).",
    ["version", "python"],
    multiprocess_mode="livemax",
)


def _version() -> str:
    try:
        return metadata.version("switchboard")
    except metadata.PackageNotFoundError:
        return "unknown"


BUILD.labels(_version(), platform.python_version()).set(1)
for _kind in REFUSAL_KINDS:
    REFUSALS.labels(_kind)  # every kind shows, at 0, before its first refusal


# --- hooks ---


def model_label(name: str) -> str:
    """``name`` if the catalog has it, else ``other``: client input never becomes a label."""
    # The process's cached catalog (enabled models): a dict swapped whole on reload.
    return name if name in catalog._models else OTHER


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else OTHER


def observe_call(call: Call) -> None:
    """A settled call: its request, latency, time to first token, tokens and cost."""
    try:
        _start_sampler()
        model = model_label(call.model)
        REQUESTS.labels(
            call.endpoint, model, call.status or "error", status_class(call.http_status)
        ).inc()
        if call.attempts:
            LATENCY.labels(model).observe(time.perf_counter() - call.started)
        if call.first_token_at is not None:
            TTFT.labels(model).observe(call.first_token_at - call.started)
        usage = call.final_usage
        provider = call.target.provider if call.target is not None else "none"
        if usage is not None:
            for kind, count in (
                ("input", usage.input_tokens),
                ("cached", usage.cached_tokens),
                ("output", usage.output_tokens),
            ):
                if count:
                    TOKENS.labels(model, provider, kind).inc(count)
        if call.cost:
            currency = call.price.currency if call.price else settings.SWITCHBOARD_CURRENCY
            COST.labels(model, provider, currency).inc(float(call.cost))
    except Exception:
        # Settlement (billing) must never fail because of its metrics.
        logger.exception("metrics: cannot observe request %s", call.request_id)


def observe_refusal(error: LimitExceeded | LimiterUnavailable) -> None:
    kind = error.kind if isinstance(error, LimitExceeded) else "unavailable"
    REFUSALS.labels(kind if kind in REFUSAL_KINDS else OTHER).inc()


_route_providers: dict[int, str] = {}  # routes this process has called: their breaker is sampled


def observe_attempt(target: Target, *, retry: bool) -> None:
    _route_providers[target.route_id] = target.provider
    ATTEMPTS.labels(str(target.route_id), target.provider).inc()
    if retry:
        RETRIES.labels(str(target.route_id), target.provider).inc()


def observe_failure(target: Target, error: UpstreamError) -> None:
    if error.status is None:
        kind = "none"  # no HTTP answer: unreachable, or the connection broke off
    else:
        kind = "429" if error.status == 429 else status_class(error.status)
    FAILURES.labels(str(target.route_id), target.provider, kind).inc()


_sockets: weakref.WeakSet[Any] = weakref.WeakSet()


def websocket_opened(consumer: Any) -> None:
    _start_sampler()
    _sockets.add(consumer)


def websocket_closed(consumer: Any) -> None:
    _sockets.discard(consumer)


def open_sockets() -> int:
    """The chat sockets open in this process."""
    return len(_sockets)


# --- gauges of this process's state ---


def ledger_lag(now: datetime | None = None) -> float:
    """Seconds the oldest record not yet in the database has waited (0 when none waits)."""
    writer = ledger.writer
    if not writer.pending:
        return 0.0
    oldest = writer.batch_since  # the batch being written: older than anything queued
    if oldest is None:
        try:
            oldest = writer.queue.queue[0][0].get("created_at")
        except IndexError:  # taken by the writer meanwhile
            return 0.0
    if not isinstance(oldest, datetime):
        return 0.0
    return max(0.0, ((now or timezone.now()) - oldest).total_seconds())


def sample() -> None:
    """Set the gauges from their owners (any thread: each read is one atomic look)."""
    from chatapp.chat import generation  # imports the pipeline, which imports this module

    LEDGER_QUEUE.set(ledger.writer.pending)
    LEDGER_LAG.set(ledger_lag())
    WEBSOCKETS.set(len(_sockets))
    REPLIES.set(len(generation._tasks))
    with local.supervisor.lock:
        queued = sum(local.supervisor.waiting.values())
    LOCAL_QUEUE.set(queued)
    for route_id, provider in list(_route_providers.items()):
        BREAKER.labels(str(route_id), provider).set(routing.breaker_state(route_id))


_sampler: threading.Thread | None = None
_sampler_lock = threading.Lock()


def _start_sampler() -> None:
    """Multiprocess mode: sample this process's gauges into its files every SAMPLE_EVERY."""
    global _sampler
    if not MULTIPROCESS or (_sampler is not None and _sampler.is_alive()):
        return
    with _sampler_lock:
        if _sampler is None or not _sampler.is_alive():  # not alive: we are a forked child
            _sampler = threading.Thread(target=_sample_forever, name="metrics", daemon=True)
            _sampler.start()


def _sample_forever() -> None:
    while True:
        try:
            sample()
        except Exception:
            logger.exception("metrics: sampling the gauges failed")
        time.sleep(SAMPLE_EVERY)


_LIVE_GAUGE_FILE = re.compile(r"gauge_live[a-z]+_(\d+)\.db")


def _forget_dead_processes(directory: str) -> None:
    """Drop the gauges of processes that exited (uvicorn has no hook to say so)."""
    for entry in os.scandir(directory):
        match = _LIVE_GAUGE_FILE.fullmatch(entry.name)
        if match is None:
            continue
        pid = int(match[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            with contextlib.suppress(FileNotFoundError):  # another scrape was quicker
                multiprocess.mark_process_dead(pid, directory)
        except PermissionError:
            pass  # alive, someone else's


# --- GET /metrics ---


@functools.cache
def _networks(specs: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(spec) for spec in specs)


def _allowed_address(request: HttpRequest) -> bool:
    """The client (behind SWITCHBOARD_TRUSTED_PROXIES, as sign-in sees it) is in SWITCHBOARD_METRICS_ALLOW."""
    try:
        address = ipaddress.ip_address(client_address(request))
    except ValueError:
        return False
    return any(
        address in network for network in _networks(tuple(settings.SWITCHBOARD_METRICS_ALLOW))
    )


def _bearer_token(request: HttpRequest) -> str | None:
    scheme, _space, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def refusal(request: HttpRequest) -> HttpResponse | None:
    """Why this request may not read the metrics (None: it may)."""
    token: str = settings.SWITCHBOARD_METRICS_TOKEN
    if not token and not settings.SWITCHBOARD_METRICS_ALLOW:
        raise Http404("metrics are off")
    presented = _bearer_token(request)
    if token and presented is not None and hmac.compare_digest(presented.encode(), token.encode()):
        return None
    if _allowed_address(request):
        return None
    if not token:
        return HttpResponse(
            "Forbidden: this address may not read the metrics.\n",
            status=403,
            content_type="text/plain",
        )
    response = HttpResponse(
        "Unauthorized: send the metrics token as a bearer token.\n",
        status=401,
        content_type="text/plain",
    )
    challenge = 'Bearer realm="metrics"'
    if presented is not None:
        challenge += ', error="invalid_token"'
    response["WWW-Authenticate"] = challenge
    return response


@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    """The series in Prometheus' text format (or OpenMetrics, when the scraper asks for it).

    A sync view on purpose: in multiprocess mode it reads every process's files,
    which Django then does in a worker thread, off the event loop.
    """
    refused = refusal(request)
    if refused is not None:
        return refused
    registry: CollectorRegistry = REGISTRY
    if MULTIPROCESS:
        directory = str(settings.PROMETHEUS_MULTIPROC_DIR)
        _forget_dead_processes(directory)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=directory)
    sample()
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    response = HttpResponse(encoder(registry), content_type=content_type)
    response["Cache-Control"] = "no-store"
    return response
