"""Browser-chat replies: generated on the server, detached from any socket.

A reply is an asyncio task in the process that received the message.  It is one
more transport into the relay pipeline: the browser dialect builds the request
from the conversation (``chatapp.relay.dialects.browser``), ``pipeline.chat``
admits it on the user's web key, routes, calls, records and settles, and this
module only publishes what comes back to the conversation's channel-layer group,
so every open tab — on any Daphne process, with the Redis layer — sees it.
Closing the tab does not stop it; the reply is saved when it ends.

From its start to its end the reply keeps a heartbeat in the hot store
(``chatapp.chat.events``).  A reply whose process died has none (once it is older
than a heartbeat's lifetime), and is saved as interrupted when its conversation is
next opened, sent to or stopped (``recover``).  Its frames go out in batches
(``_Publisher``): what arrives within ``FLUSH_EVERY`` is one frame.  On SIGTERM the running replies get up to ``SWITCHBOARD_DRAIN_SECONDS``
to finish; those still running then are cancelled, so their ``finally`` saves and
settles them as interrupted before the process exits (``chatapp.shutdown``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any, ParamSpec, TypeVar

from channels.db import database_sync_to_async
from django.conf import settings
from django.db import connection, transaction
from django.utils import translation

from chatapp import hotstore
from chatapp import shutdown as server_shutdown
from chatapp.chat import actions
from chatapp.chat.events import (
    HEARTBEAT_EVERY,
    HEARTBEAT_TTL,
    alive_key,
    drop_snapshot,
    publish,
    publish_frames,
    read_snapshot,
    stop_key,
)
from chatapp.chat.fragments import render_message
from chatapp.chat.rendering import render_markdown
from chatapp.connections import on_own_connection
from chatapp.models import CatalogModel, Conversation, Message, MessageStatus
from chatapp.relay import catalog, pipeline
from chatapp.relay import http as relay_http
from chatapp.relay.dialects import browser
from chatapp.relay.errors import RelayError, from_domain
from keys.auth import aprincipal, check_principal
from keys.exceptions import KeyRefused

logger = logging.getLogger(__name__)

RENDER_EVERY = 0.75  # seconds between server-rendered markdown swaps while streaming
# Seconds between two publications of a reply's frames: what arrives meanwhile goes
# out as one frame.  Under a burst of replies this is what keeps the worker's cost
# per reply from growing with the number of pieces the upstream splits it into.
FLUSH_EVERY = 0.05
# Every frame costs the worker the same, however little it carries (the channel layer,
# each tab's consumer, the WebSocket), and under a burst that time is taken from the
# sends still waiting for their first words.  So the busier the process, the less
# often a reply publishes: this much longer per reply running or starting, up to
# FLUSH_MOST.  200 replies at once get a frame every 0.4 s each, not every 50 ms.
FLUSH_PER_REPLY = 0.002
FLUSH_MOST = 0.5
# Seconds between looks at the shared stop flag of their own, when no publication
# (which reads it in passing: ``publish_frames``) has looked meanwhile.
STOP_CHECK_EVERY = 0.25
# Seconds between two wakes of a reply's heartbeat task: it beats every HEARTBEAT_EVERY,
# and until the upstream's first words looks at the stop flag on each wake.
WATCH_EVERY = 1.0
SHUTDOWN_GRACE = 10.0  # seconds shutdown() waits for cancelled replies to be saved

_tasks: set[asyncio.Task[Any]] = set()

# The sends' and the replies' database trips (``trip``).  On PostgreSQL they run side by
# side, each on a pooled connection: on the one database thread of the process every
# trip of a burst queued behind all the others, and a send waiting on its conversation's
# row lock held up every chat of the process.  SQLite takes one writer at a time: there
# they stay on that thread.  At most this many extra connections per process.
TRIP_THREADS = 4
# Batches a trip of ``Gathering`` carries at most, when trips run side by side: it
# holds a pooled connection (and a trip thread) meanwhile.
ROUNDS = 8
_trip_threads = ThreadPoolExecutor(TRIP_THREADS, thread_name_prefix="chat-trip")
P = ParamSpec("P")
R = TypeVar("R")


def trip_parallelism() -> int:
    """How many trips (``trip``) run side by side: SQLite takes one writer at a time."""
    return TRIP_THREADS if connection.vendor == "postgresql" else 1


def trip(function: Callable[P, R]) -> Callable[P, Any]:
    """``function`` made awaitable for the chat's writes (see ``TRIP_THREADS``)."""
    if connection.vendor != "postgresql":
        return database_sync_to_async(function)
    return database_sync_to_async(
        functools.partial(on_own_connection, function),
        thread_sensitive=False,
        executor=_trip_threads,
    )


