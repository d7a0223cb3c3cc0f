"""The one pipeline every model call goes through.

    parse (dialect) → admit → route → call (upstream) → render (dialect) → settle

A transport parses its input into a ``Call`` holding a canonical ``ChatRequest``,
then uses ONE entry point per capability, which owns the whole lifecycle — it
admits, routes, calls, observes what the upstream produces, sets the outcome and
settles in its own ``finally``:

- ``async with pipeline.chat(call) as stream:`` a streamed chat; iterate ``stream``
  for the upstream's items, ``stream.stop()`` to end it early (the browser's stop);
- ``await pipeline.complete(call)``: a whole chat reply;
- ``await pipeline.embed(call, body, inputs)``: embeddings;
- ``await pipeline.count_tokens(call)``: admitted (key and model) but nothing is
  reserved or billed;
- ``pipeline.refuse(call, error)``: a request refused before admission (bad
  input) still leaves its usage record.

Transports only render: ``passthrough(call, target)`` says whether the client gets
the upstream's own body and stream (same dialect) or a rendering of the events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import httpx
from django.conf import settings
from django.utils import timezone

from chatapp import logs, metrics, shutdown
from chatapp.relay import catalog, params, routing, sse, tokens
from chatapp.relay import http as relay_http
from chatapp.relay.canonical import (
    ChatRequest,
    Completion,
    Event,
    Finish,
    ReasoningDelta,
    Start,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    Usage,
    UsageEvent,
)
from chatapp.relay.catalog import ModelInfo
from chatapp.relay.errors import RelayError, UpstreamError, from_domain
from chatapp.relay.upstreams import HttpCall, StreamDecoder, Target, UpstreamItem
from keys import ledger, limiter
from keys.auth import Principal
from keys.exceptions import LimiterUnavailable, LimitExceeded, RateWindow
from keys.limiter import Limits, Ticket
from keys.pricing import Price, price_at, to_nano

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
MAX_RETRY_WAIT = 5.0  # longest Retry-After we sit out before retrying the same route
CONNECT_TIMEOUT = 10.0
T = TypeVar("T")

# Outcomes of a call, as its usage record says them.
OK, ERROR, DISCONNECTED, STOPPED, INTERRUPTED = (
    "ok",
    "error",
    "client_disconnected",
    "stopped",
    "interrupted",
)


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


@dataclass
class Call:
    """One request from admission to its usage record.

    Transports fill in who asks and what (``principal``, ``endpoint``, ``dialect``,
    ``model``, ``request``); the pipeline fills in the rest.  ``on_cancel`` is the
    outcome recorded if the transport's task is cancelled: a client that went away
    for ``/v1``, a server shutting down for the browser chat.
    """

    principal: Principal | None
    endpoint: str
    dialect: str
    model: str
    stream: bool = False
    request: ChatRequest | None = None
    request_id: str = field(default_factory=new_request_id)
    user_id: int | None = None
    on_cancel: str = DISCONNECTED
    # The catalog's version as the transport read it for this call moments ago (a chat
    # send's): admission reads no other when this process has it loaded.
    catalog_version: str | None = None
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    target: Target | None = None
    attempts: int = 0
    usage: Usage | None = None
    upstream_input_tokens: int | None = None
    output_chars: list[str] = field(default_factory=list)
    price: Price | None = None
    # The routes' upstream prices and the moment prices are taken at (admission):
    # settle() prices the route that answered as of that moment.
    upstream_prices: dict[int, tuple[Price, ...]] = field(default_factory=dict)
    priced_at: datetime | None = None
    ticket: Ticket | None = None
    final_usage: Usage | None = None  # set by settle()
    cost: Decimal = Decimal(0)
    upstream_cost: Decimal = Decimal(0)  # set by settle()
    status: str = ""  # set once, by the pipeline
    http_status: int = 200
    error_type: str = ""
    error_message: str = ""
    settled: bool = False
    # The transport's pace: seconds to let pass before reading the upstream's stream
    # on (``sse.events``); None reads every piece as it arrives (the /v1 streams).
    pace: Callable[[], float] | None = None

    @property
    def rate(self) -> tuple[RateWindow, ...]:
        """The key's rate limits after this call's admission (for response headers)."""
        return self.ticket.rate() if self.ticket is not None else ()

    def observe(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, TextDelta | ReasoningDelta):
                if self.first_token_at is None:
                    self.first_token_at = time.perf_counter()
                self.output_chars.append(event.text)
            elif isinstance(event, ToolCallStart | ToolCallDelta):
                if self.first_token_at is None:
                    self.first_token_at = time.perf_counter()
                self.output_chars.append(
                    event.name if isinstance(event, ToolCallStart) else event.arguments
                )
            elif isinstance(event, UsageEvent):
                self.usage = event.usage
            elif isinstance(event, Start) and event.input_tokens:
                self.upstream_input_tokens = event.input_tokens

    def observe_completion(self, completion: Completion) -> None:
        self.first_token_at = time.perf_counter()
        for choice in completion.choices:
            self.output_chars.append(choice.reasoning)
            self.output_chars.append(choice.text)
            self.output_chars.extend(call.arguments for call in choice.tool_calls)
        self.usage = completion.usage

    def _fail(self, error: RelayError) -> None:
        if self.status:
            return
        self.status = ERROR
        self.http_status = error.status
        self.error_type = error.type
        self.error_message = error.message[:2000]

    def _conclude(self, exc: BaseException | None) -> None:
        """The outcome from how the call ended; the first outcome set stands."""
        if self.status:
            return
        if exc is None:
            self.status = OK
        elif isinstance(exc, RelayError):
            self._fail(exc)
        elif isinstance(exc, asyncio.CancelledError | GeneratorExit):
            # Cancelled once a shutdown's drain time is over: cut by the server, not the client.
            self.status = INTERRUPTED if shutdown.cut_started() else self.on_cancel
            self.http_status = 499
        else:
            self._fail(RelayError(500, f"Internal error in the gateway ({type(exc).__name__})."))

    def settle(self) -> None:
        """Release the reservation and write this request's usage record (exactly once)."""
        if self.settled:
            return
        self.settled = True
        estimated = False
        usage = self.usage
        if usage is None or (
            usage.input_tokens == 0 and usage.output_tokens == 0 and self.output_chars
        ):
            # The upstream reported nothing (or we left before it could): estimate, and say so.
            produced = "".join(self.output_chars)
            input_tokens = self.upstream_input_tokens
            if input_tokens is None:
                # A call that failed before the upstream produced anything (a 500, a
                # refused connection, a body that is not JSON) cost nothing upstream:
                # it is recorded at 0 and takes nothing from the key's budget.
                failed_empty = (self.status or ERROR) == ERROR and not self.output_chars
                input_tokens = (
                    tokens.estimate_request(self.request)
                    if self.request and self.target and not failed_empty
                    else 0
                )
            usage = Usage(input_tokens=input_tokens, output_tokens=tokens.estimate_text(produced))
            estimated = bool(self.target) and (usage.input_tokens > 0 or usage.output_tokens > 0)
        now = time.perf_counter()
        price = self.price
        cost = (
            price.cost(
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cached_tokens=usage.cached_tokens,
                cache_write_tokens=usage.cache_write_tokens,
            )
            if price is not None
            else Decimal(0)
        )
        upstream = (
            price_at(self.upstream_prices.get(self.target.route_id, ()), self.priced_at)
            if self.target is not None and self.priced_at is not None
            else None
        )
        upstream_cost = (
            upstream.cost(
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cached_tokens=usage.cached_tokens,
                cache_write_tokens=usage.cache_write_tokens,
            )
            if upstream is not None
            else Decimal(0)
        )
        self.final_usage, self.cost, self.upstream_cost = usage, cost, upstream_cost
        if self.ticket is not None:
            limiter.settle(
                self.ticket,
                tokens=usage.input_tokens + usage.output_tokens,
                money_nano=to_nano(cost),
            )
        ledger.submit(
            {
                "created_at": timezone.now(),
                "request_id": self.request_id,
                "user_id": self.user_id
                if self.user_id is not None
                else (self.principal.user_id if self.principal else None),
                "key_id": self.principal.key_id if self.principal else None,
                "endpoint": self.endpoint,
                "dialect": self.dialect,
                "model": self.model[:128],
                "provider": self.target.provider if self.target else "",
                "route_id": self.target.route_id if self.target else None,
                "upstream_model": self.target.upstream_model if self.target else "",
                "stream": self.stream,
                "input_tokens": usage.input_tokens,
                "output_tokens": usage.output_tokens,
                "cached_tokens": usage.cached_tokens,
                "cache_write_tokens": usage.cache_write_tokens,
                "estimated": estimated,
                "status": self.status or ERROR,
                "http_status": self.http_status,
                "error_type": self.error_type,
                "error_message": self.error_message,
                "attempts": self.attempts,
                "input_price": price.input if price else Decimal(0),
                "output_price": price.output if price else Decimal(0),
                "cached_input_price": (
                    price.input if price.cached_input is None else price.cached_input
                )
                if price
                else Decimal(0),
                "cache_write_price": (
                    price.input if price.cache_write is None else price.cache_write
                )
                if price
                else Decimal(0),
                "cost": cost,
                "currency": price.currency if price else settings.SWITCHBOARD_CURRENCY,
                "priced": price is not None,
                "upstream_cost": upstream_cost,
                "latency_ms": int((now - self.started) * 1000),
                "ttft_ms": int((self.first_token_at - self.started) * 1000)
                if self.first_token_at
                else None,
            }
        )
        logs.request_settled(self)
        metrics.observe_call(self)


