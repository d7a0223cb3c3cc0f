"""The chat page's WebSocket: send, stop, regenerate, edit; live deltas and replay.

Protocol (JSON both ways):

client → server
  {"action": "open", "conversation": ID}          subscribe; answered with "opened" and a
                                                   "snapshot" of each reply still streaming
  {"action": "send", "conversation": ID|null, "text": "...", "attachments": [ID...],
   "model": "name"?, "client_id": "...",
   "system_prompt": "..."?, "temperature": N?}     a new user turn and its reply (the
                                                   settings: of a new conversation)
  {"action": "edit", "message": USER_MSG_ID, "text": "...", "client_id": "..."}
                                                   a sibling version of a user turn and a new reply
  {"action": "regenerate", "message": ASSISTANT_MSG_ID}
  {"action": "stop", "message": ASSISTANT_MSG_ID}

server → client
  {"type": "opened", "conversation": ID}
  {"type": "created", "conversation": ID, "url": "/chat/ID/"}
  {"type": "messages", "conversation": ID, "client_id": "...", "html": "..."}  the branch, re-rendered
  {"type": "snapshot", "message": ID, "seq": N, "text": "...", "reasoning": "..."}  so far
  {"type": "delta", "message": ID, "seq": N, "text": "..."}                     the next piece
  {"type": "reasoning", "message": ID, "seq": N, "text": "..."}                 the next piece of
                                                   the reasoning (one seq with the deltas)
  {"type": "render", "message": ID, "seq": N, "html": "..."}                    markdown so far
  {"type": "left_out", "message": ID, "count": N}
  {"type": "done", "message": ID, "status": "complete|stopped|failed", "html": "..."}
  {"type": "title", "conversation": ID, "title": "..."}
  {"type": "error", "error": "...", "client_id": "..."}                         nothing was saved

Every message re-checks that the user is still active, and every conversation or
message id is looked up among the user's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import weakref
from collections.abc import Callable
from typing import Any

from channels.db import database_sync_to_async
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.utils import translation
from django.utils.translation import gettext as _

from chatapp import hotstore, metrics
from chatapp.chat import actions, generation
from chatapp.chat.actions import ChatError
from chatapp.chat.events import group_name, read_snapshot
from chatapp.chat.fragments import render_branch
from chatapp.models import Message, ProviderType
from chatapp.relay import catalog, pipeline
from chatapp.relay import http as relay_http
from chatapp.relay.dialects import browser
from keys.auth import awarm_web_key, aweb_principal, remember_web_key

logger = logging.getLogger(__name__)

try:  # what Daphne (through autobahn) raises on a send to a socket the client closed
    from autobahn.exception import Disconnected as SOCKET_CLOSED
except ImportError:  # another ASGI server
    SOCKET_CLOSED = ()  # type: ignore[misc,assignment]
MAX_FRAME_BYTES = 1_000_000
ACTIONS = ("open", "send", "edit", "regenerate", "stop")
STARTING = ("send", "edit", "regenerate")  # the actions that start a reply


class ChatConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated or not user.is_active:
            await self.close(code=4401)
            return
        self.user_id: int = user.pk
        self.language = language_of(self.scope)
        self.groups_joined: set[str] = set()
        await self.accept()
        metrics.websocket_opened(self)
        # The first message then finds the catalog and the sender's key in memory
        # instead of reading them behind every other trip to the database thread.
        catalog.warm()
        _warm_chat_catalog()
        _warm_key(self.user_id)
        # And the connection its first message will take to the upstream.
        _preconnect()

    async def disconnect(self, code: int) -> None:
        metrics.websocket_closed(self)
        for group in getattr(self, "groups_joined", set()):
            await self.channel_layer.group_discard(group, self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """Any frame gets an answer: a malformed one an error frame, never a closed socket.

        Every answer is in the language of the page that opened the socket.
        """
        with translation.override(self.language):
            await self._receive(text_data)

    async def _receive(self, text_data: str | None) -> None:
        if text_data is None:
            await self.send_json(browser.error_frame(_("Expected a text frame holding JSON.")))
            return
        if len(text_data) > MAX_FRAME_BYTES:
            await self.send_json(
                browser.error_frame(
                    _("The frame is %(size)s characters long; the limit is %(limit)s.")
                    % {"size": f"{len(text_data):,}", "limit": f"{MAX_FRAME_BYTES:,}"}
                )
            )
            return
        try:
            content = json.loads(text_data)
        except (ValueError, RecursionError) as exc:
            await self.send_json(
                browser.error_frame(_("The frame is not valid JSON: %(error)s") % {"error": exc})
            )
            return
        await self.receive_json(content)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        action = content.get("action") if isinstance(content, dict) else None
        # The actions that start a reply check it within their own trip to the database.
        if action not in STARTING and not await database_sync_to_async(actions.check_active)(
            user_id=self.user_id
        ):
            await self._cut_off(_("Your account is disabled."))
            return
        if not isinstance(content, dict):
            await self.send_json(browser.error_frame(_("Expected a JSON object.")))
            return
        client_id = content.get("client_id")
        client_id = client_id[:64] if isinstance(client_id, str) else ""
        handler = getattr(self, f"do_{action}", None) if action in ACTIONS else None
        if handler is None:
            await self.send_json(
                browser.error_frame(
                    _("Unknown action %(action)s.") % {"action": repr(str(action)[:40])},
                    client_id,
                )
            )
            return
        try:
            await handler(content, client_id)
        except actions.AccountDisabled as exc:
            await self._cut_off(str(exc))
        except ChatError as exc:
            await self.send_json(browser.error_frame(str(exc), client_id))
        except Exception:
            logger.exception("chat action %s failed", action)
            await self.send_json(
                browser.error_frame(
                    _("The server could not carry out this action; nothing was saved."), client_id
                )
            )

    async def _cut_off(self, error: str) -> None:
        await self.send_json(browser.error_frame(error))
        await self.close(code=4403)

    async def subscribe(self, conversation_id: int) -> None:
        group = group_name(conversation_id)
        if group not in self.groups_joined:
            await self.channel_layer.group_add(group, self.channel_name)
            self.groups_joined.add(group)

    async def do_open(self, content: dict[str, Any], client_id: str) -> None:
        conversation_id = await database_sync_to_async(actions.check_conversation_id)(
            user_id=self.user_id, conversation_id=content.get("conversation")
        )
        # Subscribe before reading the snapshots: nothing can fall between them
        # (the client drops deltas whose seq its snapshot already covers).
        await self.subscribe(conversation_id)
        await self.send_json({"type": "opened", "conversation": conversation_id})
        for message_id in await generation.recover(conversation_id):
            snapshot = await read_snapshot(message_id)
            await self.send_json(browser.snapshot_frame(message_id, snapshot))

    async def _act(
        self, action: Callable[..., actions.Started], client_id: str, **arguments: Any
    ) -> None:
        """Carry out a send, edit or regenerate in one database trip; start its reply.

        The sender's web key and the catalog's version are read here, on the loop
        (the hot store; with Redis, in one round trip), not in the trip
        (``generation.trip``).  A reply started at once (``Early``) takes the models at
        that version, without reading it again; one started after the trip, which may
        wait its turn for seconds, reads it anew.
        """
        early: generation.Early | None = None
        try:
            with generation.starting():
                if hotstore.is_remote():  # both in one round trip (one pipeline batch)
                    principal, version = await asyncio.gather(
                        aweb_principal(self.user_id), catalog.aversion()
                    )
                else:  # in this process: as tasks they would cost two turns of the loop
                    principal, version = (
                        await aweb_principal(self.user_id),
                        await catalog.aversion(),
                    )
                arguments.update(user_id=self.user_id, principal=principal, catalog_version=version)
                if action is actions.do_send_message and actions.starts_conversation(
                    arguments["conversation_id"], arguments["attachment_ids"]
                ):
                    # A new conversation: written together with the others that arrive
                    # meanwhile (the first message of a class or a demo, all at once).
                    del arguments["conversation_id"], arguments["attachment_ids"]
                    in_memory = actions.catalog_in_memory(arguments["catalog_version"])
                    if (
                        in_memory is not None
                        and arguments["principal"] is not None
                        and generation.trip_parallelism() == 1
                    ):
                        # Checked here (reading nothing), its reply's upstream asked
                        # while it is written: on SQLite every write of the process
                        # waits for the one database thread.  (On PostgreSQL the writes
                        # run side by side; there, under a burst, replies opened early
                        # only took the event loop from them: 1,000 sends' first words
                        # came later.)
                        checked = actions.check_new_conversation(**arguments, catalog=in_memory)
                        early = generation.Early(
                            browser.prepare_new(
                                checked.conversation,
                                checked.text,
                                checked.principal,
                                catalog_version=version,
                            ),
                            self.language,
                        )
                        arguments["checked"] = checked
                    started = await _start_conversation(arguments)
                else:
                    started = await generation.trip(_start)(action, **arguments)
            await self._started(started, client_id, early)
        finally:
            if early is not None:  # (once written, it goes on): not written, no reply
                early.abandon()

    async def _started(
        self, started: _Started, client_id: str, early: generation.Early | None = None
    ) -> None:
        result, messages, prepared = started
        if result.web_key_hash:
            remember_web_key(self.user_id, result.web_key_hash)
        await self.subscribe(result.conversation_id)
        # The upstream is asked first (or was while the send was written: ``early``):
        # its first words are on their way while the branch renders.  They reach this
        # socket after the frames below, as this consumer handles the group's messages
        # one at a time, after this action.
        if early is not None:
            early.write(result.reply_id, result.conversation, messages)
        else:
            generation.start(result.reply_id, self.language, prepared=prepared)
        if result.created:
            await self.send_json(
                {
                    "type": "created",
                    "conversation": result.conversation_id,
                    "url": f"/chat/{result.conversation_id}/",
                }
            )
        # Rendered here, not on the database thread all sends queue on: everything it
        # shows (attachments included) was read by the action's trip.
        html = render_branch(result.conversation, messages)
        await self.send_json(
            {
                "type": "messages",
                "conversation": result.conversation_id,
                "client_id": client_id,
                "html": html,
            }
        )

    async def _recover(self, *, conversation: Any = None, message: Any = None) -> None:
        """Interrupted replies of the conversation acted on are saved before the action."""
        if message is not None:
            message_id = await database_sync_to_async(actions.check_message_id)(
                user_id=self.user_id, message_id=message
            )
            conversation = await database_sync_to_async(actions.conversation_of_message)(
                message_id=message_id
            )
        elif conversation in (None, ""):
            return
        conversation_id = await database_sync_to_async(actions.check_conversation_id)(
            user_id=self.user_id, conversation_id=conversation
        )
        await generation.recover(conversation_id)

    async def do_send(self, content: dict[str, Any], client_id: str) -> None:
        await self._recover(conversation=content.get("conversation"))
        await self._act(
            actions.do_send_message,
            client_id,
            conversation_id=content.get("conversation"),
            text=content.get("text"),
            attachment_ids=content.get("attachments", []),
            model=content.get("model"),
            system_prompt=content.get("system_prompt"),
            temperature=content.get("temperature"),
        )

    async def do_edit(self, content: dict[str, Any], client_id: str) -> None:
        await self._recover(message=content.get("message"))
        await self._act(
            actions.do_edit_message,
            client_id,
            message_id=content.get("message"),
            text=content.get("text"),
        )

    async def do_regenerate(self, content: dict[str, Any], client_id: str) -> None:
        await self._recover(message=content.get("message"))
        await self._act(actions.do_regenerate, client_id, message_id=content.get("message"))

    async def do_stop(self, content: dict[str, Any], client_id: str) -> None:
        message_id = await database_sync_to_async(actions.check_message_id)(
            user_id=self.user_id, message_id=content.get("message")
        )
        await generation.request_stop(message_id)
        await self._recover(message=message_id)

    async def dispatch(self, message: dict[str, Any]) -> None:
        # Deltas arrive many times a second per reply and touch no database: skip
        # Channels' per-message trip to the database thread (close_old_connections).
        if message.get("type") == "chat.event":
            await self.send_json(message["payload"])
            return
        if message.get("type") == "websocket.receive":
            # Neither here: every action reaches the database through
            # database_sync_to_async, which closes stale connections itself.  Under a
            # burst of messages that trip queued behind all the others before the
            # action's own could start.
            await self.websocket_receive(message)
            return
        if message.get("type") in ("websocket.connect", "websocket.disconnect"):
            # Nor for opening and closing, which read nothing from the database (the
            # user was read by the auth middleware): a burst of tabs reconnecting
            # after a restart queued two trips each behind the sends and saves.
            await (
                self.websocket_connect(message)
                if message["type"] == "websocket.connect"
                else self.websocket_disconnect(message)
            )
            return
        await super().dispatch(message)

    async def websocket_disconnect(self, message: dict[str, Any]) -> None:
        """Channels' own without its trip to the database thread (see ``dispatch``)."""
        await self.disconnect(message["code"])
        raise StopConsumer()

    async def chat_event(self, event: dict[str, Any]) -> None:
        await self.send_json(event["payload"])

    async def send_json(self, content: Any, close: bool = False) -> None:
        # The browser may have left between a frame's publication and the socket's
        # disconnect message, which is queued behind it: nobody is left to read it.
        with contextlib.suppress(SOCKET_CLOSED):
            await super().send_json(content, close=close)