class Gathering:
    """Trips (``trip``) that each carry the calls that arrived while the others were under way.

    ``function`` takes the arguments gathered (at most ``most``) and returns one
    outcome for each, in order: its result, or the exception that call raises.

    Each trip is a hop to a database thread and back, and each SQL statement in it
    hands the interpreter over between that thread and the event loop (SQLite's and
    psycopg's calls release it): under a burst of sends the hand-overs cost as much
    CPU as the statements.  A call to a quiet process goes at once; those that come
    while ``parallel`` trips are under way go together on the next one (by default
    ``trip_parallelism()``: one on SQLite, which writes one transaction at a time; on
    PostgreSQL, one per trip thread).

    The trip's thread answers the calls itself, in one callback on the event loop:
    through the trip's own awaiting task it took two more turns of the loop, and under
    a burst of sends a turn is long.  For the same reason a trip on PostgreSQL goes on
    with the calls that came meanwhile, batch after batch (up to ``rounds``), rather
    than leave them to a trip that begins two or three turns later: there a reply
    starts once its send is written.  (1,000 sends on two workers: first delta p99
    3.5 -> 2.8 s.)  On SQLite a trip carries one batch: a new conversation's reply is
    under way while its send waits (``Early``), and a trip that went on took the event
    loop's time from those replies (200 sends: p50 0.56 -> 0.65 s).
    One state per event loop (the futures belong to it).
    """

    def __init__(
        self,
        function: Callable[[list[Any]], list[Any]],
        most: int = 16,
        parallel: int | None = None,
        rounds: int | None = None,
    ) -> None:
        self.function = function
        self.most = most
        self.rounds = rounds  # None: ROUNDS when trips run side by side, else 1
        self.parallel = parallel
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Gathered] = (
            weakref.WeakKeyDictionary()
        )
        self.trips = 0  # how many batches it carried (for the tests)
        self.hops = 0  # how many trips (hops to a database thread) carried batches

    async def __call__(self, argument: Any) -> Any:
        loop = asyncio.get_running_loop()
        state = self._states.get(loop)
        if state is None:
            state = self._states[loop] = _Gathered()
        future: asyncio.Future[Any] = loop.create_future()
        with state.lock:  # the trips' threads take from the list
            state.waiting.append((argument, future))
        self._more(state, loop)
        return await future

    def _more(self, state: _Gathered, loop: asyncio.AbstractEventLoop) -> None:
        """Start a trip if calls wait and fewer than ``parallel`` are under way."""
        with state.lock:
            if not state.waiting or state.running >= (self.parallel or trip_parallelism()):
                return
            state.running += 1
        task = loop.create_task(self._run(state, loop))
        state.tasks.add(task)  # held: the loop keeps only a weak reference to a task
        task.add_done_callback(state.tasks.discard)

    async def _run(self, state: _Gathered, loop: asyncio.AbstractEventLoop) -> None:
        began = threading.Event()
        try:
            await trip(self._trip)(state, loop, began)
        except Exception as exc:
            if began.is_set():  # its calls were answered
                logger.exception("a trip of %s failed", self.function.__name__)
            else:  # it could not begin: the calls it would have carried fail with it
                with state.lock:
                    state.running -= 1
                    batch = state.waiting[: self.most]
                    state.waiting = state.waiting[self.most :]
                _answer(batch, [exc] * len(batch))
        # Those that came while it was under way, should no trip have taken them.
        self._more(state, loop)

    def _trip(
        self, state: _Gathered, loop: asyncio.AbstractEventLoop, began: threading.Event
    ) -> None:
        """On the trip's thread: the calls waiting, ``most`` at a time, each batch answered."""
        began.set()
        rounds = self.rounds
        if rounds is None:
            rounds = ROUNDS if trip_parallelism() > 1 else 1
        try:
            for round_ in range(rounds):
                if round_:  # a connection the last batch broke is not the next one's
                    connection.close_if_unusable_or_obsolete()
                with state.lock:
                    batch = state.waiting[: self.most]
                    state.waiting = state.waiting[self.most :]
                    if not batch:  # none left (or another trip took them)
                        return
                    self.trips += 1
                    if not round_:
                        self.hops += 1
                try:
                    outcomes = self.function([argument for argument, _ in batch])
                except Exception as exc:  # the batch itself failed: every call with it
                    outcomes = [exc] * len(batch)
                loop.call_soon_threadsafe(_answer, batch, outcomes)
        finally:
            with state.lock:
                state.running -= 1