def passthrough(call: Call, target: Target) -> bool:
    """Whether the client gets the upstream's own body and stream (model name swapped).

    True when the upstream speaks the client's dialect: fields and events we do not
    model reach the client untouched.  Otherwise the client gets a rendering of the
    canonical events in its dialect.
    """
    return target.upstream.dialect == call.dialect


def refuse(call: Call, error: RelayError) -> None:
    """Record a request refused before admission (bad input): it has a usage record too."""
    call._fail(error)
    call.settle()


# --- admit ---


async def admit(call: Call, *, capability: str = "chat", reserve: bool = True) -> ModelInfo:
    """Check the key may use the model and the model can serve this request; reserve.

    ``capability``: ``chat``, ``embeddings`` or ``count`` (any model that chats).
    With ``reserve=False`` nothing is taken from the key's limits.
    """
    logs.bind_call(call)
    principal = call.principal
    request = call.request
    if principal is not None and not principal.may_use(call.model):
        raise RelayError(
            403,
            f"This API key may not use the model '{call.model}'.",
            code="model_not_allowed",
            param="model",
        )
    model = await catalog.aget_model(call.model, call.catalog_version)
    if model is None:
        raise RelayError(
            404,
            f"The model '{call.model}' does not exist or is not available.",
            type="invalid_request_error",
            code="model_not_found",
            param="model",
        )
    if capability == "embeddings" and not model.embeddings:
        raise RelayError(
            400,
            f"The model '{call.model}' does not provide embeddings.",
            param="model",
            code="model_not_supported",
        )
    if capability in ("chat", "count") and not model.chat:
        raise RelayError(
            400,
            f"The model '{call.model}' is not a chat model.",
            param="model",
            code="model_not_supported",
        )
    if request is not None and capability == "chat":
        _check_request(call, model, request)
    if not model.routes:
        raise RelayError(
            503,
            f"The model '{call.model}' has no enabled route to an upstream.",
            type="overloaded_error",
            code="no_route",
        )
    if reserve:
        await _reserve(call, model)
    return model


