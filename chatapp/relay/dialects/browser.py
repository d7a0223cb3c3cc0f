"""The browser dialect: the chat page's conversations in, WebSocket frames out.

It parses a conversation's branch (message rows and their image files) into a
canonical ``ChatRequest``, and renders the pipeline's items as the JSON frames the
chat page reads (``chatapp.chat.consumers`` documents the protocol).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from chatapp.relay import tokens
from chatapp.relay.canonical import (
    ChatRequest,
    ImagePart,
    Part,
    ReasoningDelta,
    TextDelta,
    TextPart,
)
from chatapp.relay.canonical import Message as Turn
from chatapp.relay.upstreams import UpstreamItem

# --- Requests ---


@dataclass
class Prepared:
    conversation_id: int
    user_id: int
    request: ChatRequest
    key_hash: str  # the owner's web key ("" when its principal is given)
    principal: Any = None  # the web key as keys.auth sees it, when the caller read it
    # What the caller read to build the request, kept for saving the reply without
    # reading it back: the conversation, its messages (with the reply) as they were.
    conversation: Any = None
    messages: list[Any] | None = None
    # The catalog's version the send was checked against moments ago, for a reply
    # started at once (``catalog.aget_model``); None: the reply reads it.
    catalog_version: str | None = None


def _history(message: Any, messages: list[Any]) -> list[Any]:
    """The turns before ``message`` on its branch, oldest first, without failed replies.

    ``messages``: every message of the conversation, with their attachments.
    """
    from chatapp.models import MessageStatus

    by_id = {item.pk: item for item in messages}
    path: list[Any] = []
    node = by_id.get(message.parent_id) if message.parent_id else None
    while node is not None:
        path.append(node)
        node = by_id.get(node.parent_id) if node.parent_id else None
    path.reverse()
    return [
        item
        for item in path
        if not (item.role == "assistant" and item.status == MessageStatus.FAILED)
    ]


def _parts(item: Any) -> list[Part]:
    parts: list[Part] = []
    for attachment in item.attached():
        with attachment.file.open("rb") as handle:
            data = base64.b64encode(handle.read()).decode()
        parts.append(ImagePart(data=data, media_type=attachment.media_type))
    if item.content:
        parts.append(TextPart(item.content))
    return parts


def prepare(
    message_id: int,
    *,
    principal: Any = None,
    conversation: Any = None,
    messages: list[Any] | None = None,
) -> Prepared:
    """The request for assistant message ``message_id``: its branch's turns before it.

    ``principal``: the owner's web key (``keys.auth.Principal``), when the caller
    has just read it; ``conversation`` and ``messages`` (all of its messages with their attachments,
    as ``Conversation.messages_with_attachments`` reads them), when the caller
    has them already.
    """
    from chatapp.models import Conversation, Message
    from keys.actions import do_get_web_key

    if conversation is None:
        conversation = Conversation.objects.get(
            pk=Message.objects.values_list("conversation_id", flat=True).get(pk=message_id)
        )
    if messages is None:
        messages = conversation.messages_with_attachments()
    message = next((item for item in messages if item.pk == message_id), None)
    if message is None:
        raise Message.DoesNotExist(f"message {message_id} is not in its conversation any more")
    request = _request(conversation, _history(message, messages))
    key_hash = "" if principal is not None else do_get_web_key(user=conversation.owner).key_hash
    return Prepared(
        conversation.pk, conversation.owner_id, request, key_hash, principal, conversation, messages
    )


def prepare_new(
    conversation: Any, text: str, principal: Any, *, catalog_version: str | None = None
) -> Prepared:
    """The request of a new conversation's first turn, before either is written.

    ``conversation``: not saved yet (``chatapp.chat.actions.NewConversation``); the
    request is the one ``prepare`` builds once it is.  The ``Prepared`` has no
    conversation id yet (0) and none of the rows.
    """
    from chatapp.chat.fragments import with_attachments
    from chatapp.models import Message

    turn = with_attachments(Message(role="user", content=text), [])
    return Prepared(
        0,
        conversation.owner_id,
        _request(conversation, [turn]),
        "",
        principal,
        catalog_version=catalog_version,
    )


def _request(conversation: Any, history: list[Any]) -> ChatRequest:
    """A reply's request: the conversation's settings and the turns before the reply."""
    turns = [Turn("user" if item.role == "user" else "assistant", _parts(item)) for item in history]
    return ChatRequest(
        model=conversation.model,
        messages=[turn for turn in turns if turn.parts],
        system=[TextPart(conversation.system_prompt)] if conversation.system_prompt.strip() else [],
        temperature=conversation.temperature,
        stream=True,
        include_usage=True,
        dialect="browser",
    )


def fit_context(request: ChatRequest, context_window: int, max_output: int) -> int:
    """Leave out the oldest turns until the request fits; the newest turn always stays.

    Returns how many turns were left out.
    """
    left_out = 0
    while (
        len(request.messages) > 1 and tokens.estimate_request(request) + max_output > context_window
    ):
        request.messages.pop(0)
        left_out += 1
        # A conversation sent upstream starts with the user.
        while len(request.messages) > 1 and request.messages[0].role != "user":
            request.messages.pop(0)
            left_out += 1
    return left_out


# --- Frames ---


class ReplyWriter:
    """The frames of one reply: pieces gathered as they arrive, published in batches.

    ``item`` gathers the text of the upstream's items; ``take`` turns what was
    gathered since the last call into frames, one per run of answer or reasoning,
    numbered by one sequence (``seq``) shared by both kinds: a ``reasoning`` frame
    carries a piece of the model's thinking, a ``delta`` frame a piece of its answer.
    Pieces that arrive close together thus cost one frame, not one each.
    """

    def __init__(self, message_id: int) -> None:
        self.message_id = message_id
        self.seq = 0  # of the last frame taken
        self._text: list[str] = []
        self._reasoning: list[str] = []
        self._pending: list[list[str]] = []  # [kind, text] runs not yet taken

    @property
    def text(self) -> str:
        """The answer so far, taken or not."""
        return "".join(self._text)

    @property
    def reasoning(self) -> str:
        return "".join(self._reasoning)

    def item(self, item: UpstreamItem) -> bool:
        """Gather the item's text; whether there is any."""
        added = False
        for event in item.events:
            if not isinstance(event, TextDelta | ReasoningDelta) or event.choice != 0:
                continue
            if not event.text:
                continue
            if isinstance(event, ReasoningDelta):
                self._reasoning.append(event.text)
                kind = "reasoning"
            else:
                self._text.append(event.text)
                kind = "delta"
            if self._pending and self._pending[-1][0] == kind:
                self._pending[-1][1] += event.text
            else:
                self._pending.append([kind, event.text])
            added = True
        return added

    def take(self) -> list[dict[str, Any]]:
        """The frames of everything gathered since the last call."""
        frames = []
        for kind, text in self._pending:
            self.seq += 1
            frames.append({"type": kind, "message": self.message_id, "seq": self.seq, "text": text})
        self._pending = []
        return frames

    def render_frame(self, html: str) -> dict[str, Any]:
        """The markdown of the text as of the last ``take``."""
        return {"type": "render", "message": self.message_id, "seq": self.seq, "html": html}


