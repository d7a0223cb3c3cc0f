"""The chat page's WebSocket: send, stop, regenerate, edit; live deltas and replay.

Protocol (JSON both ways):

client → server
  {"action": "open", "conversation": ID}          subscribe; answered with "opened" and a
                                                   "snapshot" of each reply still streaming
  {"action": "send", "conversation": ID|null, "text": "...", "attachments": [ID...],
   "model": "name"?, "client_id": "..."}           a new user turn and its reply
  {"action": "edit", "message": USER_MSG_ID, "text": "...", "client_id": "..."}
                                                   a sibling version of a user turn and a new reply
  {"action": "regenerate", "message": ASSISTANT_MSG_ID}
  {"action": "stop", "message": ASSISTANT_MSG_ID}

server → client
  {"type": "opened", "conversation": ID}
  {"type": "created", "conversation": ID, "url": "/chat/ID/"}
  {"type": "messages", "conversation": ID, "client_id": "...", "html": "..."}  the branch, re-rendered
  {"type": "snapshot", "message": ID, "seq": N, "text": "..."}                  text so far
  {"type": "delta", "message": ID, "seq": N, "text": "..."}                     the next piece
  {"type": "render", "message": ID, "seq": N, "html": "..."}                    markdown so far
  {"type": "left_out", "message": ID, "count": N}
  {"type": "done", "message": ID, "status": "complete|stopped|failed", "html": "..."}
  {"type": "title", "conversation": ID, "title": "..."}
  {"type": "error", "error": "...", "client_id": "..."}                         nothing was saved

Every message re-checks that the user is still active, and every conversation or
message id is looked up among the user's own.
"""

from __future__ import annotations

from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from chatapp import actions, generation, hotstore
from chatapp.actions import ChatError


class ChatConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated or not user.is_active:
            await self.close(code=4401)
            return
        self.user_id: int = user.pk
        self.groups_joined: set[str] = set()
        await self.accept()

    async def disconnect(self, code: int) -> None:
        for group in getattr(self, "groups_joined", set()):
            await self.channel_layer.group_discard(group, self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        if not await database_sync_to_async(actions.check_active)(user_id=self.user_id):
            await self.send_json({"type": "error", "error": "Your account is disabled."})
            await self.close(code=4403)
            return
        if not isinstance(content, dict):
            await self.send_json({"type": "error", "error": "Expected a JSON object."})
            return
        action = content.get("action")
        client_id = str(content.get("client_id") or "")[:64]
        handler = (
            getattr(self, f"do_{action}", None)
            if action in ("open", "send", "edit", "regenerate", "stop")
            else None
        )
        if handler is None:
            await self.send_json(
                {"type": "error", "error": f"Unknown action {action!r}.", "client_id": client_id}
            )
            return
        try:
            await handler(content, client_id)
        except ChatError as exc:
            await self.send_json({"type": "error", "error": str(exc), "client_id": client_id})

    async def subscribe(self, conversation_id: int) -> None:
        group = generation.group_name(conversation_id)
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
        for message_id in await database_sync_to_async(actions.streaming_message_ids)(
            conversation_id=conversation_id
        ):
            snapshot = await hotstore.aget(generation.snapshot_key(message_id))
            seq, text = snapshot if snapshot else (0, "")
            await self.send_json(
                {"type": "snapshot", "message": message_id, "seq": seq, "text": text}
            )

    async def _started(self, result: actions.Started, client_id: str) -> None:
        await self.subscribe(result.conversation_id)
        if result.created:
            await self.send_json(
                {
                    "type": "created",
                    "conversation": result.conversation_id,
                    "url": f"/chat/{result.conversation_id}/",
                }
            )
        await self.send_json(
            {
                "type": "messages",
                "conversation": result.conversation_id,
                "client_id": client_id,
                "html": result.html,
            }
        )
        generation.start(result.reply_id)

    async def do_send(self, content: dict[str, Any], client_id: str) -> None:
        result = await database_sync_to_async(actions.do_send_message)(
            user_id=self.user_id,
            conversation_id=content.get("conversation"),
            text=content.get("text"),
            attachment_ids=content.get("attachments") or [],
            model=content.get("model"),
        )
        await self._started(result, client_id)

    async def do_edit(self, content: dict[str, Any], client_id: str) -> None:
        result = await database_sync_to_async(actions.do_edit_message)(
            user_id=self.user_id, message_id=content.get("message"), text=content.get("text")
        )
        await self._started(result, client_id)

    async def do_regenerate(self, content: dict[str, Any], client_id: str) -> None:
        result = await database_sync_to_async(actions.do_regenerate)(
            user_id=self.user_id, message_id=content.get("message")
        )
        await self._started(result, client_id)

    async def do_stop(self, content: dict[str, Any], client_id: str) -> None:
        message_id = await database_sync_to_async(actions.check_message_id)(
            user_id=self.user_id, message_id=content.get("message")
        )
        await generation.request_stop(message_id)

    async def dispatch(self, message: dict[str, Any]) -> None:
        # Deltas arrive many times a second per reply and touch no database: skip
        # Channels' per-message trip to the database thread (close_old_connections).
        if message.get("type") == "chat.event":
            await self.send_json(message["payload"])
            return
        await super().dispatch(message)

    async def chat_event(self, event: dict[str, Any]) -> None:
        await self.send_json(event["payload"])