def _check_request(call: Call, model: ModelInfo, request: ChatRequest) -> None:
    if request.has_images and not model.vision:
        raise RelayError(
            400,
            f"The model '{call.model}' does not accept images.",
            param="messages",
            code="image_not_supported",
        )
    if request.tools and not model.tools:
        raise RelayError(
            400,
            f"The model '{call.model}' does not support tools.",
            param="tools",
            code="tools_not_supported",
        )
    limits = call.principal.limits if call.principal is not None else Limits()
    if request.max_tokens is not None and request.max_tokens > model.max_output_tokens:
        if not limits.clamp_max_tokens:
            raise RelayError(
                400,
                f"max_tokens: {request.max_tokens} is more than the {model.max_output_tokens} output tokens "
                f"the model '{call.model}' allows.",
                param="max_tokens",
                code="max_tokens_exceeded",
            )
        request.max_tokens = model.max_output_tokens  # the key asks for clamping over refusing
    key_max = limits.max_output_tokens
    if key_max is not None:
        if request.max_tokens is None:
            # Bound the reply so the reservation is a real worst case.
            request.max_tokens = min(key_max, model.max_output_tokens)
        elif request.max_tokens > key_max:
            if not limits.clamp_max_tokens:
                raise RelayError(
                    400,
                    f"max_tokens: {request.max_tokens} is more than the {key_max} output tokens "
                    f"this API key allows per request.",
                    param="max_tokens",
                    code="max_tokens_exceeded",
                )
            request.max_tokens = key_max
    estimate = tokens.estimate_request(request)
    if estimate + (request.max_tokens or 0) > model.context_window:
        raise RelayError(
            400,
            f"This request needs about {estimate} input tokens plus {request.max_tokens or 0} output tokens, "
            f"more than the {model.context_window}-token context window of '{call.model}'.",
            param="messages",
            code="context_length_exceeded",
        )


