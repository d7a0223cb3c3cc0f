"""The one pipeline every model call goes through.

    parse (dialect) → admit → route → call (upstream adapter) → render (dialect) → settle

Views and the chat consumer parse their transport into a ``ChatRequest``, then use
``admit()``, ``open_chat()`` / ``complete_chat()`` and render the events they get
back.  ``Call.settle()`` writes the usage record and runs in ``finally`` on every
path: success, upstream failure, client disconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
from django.conf import settings
from django.utils import timezone

from chatapp.relay import catalog, routing, sse, tokens
from chatapp.relay import http as relay_http
from chatapp.relay.canonical import (
    ChatRequest,
    Completion,
    Event,
    Finish,
    Start,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    Usage,
    UsageEvent,
)
from chatapp.relay.catalog import ModelInfo
from chatapp.relay.errors import RelayError, UpstreamError
from chatapp.relay.upstreams import HttpCall, Target, local
from chatapp.relay.upstreams import anthropic as anthropic_upstream
from chatapp.relay.upstreams import openai as openai_upstream
from keys import ledger, limiter
from keys.auth import Principal
from keys.limiter import Limits, Ticket
from keys.pricing import Price, price_at, to_nano

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
MAX_RETRY_WAIT = 5.0  # longest Retry-After we sit out before retrying the same route
CONNECT_TIMEOUT = 10.0


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


@dataclass
class Call:
    """One relayed request from admission to its usage record."""

    principal: Principal | None
    endpoint: str
    dialect: str
    model: str
    stream: bool = False
    request_id: str = field(default_factory=new_request_id)
    user_id: int | None = None
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    target: Target | None = None
    attempts: int = 0
    request: ChatRequest | None = None
    usage: Usage | None = None
    upstream_input_tokens: int | None = None
    output_chars: list[str] = field(default_factory=list)
    price: Price | None = None
    ticket: Ticket | None = None
    final_usage: Usage | None = None  # set by settle()
    cost: Decimal = Decimal(0)
    status: str = "error"
    http_status: int = 200
    error_type: str = ""
    error_message: str = ""
    settled: bool = False

    def observe(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, TextDelta):
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
            self.output_chars.append(choice.text)
            self.output_chars.extend(call.arguments for call in choice.tool_calls)
        self.usage = completion.usage

    def fail(self, error: RelayError) -> None:
        self.status = "error"
        self.http_status = error.status
        self.error_type = error.type
        self.error_message = error.message[:2000]

    def settle(self) -> None:
        """Write this request's usage record (exactly once)."""
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
                input_tokens = (
                    tokens.estimate_request(self.request) if self.request and self.target else 0
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
            )
            if price is not None
            else Decimal(0)
        )
        self.final_usage, self.cost = usage, cost
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
                "estimated": estimated,
                "status": self.status,
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
                "cost": cost,
                "currency": price.currency if price else settings.SWITCHBOARD_CURRENCY,
                "priced": price is not None,
                "latency_ms": int((now - self.started) * 1000),
                "ttft_ms": int((self.first_token_at - self.started) * 1000)
                if self.first_token_at
                else None,
            }
        )


# --- admit ---