def snapshot_frame(message_id: int, snapshot: tuple[Any, ...] | None) -> dict[str, Any]:
    """What a reply still streaming has so far: (seq, text) or (seq, text, reasoning)."""
    seq, text, reasoning = (*snapshot, "")[:3] if snapshot else (0, "", "")
    return {
        "type": "snapshot",
        "message": message_id,
        "seq": seq,
        "text": text,
        "reasoning": reasoning,
    }


def left_out_frame(message_id: int, count: int) -> dict[str, Any]:
    return {"type": "left_out", "message": message_id, "count": count}


def done_frame(message_id: int, status: str, html: str) -> dict[str, Any]:
    return {"type": "done", "message": message_id, "status": status, "html": html}


def title_frame(conversation_id: int, title: str) -> dict[str, Any]:
    return {"type": "title", "conversation": conversation_id, "title": title}


def error_frame(error: str, client_id: str = "") -> dict[str, Any]:
    return {"type": "error", "error": error, "client_id": client_id}


# --- Failures, as the person in the chat reads them ---
#
# A failed reply keeps a small JSON record of what went wrong (``Message.error``),
# never the upstream's words, a key prefix or a provider's name: those are in the
# request's usage record and the log, for admins.  ``failure_text`` words it in the
# language active when it is rendered, so a reload in another language follows.