async def _reserve(call: Call, model: ModelInfo, input_bound: int | None = None) -> None:
    """Snapshot the price and reserve the request's worst case against the key's limits.

    The worst case is an upper bound, never an estimate: the input by its UTF-8
    size (``tokens.bound_request``) plus every output token the request may produce.
    """
    call.priced_at = limiter.clock()
    call.price = price_at(model.prices, call.priced_at)
    call.upstream_prices = model.upstream_prices
    principal = call.principal
    if principal is None or not principal.limits.any:
        return
    request = call.request
    max_output = 0
    if input_bound is None:
        input_bound = tokens.bound_request(request) if request is not None else 0
    if request is not None:
        wanted = request.max_tokens or model.max_output_tokens
        if request.reasoning_budget or request.reasoning_effort not in (None, "none"):
            # Thinking may raise the upstream's max_tokens above the client's, up to the
            # model's output limit (chatapp.relay.reasoning): reserve that limit.
            wanted = max(wanted, model.max_output_tokens)
        max_output = wanted * max(1, request.n)
    # The input at its dearest price: a cache write may cost more than plain input.
    worst = (
        max(
            call.price.cost(input_tokens=input_bound, output_tokens=max_output),
            call.price.cost(
                input_tokens=input_bound, output_tokens=max_output, cache_write_tokens=input_bound
            ),
        )
        if call.price is not None
        else Decimal(0)
    )
    try:
        call.ticket = await limiter.aadmit(
            key_id=principal.key_id,
            request_id=call.request_id,
            limits=principal.limits,
            tokens=input_bound + max_output,
            money_nano=to_nano(worst),
            label=principal.label,
        )
    except (LimitExceeded, LimiterUnavailable) as exc:
        metrics.observe_refusal(exc)
        raise from_domain(exc) from None


# --- route + call ---


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, (parsedate_to_datetime(value) - timezone.now()).total_seconds())
        except (TypeError, ValueError):
            return None


def chat_http(target: Target, request: ChatRequest) -> HttpCall:
    """The upstream's chat request with the model's parameter rules applied: the one place.

    A refused parameter is the client's error (400 naming it and the model), raised
    before anything is sent; it is the same on every route of the model.
    """
    http_call = target.upstream.build_chat(target, request)
    if target.param_rules or target.fold_system:
        name = params.refused(http_call.body, target.param_rules)
        if name is not None:
            raise RelayError(
                400,
                f"The model '{request.model}' does not accept the parameter '{name}'.",
                param=name,
                code="unsupported_parameter",
            )
        http_call.body = params.apply(
            http_call.body, target.param_rules, fold_system=target.fold_system
        )
    return http_call


async def _send(http_call: HttpCall, target: Target, *, stream: bool) -> httpx.Response:
    timeout = httpx.Timeout(target.timeout, connect=min(CONNECT_TIMEOUT, target.timeout))
    request = httpx.Request(
        "POST",
        http_call.url,
        headers=http_call.headers,
        content=json.dumps(http_call.body, ensure_ascii=False).encode(),
        extensions={"timeout": timeout.as_dict()},
    )
    try:
        response = await relay_http.send(request)
    except httpx.HTTPError as exc:
        if relay_http.is_timeout(exc):
            raise UpstreamError(
                f"{target.provider}: no answer from {http_call.url} within {target.timeout:g}s",
                status=504,
            ) from None
        cause = exc.__cause__ or exc
        raise UpstreamError(
            f"{target.provider}: cannot reach {http_call.url} ({type(cause).__name__}: {cause})"
        ) from None
    if response.status_code >= 400:
        try:
            text = (await response.aread()).decode(errors="replace")
        except httpx.HTTPError:
            text = ""
        finally:
            await response.aclose()
        status = target.upstream.error_status(response.status_code, text)
        retryable = status in (408, 409, 429) or status >= 500
        raise UpstreamError(
            f"{target.provider} answered {status} for {target.upstream_model}: "
            + " ".join(target.upstream.error_message(text).split()),
            status=status,
            retry_after=_retry_after(response),
            retryable=retryable,
            body=text,
        )
    if not stream:
        try:
            await response.aread()
        except httpx.TimeoutException:
            raise UpstreamError(
                f"{target.provider}: the response did not finish within {target.timeout:g}s",
                status=504,
            ) from None
        except httpx.HTTPError as exc:
            raise UpstreamError(
                f"{target.provider}: the response broke off ({type(exc).__name__})"
            ) from None
        finally:
            await response.aclose()
    return response