_warming: dict[int, asyncio.Task[None]] = {}
# Per event loop: a task of a loop that closed before it ended never ends.
_warming_catalog: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task[None]] = (
    weakref.WeakKeyDictionary()
)


def _warm_chat_catalog() -> None:
    """Load the chat's catalog in the background (once at a time) unless it is current.

    Until it is, a new conversation is checked on the database thread, and its reply
    cannot start while it is written (``generation.Early``).
    """
    loop = asyncio.get_running_loop()
    if loop in _warming_catalog:
        return
    task = _warming_catalog[loop] = loop.create_task(_load_chat_catalog())
    task.add_done_callback(_warmed_catalog)


async def _load_chat_catalog() -> None:
    version = await catalog.aloaded_version()
    if actions.catalog_in_memory(version) is None:
        await database_sync_to_async(actions.load_chat_catalog)(version)


def _warmed_catalog(task: asyncio.Task[None]) -> None:
    _warming_catalog.pop(task.get_loop(), None)
    if not task.cancelled() and task.exception() is not None:
        logger.warning("loading the chat's catalog failed: %r", task.exception())


def _warm_key(user_id: int) -> None:
    """Learn the user's web key in the background, once at a time per user."""
    if user_id in _warming:
        return
    task = asyncio.get_running_loop().create_task(awarm_web_key(user_id))
    _warming[user_id] = task
    task.add_done_callback(lambda done: _warmed_key(user_id, done))