# pipeline error code → what the person is told
_KINDS = {
    "insufficient_quota": "budget",
    "rate_limit_exceeded": "rate_limit",
    "limiter_unavailable": "busy",
    "upstream_rate_limited": "busy",
    "model_not_allowed": "model",
    "model_not_found": "model",
    "model_not_supported": "model",
    "no_route": "model",
    "image_not_supported": "image",
    "context_length_exceeded": "context",
    "max_tokens_exceeded": "context",
    "upstream_timeout": "timeout",
    "upstream_invalid_request": "rejected",
    "tools_not_supported": "rejected",
    "server_shutting_down": "shutdown",
    "invalid_api_key": "key",
    "key_revoked": "key",
    "key_disabled": "key",
    "key_expired": "key",
    "user_disabled": "account",
}


def failure(
    *, code: str | None, model: str = "", retry_after: str | None = None, period: str = ""
) -> str:
    """The record of a failed reply kept in ``Message.error`` (JSON, no technical detail)."""
    from datetime import timedelta

    from django.utils import timezone

    kind = _KINDS.get(code or "", "upstream")
    record: dict[str, Any] = {"kind": kind}
    if kind in ("model", "image"):
        record["model"] = model
    if kind in ("budget", "rate_limit", "busy") and retry_after and retry_after.isdigit():
        # Whole seconds, rounded down by the limiter: a little more so a reset at
        # midnight is not shown as the day before.
        record["at"] = (timezone.now() + timedelta(seconds=int(retry_after) + 2)).isoformat()
    if kind == "budget":
        record["period"] = period
    return json.dumps(record)


def _wait(at: str) -> str:
    from datetime import datetime

    from django.utils import timezone
    from django.utils.translation import gettext as _
    from django.utils.translation import ngettext

    try:
        seconds = int((datetime.fromisoformat(at) - timezone.now()).total_seconds())
    except ValueError:
        seconds = 0
    if seconds <= 0:
        return _("You can try again now.")
    if seconds < 90:
        return ngettext(
            "Try again in %(count)d second.", "Try again in %(count)d seconds.", seconds
        ) % {"count": seconds}
    minutes = -(-seconds // 60)
    return ngettext(
        "Try again in %(count)d minute.", "Try again in %(count)d minutes.", minutes
    ) % {"count": minutes}


def _reset_date(at: str) -> str:
    from datetime import datetime

    from django.utils import formats, timezone

    try:
        when = timezone.localtime(datetime.fromisoformat(at))
    except ValueError:
        return ""
    # The period ends at midnight: the reset is the first day of the next one.
    return formats.date_format(when, "DATE_FORMAT")


def _sentences(first: str, second: str) -> str:
    from django.utils.translation import gettext as _

    # Chinese sets sentences side by side, English with a space.
    return _("%(first)s %(second)s") % {"first": first, "second": second}


def failure_text(error: str) -> str:
    """A failed reply's record in plain words, in the active language."""
    from django.utils.translation import gettext as _

    try:
        record = json.loads(error) if error.startswith("{") else {}
    except ValueError:
        record = {}
    if not isinstance(record, dict):
        record = {}
    kind = record.get("kind", "upstream")
    model = str(record.get("model") or "")
    at = str(record.get("at") or "")
    if kind == "budget":
        period = record.get("period")
        spent = {
            "daily": _("You have used today's budget."),
            "weekly": _("You have used this week's budget."),
            "monthly": _("You have used this month's budget."),
        }.get(str(period), _("You have used your budget."))
        date = _reset_date(at) if at else ""
        if date:
            return _sentences(spent, _("It resets on %(date)s.") % {"date": date})
        return _sentences(spent, _("Ask an administrator for more."))
    if kind == "rate_limit":
        return _sentences(_("You are sending messages faster than your limit allows."), _wait(at))
    if kind == "busy":
        return _sentences(
            _("The model is busy right now."), _wait(at) if at else _("Try again in a moment.")
        )
    if kind == "model":
        return _("The model “%(model)s” is not available to you any more: pick another model.") % {
            "model": model
        }
    if kind == "image":
        return _("%(model)s cannot read images: remove the image or pick a model that can.") % {
            "model": model
        }
    if kind == "context":
        return _(
            "This conversation is too long for the model: start a new chat, or pick a model "
            "that can read more."
        )
    if kind == "timeout":
        return _("The model took too long to answer. Try again, or pick another model.")
    if kind == "rejected":
        return _("The model could not accept this message. Rephrase it, or pick another model.")
    if kind == "shutdown":
        return _("The server was restarting and could not answer. Send your message again.")
    if kind == "key":
        return _("Your chat access is switched off. Ask an administrator to turn it back on.")
    if kind == "account":
        return _("Your account is disabled.")
    return _("The model could not answer just now. Try again, or pick another model.")