def _json_object(response: httpx.Response, target: Target) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        raise UpstreamError(f"{target.provider} sent a body that is not JSON", status=502) from None
    if not isinstance(body, dict):
        raise UpstreamError(f"{target.provider} sent an unexpected body", status=502)
    return body


def client_error(error: UpstreamError) -> RelayError:
    """What the client sees when no route could serve the request."""
    if error.status == 429:
        headers = (
            {"retry-after": str(max(1, round(error.retry_after)))} if error.retry_after else {}
        )
        return RelayError(
            429,
            f"The upstream is rate limiting requests: {error.message}",
            code="upstream_rate_limited",
            headers=headers,
        )
    if error.status in (400, 413, 422):
        return RelayError(
            400,
            f"The upstream rejected the request: {error.message}",
            code="upstream_invalid_request",
        )
    if error.status == 504:
        return RelayError(
            504, f"Upstream timeout: {error.message}", type="timeout_error", code="upstream_timeout"
        )
    return RelayError(
        502, f"Upstream error: {error.message}", type="upstream_error", code="upstream_error"
    )


def mid_stream_error(error: UpstreamError) -> RelayError:
    """What the client sees when the upstream fails after content reached it."""
    return RelayError(
        502,
        f"Upstream error mid-stream: {error.message}",
        type="upstream_error",
        code="upstream_error",
    )


async def _attempts(
    call: Call,
    targets: list[Target],
    attempt: Callable[[Target], Awaitable[T]],
    max_attempts: int = MAX_ATTEMPTS,
) -> T:
    """Run ``attempt`` on routes in failover order until one succeeds.

    The ``RelayError`` raised when none does has the last ``UpstreamError`` as its
    cause (the upstream's own words, for a provider test).
    """
    # Cycle through the routes: with one route, its retries; with many, failover.
    plan = [targets[index % len(targets)] for index in range(max_attempts)]
    last: UpstreamError | None = None
    for number, target in enumerate(plan):
        raise_if_cancelled()
        if number and target.route_id == plan[number - 1].route_id:
            # Retrying the route that just failed: back off, or sit out its Retry-After.
            wait = (
                last.retry_after
                if last and last.retry_after is not None
                else 0.1 * 2 ** (number - 1)
            )
            if wait > MAX_RETRY_WAIT:
                break
            await asyncio.sleep(wait)
        call.attempts += 1
        call.target = target
        metrics.observe_attempt(target, retry=number > 0)
        attempt_started = time.monotonic()
        try:
            result = await attempt(target)
        except UpstreamError as error:
            last = error
            metrics.observe_failure(target, error)
            logger.warning(
                "request %s: route %s failed: %s", call.request_id, target.route_id, error.message
            )
            routing.record_failure(
                target.route_id,
                error.retry_after if error.status == 429 else None,
                error=error.message,
            )
            if not error.retryable:
                break
            continue
        routing.record_success(target.route_id, latency=time.monotonic() - attempt_started)
        return result
    assert last is not None
    raise client_error(last) from last


@dataclass
class Reply:
    """A whole chat reply: the upstream's own JSON body and its canonical completion."""

    target: Target
    body: dict[str, Any]
    completion: Completion


async def _complete(
    call: Call, targets: list[Target], request: ChatRequest, max_attempts: int
) -> Reply:
    async def attempt(target: Target) -> Reply:
        upstream = target.upstream
        async with upstream.connect(target) as connected:
            response = await _send(chat_http(connected, request), connected, stream=False)
        body = _json_object(response, target)
        return Reply(target, body, upstream.parse_completion(body))

    reply = await _attempts(call, targets, attempt, max_attempts)
    call.observe_completion(reply.completion)
    return reply