def _warmed_key(user_id: int, task: asyncio.Task[None]) -> None:
    _warming.pop(user_id, None)
    if not task.cancelled() and task.exception() is not None:
        logger.warning("reading the web key of user %s failed: %r", user_id, task.exception())


_preconnecting: set[asyncio.Task[None]] = set()  # (held: the loop keeps only a weak one)
# Upstreams (base URLs) a tab that opens connects to ahead, at most.
PRECONNECT_UPSTREAMS = 4


def _preconnect() -> None:
    """Open a connection to each upstream the chat's models are routed to, in the background.

    One per open tab at most (``relay_http.preconnect``): the tab's first message then
    skips the TCP and TLS handshakes, whichever model is picked in the page.  A failure
    only costs that message the connection it would have made anyway.
    """
    if settings.SWITCHBOARD_CHAT_PRECONNECT <= 0:
        return
    task = asyncio.get_running_loop().create_task(_connect_upstreams())
    _preconnecting.add(task)
    task.add_done_callback(_preconnecting.discard)


async def _connect_upstreams() -> None:
    loop = asyncio.get_running_loop()
    version = await catalog.aversion()
    chat = actions.catalog_in_memory(version)
    if chat is None and (warming := _warming_catalog.get(loop)) is not None:
        await asyncio.wait([warming])
        chat = actions.catalog_in_memory(version)
    if chat is None:  # (the catalog changed meanwhile: the next tab will)
        return
    # The routes a chat model's first request tries (its best priority), over HTTP.
    # (A user limited to some models may get connections they will not use: unused,
    # they close after the pool's keep-alive time.)
    timeouts: dict[str, float] = {}
    for model in chat[0]:
        info = await catalog.aget_model(model.name, version)  # (in memory: reads nothing)
        if info is None or not info.routes:
            continue
        best = min(choice.priority for choice in info.routes)
        for choice in info.routes:
            target = choice.target
            if (
                choice.priority == best
                and target.provider_type != ProviderType.LOCAL
                and target.base_url.startswith(("http://", "https://"))
            ):
                timeouts.setdefault(
                    target.base_url, min(pipeline.CONNECT_TIMEOUT, float(target.timeout))
                )
    urls = list(timeouts)[:PRECONNECT_UPSTREAMS]
    outcomes = await asyncio.gather(
        *(
            relay_http.preconnect(
                url,
                wanted=min(metrics.open_sockets(), settings.SWITCHBOARD_CHAT_PRECONNECT),
                connect_timeout=timeouts[url],
            )
            for url in urls
        ),
        return_exceptions=True,
    )
    for url, outcome in zip(urls, outcomes, strict=True):
        if isinstance(outcome, Exception):
            logger.info("opening a connection to %s ahead failed: %r", url, outcome)