def _answer(batch: list[tuple[Any, asyncio.Future[Any]]], outcomes: list[Any]) -> None:
    for (_argument, future), outcome in zip(batch, outcomes, strict=True):
        if future.done():  # its caller was cancelled meanwhile
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


class _Gathered:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.waiting: list[tuple[Any, asyncio.Future[Any]]] = []
        self.running = 0  # trips under way (counted from the moment one is decided)
        self.tasks: set[asyncio.Task[None]] = set()


def start(
    message_id: int, language: str | None = None, *, prepared: browser.Prepared | None = None
) -> asyncio.Task[None]:
    """Generate the reply for assistant message ``message_id`` in the background.

    ``language``: the sender's, for the words of a failure in the frames sent now.
    ``prepared``: its request, when the caller has built it (else it is read here).
    """
    return _spawn(run(message_id, language, prepared=prepared))


def _spawn(coroutine: Any) -> asyncio.Task[None]:
    loop = asyncio.get_running_loop()
    server_shutdown.install()  # SIGTERM drains this process's replies before it exits
    task = loop.create_task(coroutine)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    server_shutdown.track(task)
    return task


class Early:
    """A reply whose upstream is asked while the send that makes it is being written.

    For a new conversation checked on the event loop (``actions.check_new_conversation``
    reads nothing once the sender's key and the catalog are in memory), on SQLite: its
    request needs nothing the write gives, and under a burst of sends the write waits
    its turn for the process's one database thread.  The reply's task admits the call and opens the
    upstream meanwhile, then waits for ``written``; nothing is published and nothing
    saved before it.  Should the send not be written, ``abandon`` cancels the task:
    its call is recorded as interrupted, with whatever the upstream used.
    """

    def __init__(self, prepared: browser.Prepared, language: str | None = None) -> None:
        self.written: asyncio.Future[tuple[int, browser.Prepared]] = (
            asyncio.get_running_loop().create_future()
        )
        self.prepared = prepared
        self.task = _spawn(run(0, language, prepared=prepared, written=self.written))

    def write(self, message_id: int, conversation: Conversation, messages: list[Message]) -> None:
        """The send is written: its reply is ``message_id``, its rows ``messages``."""
        if not self.written.done():
            self.written.set_result(
                (
                    message_id,
                    dataclasses.replace(
                        self.prepared,
                        conversation_id=conversation.pk,
                        conversation=conversation,
                        messages=messages,
                    ),
                )
            )

    def abandon(self) -> None:
        """The send was not written (or its sender gone before it was): no reply."""
        if not self.written.done():
            self.written.cancel()
            self.task.cancel()