async def complete(
    call: Call, *, targets: list[Target] | None = None, max_attempts: int = MAX_ATTEMPTS
) -> Reply:
    """A whole (non-streamed) chat reply; admitted, billed and recorded.

    ``targets`` pins the routes (a provider test); otherwise the model's routes are
    used in failover order.  Settled before it returns, so the usage record exists
    before the client reads a byte of the answer.
    """
    assert call.request is not None
    try:
        if targets is None:
            model = await admit(call)
            targets = routing.order(model.routes)
        reply = await _complete(call, targets, call.request, max_attempts)
    except BaseException as exc:
        call._conclude(exc)
        raise
    else:
        call._conclude(None)
        return reply
    finally:
        call.settle()


def raise_if_cancelled() -> None:
    """Raise the cancellation of the current task if something swallowed it.

    On Python 3.11 ``asyncio.wait_for`` returns normally when it is cancelled just as
    what it waits for completes (redis-py wraps every write in one), so one cancel —
    a shutdown's, a disconnect's — can be lost and a stream would run to its end.
    The task still counts the request (``Task.cancelling``): honour it here, at the
    points a stream or a failover comes back to.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


CONTENT_EVENTS = (TextDelta, ReasoningDelta, ToolCallStart, ToolCallDelta, Finish, UsageEvent)


async def _items(
    target: Target,
    response: httpx.Response,
    decoder: StreamDecoder,
    pace: Callable[[], float] | None = None,
) -> AsyncIterator[UpstreamItem]:
    try:
        async for name, data in sse.events(response, pace):
            item = decoder.feed(name, data)
            if item is not None:
                yield item
            if decoder.finished:
                break
    except httpx.TimeoutException:
        raise UpstreamError(
            f"{target.provider}: the stream stalled for over {target.timeout:g}s", status=504
        ) from None
    except httpx.HTTPError as exc:
        raise UpstreamError(
            f"{target.provider}: the stream broke off ({type(exc).__name__})"
        ) from None
    if not decoder.finished:
        raise UpstreamError(f"{target.provider}: the stream ended before it was complete")


class ChatStream:
    """An open upstream stream, observed and settled by the pipeline as it is read.

    Iterating yields the upstream's items.  The first items were read while the
    stream was opened (so a route that dies before any content can fail over); they
    come first.  When the upstream ends the stream, the call is settled at once —
    before its last element is handed to the transport, and before the transport
    writes its own closing bytes — so a client that got the whole answer always has
    a journaled usage record (``keys.ledger``).
    """

    def __init__(
        self,
        call: Call,
        target: Target,
        response: httpx.Response,
        items: AsyncIterator[UpstreamItem],
        opening: list[UpstreamItem],
        connection: contextlib.AbstractAsyncContextManager[Target],
        decoder: StreamDecoder,
    ) -> None:
        self.call = call
        self.decoder = decoder
        self.target = target
        self.response = response
        self.items = items
        self.opening = opening
        self.connection: contextlib.AbstractAsyncContextManager[Target] | None = connection

    @property
    def passthrough(self) -> bool:
        return passthrough(self.call, self.target)

    async def __aiter__(self) -> AsyncIterator[UpstreamItem]:
        for number, item in enumerate(self.opening, 1):
            if number == len(self.opening) and self.decoder.finished:
                self._ended()
            yield item
            raise_if_cancelled()
        try:
            async for item in self.items:
                self.call.observe(item.events)
                if self.decoder.finished:
                    # The upstream's last element (Anthropic's message_stop): settle
                    # before it reaches the client.
                    self._ended()
                yield item
                raise_if_cancelled()
        except UpstreamError as exc:
            error = mid_stream_error(exc)
            self.call._fail(error)
            raise error from None
        self._ended()

    def _ended(self) -> None:
        """The upstream ended the stream: record the outcome now, before the client's last bytes."""
        self.call._conclude(None)
        self.call.settle()

    def stop(self) -> None:
        """The user stopped the reply: what was produced is billed, the outcome is stopped."""
        if not self.call.status:
            self.call.status = STOPPED

    async def aclose(self) -> None:
        try:
            await self.response.aclose()
        finally:
            if self.connection is not None:
                connection, self.connection = self.connection, None
                await connection.__aexit__(None, None, None)


