"""The chat's refusals and failures speak to the person, in the page's language.

Never a key prefix, a provider's name or an upstream's own words in a frame: those
are in the usage record (and the log) for admins.
"""

from __future__ import annotations

import asyncio
import html
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.utils import timezone

from accounts.models import User
from chatapp.chat.consumers import ChatConsumer
from chatapp.models import CatalogModel, Message, Provider, Route
from chatapp.relay import routing
from chatapp.relay.dialects import browser
from keys import ledger
from keys.actions import do_get_web_key, do_set_limits
from keys.models import ApiKey, UsageRecord
from tests.conftest import early_in_a_minute, make_user
from tests.fake_upstream import Fail, FakeUpstream, Reply

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def upstream(transactional_db: None, settings) -> Iterator[FakeUpstream]:  # type: ignore[no-untyped-def]
    settings.SWITCHBOARD_CHAT_TITLES = False
    routing.reset()
    fake = FakeUpstream().start()
    provider = Provider.objects.create(
        name="acme-cloud", type="openai", base_url=fake.openai_base_url, timeout=5
    )
    model = CatalogModel.objects.create(name="chat-model", display_name="Chat Model")
    Route.objects.create(model=model, provider=provider, upstream_model="up")
    yield fake
    fake.stop()


async def connect(user: User, language: str | None = None) -> WebsocketCommunicator:
    communicator = WebsocketCommunicator(ChatConsumer.as_asgi(), "/ws/chat/")
    communicator.scope["user"] = user
    if language:
        communicator.scope["cookies"] = {"django_language": language}
    connected, _ = await communicator.connect()
    assert connected
    return communicator


async def until(communicator: WebsocketCommunicator, kind: str) -> list[dict[str, Any]]:
    events = []
    while True:
        event = await communicator.receive_json_from(timeout=10)
        events.append(event)
        if event["type"] == kind:
            return events


async def send(ws: WebsocketCommunicator, text: str = "Hello?", **extra: Any) -> None:
    await ws.send_json_to(
        {"action": "send", "conversation": None, "text": text, "attachments": [], **extra}
    )


async def web_key(user: User, **limits: Any) -> ApiKey:
    key = await database_sync_to_async(do_get_web_key)(user=user)
    if limits:
        key = await database_sync_to_async(do_set_limits)(key=key, **limits)
    return key


def assert_nothing_technical(text: str, key: ApiKey) -> None:
    assert key.prefix not in text
    for word in ("acme", "fake", "upstream", "Upstream", "provider", "exhausted", "limit 1"):
        assert word not in text, word


def next_month_first() -> datetime:
    now = timezone.localtime()
    return (now.replace(day=1) + timedelta(days=32)).replace(day=1)


@pytest.mark.parametrize(
    ("language", "spent", "resets"),
    [
        ("en", "You have used this month's budget.", "It resets on {date}."),
        ("zh-hans", "你已用完本月的额度。", "额度将于 {date} 重置。"),
    ],
)
async def test_a_spent_budget_says_so_and_when_it_resets(
    upstream: FakeUpstream, language: str, spent: str, resets: str
) -> None:
    from django.utils import formats, translation

    alice = await database_sync_to_async(make_user)("alice@example.com")
    key = await web_key(alice, token_budget=1, budget_period="monthly")
    ws = await connect(alice, language)
    await send(ws)
    done = (await until(ws, "done"))[-1]
    assert done["status"] == "failed"
    done["html"] = html.unescape(done["html"])
    with translation.override(language):
        date = formats.date_format(next_month_first(), "DATE_FORMAT")
    assert spent in done["html"]
    assert resets.format(date=date) in done["html"]
    assert_nothing_technical(done["html"], key)
    # The technical account is in the usage record, for admins.
    await asyncio.to_thread(ledger.flush)
    record = await UsageRecord.objects.aget(
        request_id=(await Message.objects.aget(pk=done["message"])).request_id
    )
    assert key.prefix in record.error_message
    await ws.disconnect()


@pytest.mark.parametrize(
    ("language", "words"),
    [
        ("en", ("You are sending messages faster than your limit allows.", "Try again in")),
        ("zh-hans", ("你发送消息的速度超过了限额。", "秒后重试")),
    ],
)
async def test_a_rate_limit_says_when_to_try_again(
    upstream: FakeUpstream, language: str, words: tuple[str, str]
) -> None:
    alice = await database_sync_to_async(make_user)("alice@example.com")
    key = await web_key(alice, rpm=1)
    upstream.script(Reply(text="First answer."))
    # Both sends in one fixed minute (it failed once: the first at hh:mm:59.998).
    await asyncio.to_thread(early_in_a_minute, 10)
    ws = await connect(alice, language)
    await send(ws, "One")
    first = await until(ws, "done")
    assert first[-1]["status"] == "complete"
    conversation = first[0]["conversation"]
    await ws.send_json_to(
        {"action": "send", "conversation": conversation, "text": "Two", "attachments": []}
    )
    done = (await until(ws, "done"))[-1]
    assert done["status"] == "failed"
    done["html"] = html.unescape(done["html"])
    for word in words:
        assert word in done["html"]
    assert_nothing_technical(done["html"], key)
    await ws.disconnect()