async def request_stop(message_id: int) -> None:
    # A flag in the hot store reaches the task whichever process runs it.
    await hotstore.aset(stop_key(message_id), True, 600)


async def shutdown(grace: float = SHUTDOWN_GRACE) -> None:
    """Cancel every reply of this process now and wait until each is saved and settled.

    (SIGTERM first lets them finish, for up to the drain time: ``chatapp.shutdown``.)
    """
    tasks = list(_tasks)
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=grace)


async def recover(conversation_id: int) -> list[int]:
    """Save as interrupted every reply of the conversation that no live process writes.

    A reply is written by a live process while its heartbeat lasts; one younger than a
    heartbeat's lifetime may not have beaten yet (its task starts after the send's
    database trip) and counts as live too.  Returns the replies left streaming (the
    live ones), whose snapshots a tab that opens the conversation needs.
    """
    from django.utils import timezone

    young = timezone.now() - timedelta(seconds=HEARTBEAT_TTL)
    live: list[int] = []
    for message_id, created_at in await database_sync_to_async(actions.streaming_messages)(
        conversation_id=conversation_id
    ):
        if created_at > young or await hotstore.aget(alive_key(message_id)):
            live.append(message_id)
            continue
        snapshot = await read_snapshot(message_id)
        _seq, text, reasoning = snapshot or (0, "", "")
        message = await database_sync_to_async(actions.do_mark_interrupted)(
            message_id=message_id, text=text, reasoning=reasoning
        )
        if message is not None:
            logger.warning("reply %s had no live writer: saved as interrupted", message_id)
            html = await database_sync_to_async(render_message)(message)
            await publish(
                conversation_id,
                browser.done_frame(message_id, MessageStatus.INTERRUPTED, html),
            )
    return live