async def admit(
    call: Call,
    *,
    capability: str = "chat",
    request: ChatRequest | None = None,
    input_estimate: int | None = None,
) -> ModelInfo:
    """Check the key may use the model and the model can serve this request."""
    principal = call.principal
    if principal is not None and not principal.may_use(call.model):
        raise RelayError(
            403,
            f"This API key may not use the model '{call.model}'.",
            code="model_not_allowed",
            param="model",
        )
    model = await catalog.aget_model(call.model)
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
    if capability == "chat" and not model.chat:
        raise RelayError(
            400,
            f"The model '{call.model}' is not a chat model.",
            param="model",
            code="model_not_supported",
        )
    if request is not None:
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
        clamp = call.principal is not None and call.principal.limits.clamp_max_tokens
        if (
            request.max_tokens is not None
            and request.max_tokens > model.max_output_tokens
            and clamp
        ):
            request.max_tokens = model.max_output_tokens  # the key asks for clamping over refusing
        if request.max_tokens is not None and request.max_tokens > model.max_output_tokens:
            raise RelayError(
                400,
                f"max_tokens: {request.max_tokens} is more than the {model.max_output_tokens} output tokens "
                f"the model '{call.model}' allows.",
                param="max_tokens",
                code="max_tokens_exceeded",
            )
        if input_estimate is None:
            input_estimate = tokens.estimate_request(request)
        if input_estimate + (request.max_tokens or 0) > model.context_window:
            raise RelayError(
                400,
                f"This request needs about {input_estimate} input tokens plus {request.max_tokens or 0} output tokens, "
                f"more than the {model.context_window}-token context window of '{call.model}'.",
                param="messages",
                code="context_length_exceeded",
            )
    if not model.routes:
        raise RelayError(
            503,
            f"The model '{call.model}' has no enabled route to an upstream.",
            type="overloaded_error",
            code="no_route",
        )
    await _admit_limits(call, model, request, input_estimate)
    return model


async def _admit_limits(
    call: Call, model: ModelInfo, request: ChatRequest | None, input_estimate: int | None
) -> None:
    """Apply the key's max-output rule, snapshot the price, reserve against the key's limits."""
    principal = call.principal
    limits = principal.limits if principal is not None else Limits()
    max_output = 0
    if request is not None:
        key_max = limits.max_output_tokens
        if key_max is not None:
            if request.max_tokens is None:
                # Bound the reply so the reservation below is a real worst case.
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
        max_output = request.max_tokens or model.max_output_tokens
    call.price = price_at(model.prices, limiter.clock())
    if principal is None or not limits.any:
        return
    if input_estimate is None:
        input_estimate = tokens.estimate_request(request) if request is not None else 0
    worst = (
        call.price.cost(input_tokens=input_estimate, output_tokens=max_output)
        if call.price is not None
        else Decimal(0)
    )
    call.ticket = await limiter.aadmit(
        key_id=principal.key_id,
        request_id=call.request_id,
        limits=limits,
        tokens=input_estimate + max_output,
        money_nano=to_nano(worst),
        label=principal.label,
        dialect=call.dialect,
    )


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


@contextlib.asynccontextmanager
async def _local_slot(target: Target) -> AsyncIterator[Target]:
    """For a local model: a place in its bounded queue and its server's address."""
    if target.provider_type != "local":
        yield target
        return
    local.supervisor.enter(target.model_path)
    try:
        yield await local.resolve(target)
    finally:
        local.supervisor.leave(target.model_path)


def _build(target: Target, request: ChatRequest) -> HttpCall:
    if target.provider_type == "anthropic":
        return anthropic_upstream.build_chat(target, request)
    return openai_upstream.build_chat(target, request)