async def _open(call: Call, targets: list[Target], request: ChatRequest) -> ChatStream:
    """Open a streamed call, failing over until one route delivers its first content.

    Nothing has reached the client while this runs, so any failure up to the first
    element that carries content can still move on to the next route.
    """

    async def attempt(target: Target) -> ChatStream:
        upstream = target.upstream
        connection = upstream.connect(target)
        connected = await connection.__aenter__()
        try:
            response = await _send(chat_http(connected, request), connected, stream=True)
        except BaseException:
            await connection.__aexit__(None, None, None)
            raise
        decoder = upstream.stream_decoder(target)
        items = _items(target, response, decoder, call.pace)
        opening: list[UpstreamItem] = []
        try:
            async for item in items:
                opening.append(item)
                if any(isinstance(event, CONTENT_EVENTS) for event in item.events):
                    break
        except BaseException:
            await response.aclose()
            await connection.__aexit__(None, None, None)
            raise
        for item in opening:
            call.observe(item.events)
        return ChatStream(call, target, response, items, opening, connection, decoder)

    return await _attempts(call, targets, attempt)


@contextlib.asynccontextmanager
async def chat(call: Call, *, targets: list[Target] | None = None) -> AsyncIterator[ChatStream]:
    """A streamed chat: admitted, routed, opened; observed, concluded and settled on exit.

    Raises ``RelayError`` before anything is streamed when the request is refused or
    no route can open it.  Whatever ends the block — the stream's end, ``stop()``, an
    upstream failure, the client going away, a cancelled task — the outcome is
    recorded and the call settled exactly once.
    """
    assert call.request is not None
    stream: ChatStream | None = None
    try:
        if targets is None:
            model = await admit(call)
            targets = routing.order(model.routes)
        stream = await _open(call, targets, call.request)
        yield stream
    except BaseException as exc:
        call._conclude(exc)
        raise
    else:
        call._conclude(None)
    finally:
        if stream is not None:
            # Closing a broken upstream must not mask the outcome being settled.
            with contextlib.suppress(BaseException):
                await asyncio.shield(stream.aclose())
        call.settle()


async def embed(call: Call, body: dict[str, Any], inputs: Any) -> dict[str, Any]:
    """Embeddings of ``inputs`` (the client's ``body`` as the upstream gets it)."""
    try:
        model = await admit(call, capability="embeddings", reserve=False)
        await _reserve(call, model, input_bound=tokens.bound_inputs(inputs))

        async def attempt(target: Target) -> dict[str, Any]:
            http_call = target.upstream.build_embeddings(target, body)
            if http_call is None:
                raise UpstreamError(
                    f"{target.provider} ({target.provider_type}) has no embeddings API",
                    retryable=True,
                )
            result = _json_object(await _send(http_call, target, stream=False), target)
            if not isinstance(result.get("data"), list):
                raise UpstreamError(
                    f"{target.provider} sent an unexpected embeddings body", status=502
                )
            return result

        result = await _attempts(call, routing.order(model.routes), attempt)
        call.first_token_at = time.perf_counter()
        usage = result.get("usage") or {}
        if isinstance(usage, dict) and usage:
            call.usage = Usage(input_tokens=int(usage.get("prompt_tokens") or 0))
    except BaseException as exc:
        call._conclude(exc)
        raise
    else:
        call._conclude(None)
        return result
    finally:
        call.settle()


async def count_tokens(call: Call) -> tuple[int, bool]:
    """Input tokens of the call's request: the upstream's count when one can count, else an estimate.

    The key and model are checked, but nothing is reserved against the key's limits
    and nothing is billed (counting is free, as it is at Anthropic); the call still
    leaves a usage record, with no tokens, so every request is in the ledger.
    """
    request = call.request
    assert request is not None
    try:
        model = await admit(call, capability="count", reserve=False)
        call.usage = Usage()
        for choice in model.routes:
            target = choice.target
            http_call = target.upstream.build_count_tokens(target, request)
            if http_call is None or routing.is_open(target.route_id):
                continue
            call.target = target
            try:
                response = await _send(http_call, target, stream=False)
                return int(response.json()["input_tokens"]), False
            except (UpstreamError, ValueError, KeyError, TypeError):
                continue
        return tokens.estimate_request(request), True
    except BaseException as exc:
        call._conclude(exc)
        raise
    finally:
        call._conclude(None)
        call.settle()