@pytest.mark.parametrize(
    ("language", "words"),
    [
        ("en", "The model “secret-model” is not available to you: pick another model."),
        ("zh-hans", "你无法使用模型“secret-model”：请选择其他模型。"),
    ],
)
async def test_a_refused_model_is_an_error_frame_in_the_pages_language(
    upstream: FakeUpstream, language: str, words: str
) -> None:
    alice = await database_sync_to_async(make_user)("alice@example.com")
    ws = await connect(alice, language)
    await send(ws, model="secret-model", client_id="c1")
    assert await ws.receive_json_from(timeout=5) == {
        "type": "error",
        "error": words,
        "client_id": "c1",
    }
    await ws.disconnect()


async def test_the_language_follows_the_browser_without_a_cookie(upstream: FakeUpstream) -> None:
    alice = await database_sync_to_async(make_user)("alice@example.com")
    communicator = WebsocketCommunicator(
        ChatConsumer.as_asgi(), "/ws/chat/", headers=[(b"accept-language", b"zh-CN,zh;q=0.9")]
    )
    communicator.scope["user"] = alice
    assert (await communicator.connect())[0]
    await send(communicator, "", client_id="c2")
    assert (await communicator.receive_json_from(timeout=5))["error"] == "请先输入消息。"
    await communicator.disconnect()


async def test_a_model_the_pipeline_refuses_is_named_by_its_display_name(
    upstream: FakeUpstream,
) -> None:
    alice = await database_sync_to_async(make_user)("alice@example.com")
    upstream.script(Reply(text="ok"))
    ws = await connect(alice, "zh-hans")
    await send(ws, "One")
    first = await until(ws, "done")
    await until(ws, "title")
    # The admin disables the model's only route after the conversation started.
    route = await Route.objects.aget(model__name="chat-model")
    route.enabled = False
    await route.asave()
    await ws.send_json_to(
        {"action": "regenerate", "message": first[-1]["message"], "client_id": "c3"}
    )
    answer = await ws.receive_json_from(timeout=5)
    # Refused before anything is saved (the picker no longer offers it), in Chinese.
    assert answer["type"] == "error"
    assert "Chat Model" in answer["error"] or "chat-model" in answer["error"]
    assert "请选择其他模型" in answer["error"]
    await ws.disconnect()


@pytest.mark.parametrize(
    ("language", "words"),
    [
        ("en", "The model could not answer just now. Try again, or pick another model."),
        ("zh-hans", "模型暂时无法回答。请重试，或选择其他模型。"),
    ],
)
async def test_an_upstream_failure_hides_the_upstreams_words(
    upstream: FakeUpstream, language: str, words: str
) -> None:
    alice = await database_sync_to_async(make_user)("alice@example.com")
    key = await web_key(alice)
    upstream.script(*[Fail(500, "acme internal trace 0xdeadbeef")] * 3)
    ws = await connect(alice, language)
    await send(ws)
    done = (await until(ws, "done"))[-1]
    assert done["status"] == "failed"
    done["html"] = html.unescape(done["html"])
    assert words in done["html"]
    assert "0xdeadbeef" not in done["html"]
    assert_nothing_technical(done["html"], key)
    reply = await Message.objects.aget(pk=done["message"])
    assert "0xdeadbeef" not in reply.error
    await asyncio.to_thread(ledger.flush)
    record = await UsageRecord.objects.aget(request_id=reply.request_id)
    assert "0xdeadbeef" in record.error_message
    await ws.disconnect()


def test_every_failure_has_plain_words_in_both_languages() -> None:
    from django.utils import translation

    codes = [*browser._KINDS, "upstream_error", "internal:ValueError"]
    for code in codes:
        record = browser.failure(code=code, model="Chat Model", retry_after="30", period="weekly")
        with translation.override("en"):
            english = browser.failure_text(record)
        with translation.override("zh-hans"):
            chinese = browser.failure_text(record)
        assert english, code
        assert chinese != english, code
        assert not any("a" <= char.lower() <= "z" for char in chinese.replace("Chat Model", "")), (
            code,
            chinese,
        )
    # An error saved before this change (free text from an upstream) is never shown.
    with translation.override("en"):
        assert "secret" not in browser.failure_text("Upstream error: secret acme trace")