def language_of(scope: dict[str, Any]) -> str:
    """The page's language: its ``django_language`` cookie, else the browser's Accept-Language."""
    from django.conf import settings
    from django.utils.translation import get_supported_language_variant
    from django.utils.translation.trans_real import parse_accept_lang_header

    candidates = [scope.get("cookies", {}).get(settings.LANGUAGE_COOKIE_NAME, "")]
    for name, value in scope.get("headers", []):
        if name == b"accept-language":
            candidates += [code for code, _q in parse_accept_lang_header(value.decode("latin-1"))]
    for code in candidates:
        if code and code != "*":
            try:
                return get_supported_language_variant(code)
            except LookupError:
                continue
    return settings.LANGUAGE_CODE


_Started = tuple[actions.Started, list[Message], "browser.Prepared | None"]


def _start(action: Callable[..., actions.Started], **arguments: Any) -> _Started:
    """Carry out a send, edit or regenerate; read its branch; prepare its reply.

    One trip (``generation.trip``): under a burst of messages the trips queue (on
    SQLite behind all the others).  The reply's request is built from the conversation's
    messages as the action left them (a new conversation's are not read back), and
    those messages are returned for the branch to be rendered from.  A request that
    cannot be prepared here is prepared again by the reply's task, which saves and
    reports the failure.
    """
    return _prepared(action(**arguments))