async def _send(call: Call, http_call: HttpCall, target: Target, *, stream: bool) -> httpx.Response:
    client = relay_http.client()
    request = client.build_request(
        "POST",
        http_call.url,
        headers=http_call.headers,
        content=json.dumps(http_call.body, ensure_ascii=False).encode(),
        timeout=httpx.Timeout(target.timeout, connect=min(CONNECT_TIMEOUT, target.timeout)),
    )
    try:
        response = await client.send(request, stream=True)
    except httpx.HTTPError as exc:
        if relay_http.is_timeout(exc):
            raise UpstreamError(
                f"{target.provider}: no answer within {target.timeout:g}s", status=504
            ) from None
        cause = exc.__cause__ or exc
        raise UpstreamError(
            f"{target.provider}: cannot reach the upstream ({type(cause).__name__}: {cause})"
        ) from None
    if response.status_code >= 400:
        try:
            text = (await response.aread()).decode(errors="replace")
        except httpx.HTTPError:
            text = ""
        finally:
            await response.aclose()
        status = response.status_code
        retryable = status in (408, 409, 429) or status >= 500
        raise UpstreamError(
            f"{target.provider} answered {status}: {openai_upstream.error_message(text)}",
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


def _client_error(error: UpstreamError) -> RelayError:
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


async def _attempts(call: Call, model: ModelInfo, attempt: Callable[[Target], Any]) -> Any:
    """Run ``attempt`` on routes in failover order until one succeeds."""
    ordered = routing.order(model.routes)
    # Cycle through the routes: with one route, its retries; with many, failover.
    plan = [ordered[index % len(ordered)] for index in range(MAX_ATTEMPTS)]
    last: UpstreamError | None = None
    for number, target in enumerate(plan):
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
        try:
            result = await attempt(target)
        except UpstreamError as error:
            last = error
            logger.warning(
                "request %s: route %s failed: %s", call.request_id, target.route_id, error.message
            )
            routing.record_failure(
                target.route_id, error.retry_after if error.status == 429 else None
            )
            if not error.retryable:
                break
            continue
        routing.record_success(target.route_id)
        return result
    assert last is not None
    raise _client_error(last)


async def complete_chat(
    call: Call, model: ModelInfo, request: ChatRequest
) -> tuple[Target, dict[str, Any], Completion]:
    """A non-streamed chat call: the upstream's JSON body and its canonical completion."""

    async def attempt(target: Target) -> tuple[Target, dict[str, Any], Completion]:
        async with _local_slot(target) as target:
            response = await _send(call, _build(target, request), target, stream=False)
        try:
            body = response.json()
        except ValueError:
            raise UpstreamError(
                f"{target.provider} sent a body that is not JSON", status=502
            ) from None
        if not isinstance(body, dict):
            raise UpstreamError(f"{target.provider} sent an unexpected body", status=502)
        if target.provider_type == "anthropic":
            completion = anthropic_upstream.parse_completion(body)
        else:
            completion = openai_upstream.parse_completion(body)
        return target, body, completion

    target, body, completion = await _attempts(call, model, attempt)
    call.observe_completion(completion)
    return target, body, completion


@dataclass
class UpstreamItem:
    """One upstream stream element: its raw form (for same-dialect relaying) and its events."""

    name: str
    raw: dict[str, Any]
    events: list[Event]


CONTENT_EVENTS = (TextDelta, ToolCallStart, ToolCallDelta, Finish, UsageEvent)


class UpstreamStream:
    """An open upstream stream whose opening elements have already been read."""

    def __init__(
        self,
        target: Target,
        response: httpx.Response,
        items: AsyncIterator[UpstreamItem],
        opening: list[UpstreamItem],
        on_close: contextlib.AbstractAsyncContextManager[Target] | None = None,
    ) -> None:
        self.target = target
        self.response = response
        self.items = items
        self.opening = opening  # already observed by the call
        self.on_close = on_close

    async def __aiter__(self) -> AsyncIterator[UpstreamItem]:
        for item in self.opening:
            yield item
        async for item in self.items:
            yield item

    async def aclose(self) -> None:
        try:
            await self.response.aclose()
        finally:
            if self.on_close is not None:
                on_close, self.on_close = self.on_close, None
                await on_close.__aexit__(None, None, None)


async def _items(target: Target, response: httpx.Response) -> AsyncIterator[UpstreamItem]:
    anthropic = target.provider_type == "anthropic"
    parser: Any = anthropic_upstream.StreamParser() if anthropic else openai_upstream.StreamParser()
    finished = False
    try:
        async for name, data in sse.events(response):
            if not anthropic and data.strip() == "[DONE]":
                finished = True
                break
            try:
                raw = json.loads(data)
            except json.JSONDecodeError:
                raise UpstreamError(
                    f"{target.provider} sent malformed stream data: {data[:120]!r}", retryable=True
                ) from None
            if not isinstance(raw, dict):
                raise UpstreamError(
                    f"{target.provider} sent unexpected stream data: {data[:120]!r}"
                )
            if not anthropic and "error" in raw and "choices" not in raw:
                raise UpstreamError(
                    f"{target.provider} reported an error mid-stream: {openai_upstream.error_message(data)}",
                    retryable=False,
                )
            events = parser.feed(name, raw) if anthropic else parser.feed(raw)
            yield UpstreamItem(name, raw, events)
            if anthropic and raw.get("type") == "message_stop":
                finished = True
                break
    except httpx.TimeoutException:
        raise UpstreamError(
            f"{target.provider}: the stream stalled for over {target.timeout:g}s", status=504
        ) from None
    except httpx.HTTPError as exc:
        raise UpstreamError(
            f"{target.provider}: the stream broke off ({type(exc).__name__})"
        ) from None
    if not finished:
        raise UpstreamError(f"{target.provider}: the stream ended before it was complete")


async def open_chat(call: Call, model: ModelInfo, request: ChatRequest) -> UpstreamStream:
    """Open a streamed chat call, failing over until one route delivers its first element.

    Nothing has reached the client yet while this runs, so any failure up to the
    first element can still move on to the next route.
    """

    async def attempt(target: Target) -> UpstreamStream:
        slot = _local_slot(target)
        target = await slot.__aenter__()
        try:
            response = await _send(call, _build(target, request), target, stream=True)
        except BaseException:
            await slot.__aexit__(None, None, None)
            raise
        items = _items(target, response)
        # Read up to the first element that carries content (a role-only opening
        # chunk or message_start does not count): until then nothing has reached
        # the client, so a stream that dies here can still fail over.
        opening: list[UpstreamItem] = []
        try:
            async for item in items:
                opening.append(item)
                if any(isinstance(event, CONTENT_EVENTS) for event in item.events):
                    break
        except BaseException:
            await response.aclose()
            await slot.__aexit__(None, None, None)
            raise
        for item in opening:
            call.observe(item.events)
        return UpstreamStream(target, response, items, opening, on_close=slot)

    return await _attempts(call, model, attempt)


async def embeddings(call: Call, model: ModelInfo, body: dict[str, Any]) -> dict[str, Any]:
    async def attempt(target: Target) -> dict[str, Any]:
        if target.provider_type != "openai":
            raise UpstreamError(
                f"{target.provider} ({target.provider_type}) has no embeddings API", retryable=True
            )
        response = await _send(
            call, openai_upstream.build_embeddings(target, body), target, stream=False
        )
        try:
            result = response.json()
        except ValueError:
            raise UpstreamError(
                f"{target.provider} sent a body that is not JSON", status=502
            ) from None
        if not isinstance(result, dict) or not isinstance(result.get("data"), list):
            raise UpstreamError(f"{target.provider} sent an unexpected embeddings body", status=502)
        return result

    result: dict[str, Any] = await _attempts(call, model, attempt)
    usage = result.get("usage") or {}
    call.first_token_at = time.perf_counter()
    if usage:
        call.usage = Usage(input_tokens=int(usage.get("prompt_tokens") or 0))
    return result


async def count_tokens(call: Call, model: ModelInfo, request: ChatRequest) -> tuple[int, bool]:
    """Input tokens of ``request``: the upstream's count when it offers one, else an estimate."""
    for choice in model.routes:
        target = choice.target
        if target.provider_type != "anthropic" or routing.is_open(target.route_id):
            continue
        try:
            response = await _send(
                call, anthropic_upstream.build_count_tokens(target, request), target, stream=False
            )
            return int(response.json()["input_tokens"]), False
        except (UpstreamError, ValueError, KeyError, TypeError):
            continue
    return tokens.estimate_request(request), True
