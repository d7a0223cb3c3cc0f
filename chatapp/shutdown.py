"""Graceful shutdown: on SIGTERM a worker drains its requests, then ends what is left.

The same steps under uvicorn and Daphne:

1. Stop accepting.  Under uvicorn its own shutdown does it: it closes its listening
   sockets and idle keep-alive connections and lets the requests in flight finish.
   Under Daphne the Twisted reactor's listening ports are closed.
2. Drain: ``/v1`` requests in flight (``in_flight``, in ``chatapp.relay.asgi``) and
   browser-chat replies (``track``) get up to ``SWITCHBOARD_DRAIN_SECONDS`` to finish.
3. Cut: what still runs is cancelled.  From then on the pipeline records a cancelled
   call as ``interrupted`` (``cut_started``), billed for what it produced; a ``/v1``
   stream ends with an in-stream error event, a response not yet started is a 503,
   a chat reply is saved as interrupted.  They get ``CUT_GRACE`` seconds to settle.
4. Flush the usage ledger, then let the server exit with status 0.

Uvicorn: our handler replaces its ``handle_exit``, which after a graceful shutdown
raises SIGTERM again (the process would end with status 143): we set its
``should_exit`` instead, and its lifespan shutdown (``lifespan``), which it runs once
its connections are done, waits for the drain, chat replies and flush included.
Daphne (and uvicorn with ``--lifespan off``) gets the signal itself once the drain is
over, and then closes its WebSockets and stops.  A second SIGTERM cuts at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from keys import ledger

logger = logging.getLogger(__name__)

CUT_GRACE = 10.0  # seconds cut requests and replies get to settle and save
FLUSH_TIMEOUT = 10.0  # seconds the usage ledger gets to reach the database
POLL = 0.25  # seconds between looks at what is still in flight (a second SIGTERM)


@dataclass(eq=False)
class Flight:
    """Work the drain waits for: ``task``; cancelling ``target`` cuts it (None: cannot)."""

    task: asyncio.Task[Any]
    target: asyncio.Task[Any] | None
    cut: bool = False


class _Drain:
    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.installed = False
        self.previous: Any = None  # the server's own SIGTERM handler
        self.lifespan = False  # uvicorn runs our lifespan: its shutdown awaits the drain
        self.flights: set[Flight] = set()
        self.deadline: float | None = None  # loop time; set when the drain starts
        self.cutting = False
        self.task: asyncio.Task[None] | None = None


_state = _Drain()


def cut_started() -> bool:
    """True once the drain time is over: a call cancelled now was cut by the shutdown."""
    return _state.cutting


def install() -> None:
    """Take SIGTERM over for this process; call on the serving event loop.

    The handler is installed once, from the main thread, after the server installed
    its own (uvicorn before it loads the app, Twisted when Daphne's reactor starts):
    it is chained, and called when the drain is over.
    """
    _state.loop = asyncio.get_running_loop()
    if _state.installed or threading.current_thread() is not threading.main_thread():
        return
    _state.installed = True
    _state.previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _on_sigterm)


@contextlib.contextmanager
def in_flight() -> Iterator[Flight]:
    """The current task is a request the drain waits for (and cuts, by cancelling it)."""
    task = asyncio.current_task()
    assert task is not None
    flight = Flight(task, task)
    flights = _state.flights
    flights.add(flight)
    try:
        yield flight
    finally:
        flights.discard(flight)


def track(task: asyncio.Task[Any]) -> None:
    """A background task (a chat reply) the drain waits for, and cancels at the cut."""
    flight = Flight(task, task)
    flights = _state.flights
    flights.add(flight)
    task.add_done_callback(lambda _task: flights.discard(flight))


async def drain() -> None:
    """Drain now unless a drain runs, and wait for its end (uvicorn's lifespan shutdown)."""
    if _state.task is None:
        _start(None)
    assert _state.task is not None
    await _state.task


async def lifespan(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """ASGI lifespan (uvicorn): SIGTERM is ours from startup; shutdown waits for the drain."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            install()
            _state.lifespan = True
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            try:
                await drain()
            finally:
                await send({"type": "lifespan.shutdown.complete"})
            return


def _on_sigterm(signum: int, frame: Any) -> None:
    loop = _state.loop
    if loop is None or loop.is_closed():
        _hand_on(signum, frame)  # nothing of ours runs here
        return
    loop.call_soon_threadsafe(_on_signal, signum, frame)


def _on_signal(signum: int, frame: Any) -> None:
    assert _state.loop is not None
    if _state.task is not None:
        logger.warning("SIGTERM again: interrupting what is still in flight now")
        _state.deadline = _state.loop.time()
        return
    server = _uvicorn()
    if server is not None and _state.lifespan:
        # uvicorn stops accepting and waits for its connections (which the drain
        # ends by the deadline), then its lifespan shutdown awaits the drain.
        server.should_exit = True
        _start(None)
    else:
        _stop_accepting(server)
        _start(lambda: _hand_on(signum, frame))


def _start(then: Callable[[], None] | None) -> None:
    loop = asyncio.get_running_loop()
    _state.deadline = loop.time() + settings.SWITCHBOARD_DRAIN_SECONDS
    _state.task = loop.create_task(_drain(then))


async def _drain(then: Callable[[], None] | None) -> None:
    try:
        logger.info(
            "shutting down: %d requests and chat replies in flight get up to %d s to finish",
            len(_state.flights),
            settings.SWITCHBOARD_DRAIN_SECONDS,
        )
        await _wait_for_flights()
        left = [flight for flight in _state.flights if not flight.task.done()]
        if left:
            logger.warning(
                "shutting down: interrupting %d requests and chat replies still in flight",
                len(left),
            )
            _state.cutting = True
            for flight in left:
                if flight.target is not None and not flight.target.done():
                    flight.cut = True
                    flight.target.cancel()
            await asyncio.wait([flight.task for flight in left], timeout=CUT_GRACE)
        if not await asyncio.to_thread(ledger.flush, FLUSH_TIMEOUT):
            logger.warning("shutting down: usage records left in the journal for the next start")
    finally:
        if then is not None:
            then()


async def _wait_for_flights() -> None:
    loop = asyncio.get_running_loop()
    while True:
        assert _state.deadline is not None
        remaining = _state.deadline - loop.time()
        pending = [flight.task for flight in _state.flights if not flight.task.done()]
        if not pending or remaining <= 0:
            return
        await asyncio.wait(pending, timeout=min(remaining, POLL))


def _uvicorn() -> Any:
    """The uvicorn server whose SIGTERM handler we chained, if any."""
    owner = getattr(_state.previous, "__self__", None)
    return owner if type(owner).__module__.startswith("uvicorn.") else None


def _stop_accepting(server: Any) -> None:
    if server is not None:
        for listener in server.servers:
            listener.close()
        return
    reactor = sys.modules.get("twisted.internet.reactor")
    if reactor is not None and getattr(reactor, "running", False):
        from twisted.internet import tcp

        for reader in reactor.getReaders():
            if isinstance(reader, tcp.Port):
                reader.stopListening()


def _hand_on(signum: int, frame: Any) -> None:
    """Let the server stop: uvicorn's should_exit, or the handler we chained."""
    server = _uvicorn()
    previous = _state.previous
    if server is not None:
        # Not its handle_exit: that would raise SIGTERM again after the shutdown.
        server.should_exit = True
    elif callable(previous):
        previous(signum, frame)
    else:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