def _start_conversations(sends: list[dict[str, Any]]) -> list[_Started | Exception]:
    """``_start`` for sends that each start a conversation (without images), together.

    Each is checked on its own (a refused one gets its own error); those that pass are
    written in one transaction (``actions.do_start_conversations``).  Should that fail,
    each is written again on its own, so each gets its own outcome and no send is lost
    for another's sake.
    """
    outcomes: dict[int, _Started | Exception] = {}
    checked: list[tuple[int, actions.NewConversation]] = []
    for index, send in enumerate(sends):
        if "checked" in send:  # on the event loop, its reply started (``Early``)
            checked.append((index, send["checked"]))
            continue
        try:
            checked.append((index, actions.check_new_conversation(**send)))
        except Exception as exc:
            outcomes[index] = exc
    try:
        started = actions.do_start_conversations(starts=[start for _index, start in checked])
    except Exception as exc:
        if len(checked) == 1:  # it was on its own already
            outcomes[checked[0][0]] = exc
        else:
            logger.warning(
                "writing %d new conversations together failed", len(checked), exc_info=True
            )
            # From the send itself, not its checked conversation: the failed insert left
            # ids on those objects.
            for index, _checked in checked:
                send = {name: value for name, value in sends[index].items() if name != "checked"}
                try:
                    outcomes[index] = _start(
                        actions.do_send_message, conversation_id=None, attachment_ids=[], **send
                    )
                except Exception as exc:
                    outcomes[index] = exc
    else:
        for (index, _checked), result in zip(checked, started, strict=True):
            # A reply started early has its request already.
            outcomes[index] = _prepared(result, request="checked" not in sends[index])
    return [outcomes[index] for index in range(len(sends))]


_start_conversation = generation.Gathering(_start_conversations)


def _prepared(result: actions.Started, *, request: bool = True) -> _Started:
    """``result`` with its branch's messages and (unless not ``request``) its reply's request."""
    conversation = result.conversation
    messages = result.messages
    if messages is None:
        messages = conversation.messages_with_attachments()
    if not request:
        return result, messages, None
    try:
        prepared = browser.prepare(
            result.reply_id,
            principal=result.principal,
            conversation=conversation,
            messages=messages,
        )
    except Exception:
        prepared = None
    return result, messages, prepared