class _Heartbeat:
    """Refreshes the reply's ``alive`` key from its start to its end; sees an early stop.

    A task of its own, waking every ``WATCH_EVERY`` whatever the upstream does: a reply
    waiting longer than a heartbeat's lifetime for its first words (a reasoning model,
    a local model's queue under load) must not be taken for one whose process died
    when a tab opens its conversation.  Until those first words, it also looks at the
    stop flag (the publications do once they flow) and stops the reply's opening.
    """

    def __init__(self) -> None:
        self.key = ""
        self.stop_key = ""
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        # The reply's opening (admission, the upstream's first words), stopped by calling
        # ``stop_opening``; ``streaming`` once they came (the publications look then).
        self.stop_opening: Callable[[], None] | None = None
        self.streaming = False
        self.stopped = False

    def start(self, message_id: int) -> None:
        # The first beat too is the task's, and it begins a WATCH_EVERY after the reply:
        # a reply younger than a heartbeat's lifetime counts as live meanwhile (recover),
        # and no tab can have asked to stop it before it was written.  Under a burst of
        # sends every reply starts at once: no task, no hot-store write for each then.
        self.key = alive_key(message_id)
        self.stop_key = stop_key(message_id)
        self.timer = asyncio.get_running_loop().call_later(WATCH_EVERY, self._begin)

    def _begin(self) -> None:
        self.timer = None
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        beaten = -HEARTBEAT_EVERY  # (long ago: beat at once)
        while True:
            try:
                if time.monotonic() - beaten >= HEARTBEAT_EVERY:
                    beaten = time.monotonic()
                    await hotstore.aset(self.key, True, HEARTBEAT_TTL)
                if self.stop_opening is not None and not self.streaming:
                    asked = await hotstore.aget(self.stop_key)
                    if asked and not self.streaming:  # (it may have begun meanwhile)
                        self.stopped = True
                        self.stop_opening()
                        self.stop_opening = None
            except Exception as exc:  # the hot store unreachable for a moment: try again
                logger.warning("heartbeat of %s failed: %r", self.key, exc)
            await asyncio.sleep(WATCH_EVERY)

    def end(self) -> None:
        """No more beats (synchronous: it holds even in a task being cancelled)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.task is not None:
            self.task.cancel()

    async def stop(self) -> None:
        self.end()
        if self.task is not None:  # it beat (a reply that ended sooner never did)
            await hotstore.aset(self.key, None, 1)


async def run(
    message_id: int,
    language: str | None = None,
    *,
    prepared: browser.Prepared | None = None,
    written: asyncio.Future[tuple[int, browser.Prepared]] | None = None,
) -> None:
    """Generate, publish and save the reply ``message_id`` (see ``start``).

    ``written``: for a reply whose send is still being written (``Early``), the future
    of its id and rows; ``prepared`` then has its request only.
    """
    if language:
        translation.activate(language)  # this task's own context: no other task sees it
    status: str = MessageStatus.FAILED
    error = ""
    call: pipeline.Call | None = None
    model_name = ""
    period = ""
    started = time.perf_counter()
    heartbeat = _Heartbeat()
    reply = _Reply(heartbeat, written)
    try:
        if written is None:
            reply.known(message_id, prepared)
            if prepared is None:
                prepared = reply.prepared = await database_sync_to_async(browser.prepare)(
                    message_id
                )
        assert prepared is not None
        model_name = prepared.request.model
        try:
            principal = prepared.principal or await aprincipal(prepared.key_hash)
            if principal is None:
                raise KeyRefused("unknown", "Your chat key could not be found.")
            principal = check_principal(principal)
            period = principal.limits.period
        except KeyRefused as exc:
            raise from_domain(exc) from None
        request = prepared.request
        # One read of the catalog's version for the reply and its admission (none when
        # its send read it moments ago); a version not loaded yet is loaded here.
        version = prepared.catalog_version or await catalog.aloaded_version()
        model = await catalog.aget_model(request.model, version)
        if model is not None:
            reply.left_out = browser.fit_context(
                request, model.context_window, model.max_output_tokens
            )
        if written is None:
            await reply.ready()  # the left-out frame before the call, as it goes
        pace = _Pace()
        call = pipeline.Call(
            principal=principal,
            endpoint="browser",
            dialect="browser",
            model=request.model,
            stream=True,
            request=request,
            user_id=prepared.user_id,
            on_cancel=pipeline.INTERRUPTED,
            catalog_version=version,
            pace=pace,
        )
        status = await _opened_and_relayed(call, reply, pace)
    except RelayError as exc:
        # The person reads plain words (browser.failure_text); the technical message
        # is in the usage record and here, for admins.
        logger.info("reply %s failed: %s", reply.message_id or "(being written)", exc.message)
        status = MessageStatus.FAILED
        error = browser.failure(
            code=exc.code,
            model=await _label(model_name),
            retry_after=exc.headers.get("retry-after"),
            period=period,
        )
    except asyncio.CancelledError:
        status = MessageStatus.INTERRUPTED
        raise
    except Exception as exc:
        logger.exception("reply %s failed", reply.message_id or "(being written)")
        status = MessageStatus.FAILED
        error = browser.failure(code=f"internal:{type(exc).__name__}")
    finally:
        try:
            # Failed before its send was written: saved once it is (not at all when the
            # send is not written: ``Early.abandon``).
            if await asyncio.shield(reply.wait_written()):
                await asyncio.shield(
                    _finish(
                        reply.message_id,
                        reply.conversation_id,
                        call,
                        status,
                        error,
                        reply.writer,
                        reply.left_out,
                        started,
                        reply.prepared,
                    )
                )
        finally:
            heartbeat.end()  # even when this task is cancelled while the reply is saved
        with contextlib.suppress(Exception):
            await asyncio.shield(heartbeat.stop())


class _Reply:
    """The reply a task writes: known from the start, or once its send is written (``Early``)."""

    def __init__(
        self,
        heartbeat: _Heartbeat,
        written: asyncio.Future[tuple[int, browser.Prepared]] | None,
    ) -> None:
        self.heartbeat = heartbeat
        self.written = written
        self.message_id = 0
        self.conversation_id = 0
        self.prepared: browser.Prepared | None = None
        self.writer = browser.ReplyWriter(0)
        self.left_out = 0
        self._announced = False

    def known(self, message_id: int, prepared: browser.Prepared | None) -> None:
        self.message_id = message_id
        self.writer = browser.ReplyWriter(message_id)
        self.heartbeat.start(message_id)
        if prepared is not None:
            self.prepared = prepared
            self.conversation_id = prepared.conversation_id

    async def wait_written(self) -> bool:
        """Whether the reply is known, once its send is written; False if it never is."""
        if not self.message_id and self.written is not None:
            try:
                # Shielded: this task cancelled (a shutdown) still learns its reply.
                message_id, prepared = await asyncio.shield(self.written)
            except asyncio.CancelledError:
                if self.written.cancelled():  # abandoned
                    return False
                raise
            self.known(message_id, prepared)
        return bool(self.message_id)

    async def ready(self) -> None:
        """Wait until the reply is known; then tell its tabs what the request left out (once)."""
        if not await self.wait_written():
            raise asyncio.CancelledError  # abandoned: the task is being cancelled
        if not self._announced:
            self._announced = True
            if self.left_out:
                await publish(
                    self.conversation_id, browser.left_out_frame(self.message_id, self.left_out)
                )


async def _opened_and_relayed(call: pipeline.Call, reply: _Reply, pace: _Pace) -> str:
    """The pipeline's stream relayed; the reply's status.

    The opening runs as a task of its own, which the heartbeat cancels when the user
    stops the reply before its first words: stopped, not interrupted.  A reply whose
    send is still being written waits for it once its stream is open (``Early``).
    """
    heartbeat = reply.heartbeat

    async def opened_and_relayed() -> str:
        async with pipeline.chat(call) as stream:
            if reply.message_id:
                await reply.ready()
            else:
                # Its send is still being written (``Early``): what the upstream sends
                # meanwhile is read in one go once it is.  Under a burst of sends,
                # reading each piece as it came took the event loop from the writes
                # and from the other replies' first words.
                with relay_http.unread(stream.response):
                    await reply.ready()
            heartbeat.streaming = True  # from here the publications look at the stop flag
            return await _relay(stream, reply.writer, reply.conversation_id, pace)

    task = asyncio.ensure_future(opened_and_relayed())

    def stop_opening() -> None:
        call.on_cancel = pipeline.STOPPED  # the call's outcome, as its record says
        task.cancel()

    heartbeat.stop_opening = stop_opening
    try:
        return await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if heartbeat.stopped and (current is None or not current.cancelling()):
            return MessageStatus.STOPPED
        raise  # this reply itself was cancelled (a shutdown)


class _Pace:
    """How long the reply lets its upstream's pieces gather before reading on.

    Until the next publication is due: reading every piece the moment it arrives
    buys nothing when they go out together, and costs a wake-up of the reply and of
    every layer of its HTTP client per piece (``chatapp.relay.sse.events``).  The first
    pieces are read at once (the first words go out as soon as they come).
    """

    def __init__(self) -> None:
        self.publisher: _Publisher | None = None

    def __call__(self) -> float:
        publisher = self.publisher
        if publisher is None:
            return 0.0
        return publisher.published_at + flush_interval() - time.monotonic()


def flush_interval() -> float:
    """Seconds between two publications of a reply, as busy as this process is now.

    Busy: the replies it writes, and the sends, edits and regenerations on their way
    to starting one (``starting``).
    """
    return min(FLUSH_MOST, max(FLUSH_EVERY, (len(_tasks) + _starting) * FLUSH_PER_REPLY))


_starting = 0


@contextlib.contextmanager
def starting() -> Iterator[None]:
    """A reply on its way to ``start``: it counts towards how busy the process is."""
    global _starting
    _starting += 1
    try:
        yield
    finally:
        _starting -= 1


class _Publisher:
    """Publishes a reply's frames at most once per ``flush_interval()``, in order.

    The reply's reader gathers pieces into the writer and pokes; this task wakes,
    lets ``flush_interval()`` pass since its last publication, then appends what was
    gathered to the snapshot and publishes it, with the markdown rendered every
    ``RENDER_EVERY``.  The first piece after a quiet spell goes out at once.
    """

    def __init__(self, writer: browser.ReplyWriter, conversation_id: int) -> None:
        self.writer = writer
        self.conversation_id = conversation_id
        self.wake = asyncio.Event()
        self.closing = False
        self.published_at = 0.0
        self.rendered_at = time.monotonic()
        # The stop flag as the last publication read it, and when it was last read
        # (by a publication or the reply's own look; until now the heartbeat looked).
        self.stop_asked = False
        self.stop_checked_at = time.monotonic()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def gathered(self) -> None:
        """The reader gathered pieces: the first go out now, the rest at the next publication.

        The first are published by the reader itself: a hop to this task is a turn of
        the event loop, and under a burst of replies starting a turn is long.
        """
        if self.published_at == 0.0 and not self.wake.is_set():
            await self._publish()
        else:
            self.poke()

    def poke(self) -> None:
        self.wake.set()
        if self.task.done():  # it failed (the hot store or the channel layer is down)
            self.task.result()

    async def _run(self) -> None:
        while not self.closing:
            await self.wake.wait()
            delay = self.published_at + flush_interval() - time.monotonic()
            if delay > 0 and not self.closing:
                await asyncio.sleep(delay)
            self.wake.clear()
            await self._publish()
        await self._publish()

    async def _publish(self) -> None:
        frames = self.writer.take()
        self.published_at = time.monotonic()
        if not frames:
            return
        text = self.writer.text  # as of take(): what the frames cover
        if await publish_frames(self.conversation_id, self.writer.message_id, frames):
            self.stop_asked = True
        self.stop_checked_at = self.published_at
        if self.published_at - self.rendered_at >= RENDER_EVERY and text:
            self.rendered_at = self.published_at
            render = self.writer.render_frame(render_markdown(text))
            await publish(self.conversation_id, render)

    async def close(self) -> None:
        """Publish what is left and stop (raises what made the task fail)."""
        self.closing = True
        self.wake.set()
        await self.task


async def _relay(
    stream: pipeline.ChatStream,
    writer: browser.ReplyWriter,
    conversation_id: int,
    pace: _Pace | None = None,
) -> str:
    publisher = _Publisher(writer, conversation_id)
    if pace is not None:
        pace.publisher = publisher
    try:
        async for item in stream:
            if writer.item(item):
                await publisher.gathered()
            if publisher.stop_asked:  # seen by a publication: what it published is kept
                stream.stop()
                return MessageStatus.STOPPED
            now = time.monotonic()
            if now - publisher.stop_checked_at >= STOP_CHECK_EVERY:
                publisher.stop_checked_at = now
                if await hotstore.aget(stop_key(writer.message_id)):
                    stream.stop()
                    return MessageStatus.STOPPED
        return MessageStatus.COMPLETE
    finally:
        # Shielded: a cancelled reply still publishes what it had before it is saved.
        await asyncio.shield(publisher.close())


async def _finish(
    message_id: int,
    conversation_id: int,
    call: pipeline.Call | None,
    status: str,
    error: str,
    writer: browser.ReplyWriter,
    left_out: int,
    started: float,
    prepared: browser.Prepared | None = None,
) -> None:
    """Save the reply (the pipeline has settled it), tell every tab, title the conversation."""
    usage = call.final_usage if call is not None else None
    fields: dict[str, Any] = {
        "content": writer.text,
        "reasoning": writer.reasoning,
        "status": status,
        "error": error,
        "left_out": left_out,
        "latency_ms": int((time.perf_counter() - started) * 1000),
        "input_tokens": usage.input_tokens if usage else 0,
        "output_tokens": usage.output_tokens if usage else 0,
        "cost": call.cost if call is not None else 0,
        "request_id": call.request_id if call is not None else "",
    }
    try:
        message, html, needs_title, title = await trip(_save)(message_id, fields, prepared)
    except Exception:
        logger.exception("saving reply %s failed", message_id)
        return
    await drop_snapshot(message_id)
    await publish(message.conversation_id, browser.done_frame(message_id, status, html))
    if title:
        await publish(message.conversation_id, browser.title_frame(message.conversation_id, title))
    elif needs_title:
        await _title(message.conversation_id)


async def _label(name: str) -> str:
    """A model's display name, as the chat's picker shows it."""
    model = await CatalogModel.objects.filter(name=name).afirst() if name else None
    return model.label if model is not None else name


def _save(
    message_id: int, fields: dict[str, Any], prepared: browser.Prepared | None
) -> tuple[Message, str, bool, str]:
    """Save the reply and render it; title its conversation if it has no title yet.

    Returns the reply, its HTML, whether the conversation still needs a title from its
    model, and the title given here (with titles by model switched off, the first
    message's words).  One trip (``trip``), which under a burst of replies queues:
    what the reply's start read (``prepared``) is not
    read again (no message is added to a conversation while a reply streams).
    """
    from django.utils import timezone

    from chatapp.chat.tasks import fallback_title

    Message.objects.filter(pk=message_id).update(**fields)
    messages = prepared.messages if prepared is not None else None
    message = next((item for item in messages or () if item.pk == message_id), None)
    if message is None or prepared is None:
        message = Message.objects.select_related("conversation").get(pk=message_id)
        conversation = message.conversation
        siblings = None
    else:
        for name, value in fields.items():
            setattr(message, name, value)
        conversation = prepared.conversation
        siblings = [
            item
            for item in messages or ()
            if item.parent_id == message.parent_id and item.role == message.role
        ]
    now = timezone.now()
    title = ""
    needs_title = (
        not conversation.title_generated
        and not conversation.title
        and fields["status"] in (MessageStatus.COMPLETE, MessageStatus.STOPPED)
    )
    if needs_title and not settings.SWITCHBOARD_CHAT_TITLES:
        first = next((item for item in messages or () if item.role == "user"), None)
        if first is None:
            first = conversation.messages.filter(role="user").order_by("created_at", "id").first()
        title = fallback_title(first.content if first is not None else "") or "Conversation"
        # Only if nobody named it meanwhile.
        if not Conversation.objects.filter(pk=conversation.pk, title="").update(
            title=title, title_generated=True, updated_at=now
        ):
            title = ""
            Conversation.objects.filter(pk=conversation.pk).update(updated_at=now)
        needs_title = False
    else:
        Conversation.objects.filter(pk=conversation.pk).update(updated_at=now)
    return message, render_message(message, siblings), needs_title, title


async def _title(conversation_id: int) -> None:
    if settings.CELERY_TASK_ALWAYS_EAGER:
        # Embedded mode: the title is generated right here, on this loop (a Celery
        # task run inline would start a thread and an event loop of its own per reply).
        from chatapp.chat.tasks import agenerate_title

        await agenerate_title(conversation_id, own_loop=False)
        title = (
            await Conversation.objects.filter(pk=conversation_id)
            .values_list("title", flat=True)
            .afirst()
        )
        if title:
            await publish(conversation_id, browser.title_frame(conversation_id, title))
        return
    # Not on the shared sync thread: through database_sync_to_async so the connection
    # that thread opens (on_commit asks for one) goes back to the pool: a thread that
    # dies holding it leaks it for good.
    await database_sync_to_async(_queue_title, thread_sensitive=False)(conversation_id)


def _queue_title(conversation_id: int) -> None:
    from chatapp.chat.tasks import generate_title

    enqueue: Callable[[], Any] = lambda: generate_title.delay(conversation_id)  # noqa: E731
    transaction.on_commit(enqueue)
