"""The model catalog as the relay sees it, cached per process with shared invalidation.

Each process keeps the whole enabled catalog (models, routes, decrypted provider
credentials) in memory, tagged with a version number that lives in the shared
hot store (Redis when configured).  Every lookup reads that one small value; any change to a provider, model or
route bumps it (signals in ``chatapp.apps``), and every process reloads on its next
request.  Decrypted credentials never leave the process: only the version is shared.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any

from channels.db import database_sync_to_async
from django.db import transaction

from chatapp import hotstore
from chatapp.relay import params
from chatapp.relay.upstreams import Target
from keys.pricing import Price

VERSION_KEY = "catalog:version"
logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RouteChoice:
    target: Target
    priority: int
    weight: int


@dataclass(frozen=True, slots=True)
class ModelInfo:
    id: int
    name: str
    display_name: str
    description: str
    context_window: int
    max_output_tokens: int
    chat: bool
    vision: bool
    tools: bool
    embeddings: bool
    created: int
    routes: tuple[RouteChoice, ...] = field(default_factory=tuple)
    prices: tuple[Price, ...] = field(default_factory=tuple)  # newest effective_from first
    # What each route's provider charges us (route id -> prices, newest first): the
    # upstream cost of a request is priced from the route that answered it.
    upstream_prices: dict[int, tuple[Price, ...]] = field(default_factory=dict)


_loaded_version: str | None = None
_models: dict[str, ModelInfo] = {}
# The load in flight on each event loop, and the version it loads: requests that
# find the catalog stale while it loads wait for that load instead of each starting
# their own (two hundred chat messages at a worker's start were two hundred loads
# queued on the one database thread).
_loading: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, tuple[str, asyncio.Future[dict[str, ModelInfo]]]
] = weakref.WeakKeyDictionary()


def _load() -> dict[str, ModelInfo]:
    from chatapp.models import CatalogModel, Route
    from keys.models import ModelPrice, RoutePrice

    prices: dict[int, list[Price]] = {}
    for row in ModelPrice.objects.order_by("-effective_from", "-id"):
        prices.setdefault(row.model_id, []).append(_price(row))
    route_prices: dict[int, list[Price]] = {}
    for upstream in RoutePrice.objects.order_by("-effective_from", "-id"):
        route_prices.setdefault(upstream.route_id, []).append(_price(upstream))

    routes: dict[int, list[RouteChoice]] = {}
    for route in Route.objects.filter(enabled=True, provider__enabled=True).select_related(
        "provider", "model"
    ):
        provider = route.provider
        routes.setdefault(route.model_id, []).append(
            RouteChoice(
                Target(
                    route_id=route.pk,
                    provider=provider.name,
                    provider_type=provider.type,
                    base_url=provider.base_url.rstrip("/"),
                    api_key=provider.api_key,
                    upstream_model=route.upstream_model,
                    timeout=provider.timeout,
                    extra_headers=dict(provider.extra_headers or {}),
                    max_output_tokens=route.model.max_output_tokens,
                    model_path=provider.model_path,
                    param_rules=params.from_json(route.model.param_rules),
                    fold_system=route.model.fold_system,
                ),
                route.priority,
                route.weight,
            )
        )
    return {
        model.name: ModelInfo(
            id=model.pk,
            name=model.name,
            display_name=model.label,
            description=model.description,
            context_window=model.context_window,
            max_output_tokens=model.max_output_tokens,
            chat=model.supports_chat,
            vision=model.supports_vision,
            tools=model.supports_tools,
            embeddings=model.supports_embeddings,
            created=int(model.created_at.timestamp()),
            routes=tuple(routes.get(model.pk, ())),
            prices=tuple(prices.get(model.pk, ())),
            upstream_prices={
                choice.target.route_id: tuple(route_prices[choice.target.route_id])
                for choice in routes.get(model.pk, ())
                if choice.target.route_id in route_prices
            },
        )
        for model in CatalogModel.objects.filter(enabled=True)
    }


def _price(row: Any) -> Price:
    """A ModelPrice or RoutePrice row as the request path prices with it."""
    return Price(
        row.input_per_mtok,
        row.output_per_mtok,
        row.cached_input_per_mtok,
        row.currency,
        row.effective_from,
        row.cache_write_per_mtok,
    )


async def _current() -> dict[str, ModelInfo]:
    global _loaded_version, _models
    version = await hotstore.aget(VERSION_KEY)
    if version is None:
        # First use, or Redis was flushed: start a new version (any value differs
        # from what a process loaded before, so all of them reload).
        version = uuid.uuid4().hex
        await hotstore.aset(VERSION_KEY, version)
    if version == _loaded_version:
        return _models
    loop = asyncio.get_running_loop()
    loading = _loading.get(loop)
    if loading is not None and loading[0] == version:
        # asyncio.wait: only this request's own cancellation raises here; a load that
        # failed or was cancelled leaves this request to load for itself.
        await asyncio.wait([loading[1]])
        if not loading[1].cancelled() and loading[1].exception() is None:
            return loading[1].result()
    # Event loops of other threads (a Celery task's) may still load at the same time;
    # that is harmless and cheaper than a lock shared across them.
    future: asyncio.Future[dict[str, ModelInfo]] = loop.create_future()
    _loading[loop] = (version, future)
    try:
        models = await database_sync_to_async(_load)()
    except BaseException:
        future.cancel()
        raise
    finally:
        if _loading.get(loop) == (version, future):
            del _loading[loop]
    future.set_result(models)
    _models, _loaded_version = models, version
    return models


_warming: set[asyncio.Task[Any]] = set()


def warm() -> None:
    """Load the catalog in the background if this process has not yet.

    A chat socket opening calls it: the first messages then find the catalog loaded
    instead of waiting for its load behind every other trip to the database thread.
    """
    if _loaded_version is not None or _loading:
        return
    task = asyncio.get_running_loop().create_task(_current())
    _warming.add(task)
    task.add_done_callback(_warmed)


def _warmed(task: asyncio.Task[Any]) -> None:
    _warming.discard(task)
    if not task.cancelled() and task.exception() is not None:
        logger.warning("loading the catalog failed: %r", task.exception())


async def aget_model(name: str, version: str | None = None) -> ModelInfo | None:
    """The model ``name`` as the catalog has it now (None if it has none so named).

    ``version``: the catalog's version as the caller read it moments ago (a chat
    send's, ``aversion``).  When this process has that version loaded, nothing is read:
    under a burst of sends each read of the version is a turn of the event loop and,
    with Redis, a round trip on the way to the upstream.
    """
    if version is not None and version == _loaded_version:
        return _models.get(name)
    return (await _current()).get(name)


async def alist_models() -> list[ModelInfo]:
    return sorted((await _current()).values(), key=lambda model: model.name)


async def aloaded_version() -> str | None:
    """The catalog's version once this process has it loaded (one is set if none is)."""
    await _current()
    return _loaded_version


async def aversion() -> str | None:
    """``version`` from async code."""
    return await hotstore.aget(VERSION_KEY)


def version() -> str | None:
    """The catalog's shared version as it stands (None before any process set one).

    For synchronous caches of catalog rows: they hold while it is unchanged.
    """
    return hotstore.get(VERSION_KEY)


def invalidate() -> None:
    """Bump the version now and again once the change commits.

    A process that read the first bump before the commit may have loaded the old
    rows under it; the second bump makes it load again.
    """
    hotstore.set(VERSION_KEY, uuid.uuid4().hex)
    transaction.on_commit(lambda: hotstore.set(VERSION_KEY, uuid.uuid4().hex))
