"""The shared cast and fixtures.

- alice: a member; chats and manages her own keys.
- bob: another member; must never see alice's things.
- carol: an admin; manages everything.
- frank: finance; reads usage and cost reports, manages nothing.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from django.core.cache import cache

from accounts.models import Role, User
from chatapp import hotstore
from chatapp.models import Conversation, Message, MessageStatus
from keys import auth, limiter
from tests.services import USING_REDIS

PASSWORD = "correct horse battery staple"


@pytest.fixture(autouse=True)
def _fast_hasher(settings) -> None:
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    # No test's first request produces last month's statements by surprise (the
    # statements tests turn it on).
    settings.SWITCHBOARD_STATEMENTS_ON_REQUEST = False


@pytest.fixture(autouse=True)
def _public_dns(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This sandbox has no DNS: image hosts in tests (example.com...) resolve to a public address.

    Tests of the resolution rules set their own resolver (tests/chatapp/test_image_urls.py).
    """
    from chatapp.relay import validation

    async def public(host: str) -> list[str]:
        return ["93.184.215.14"]

    monkeypatch.setattr(validation, "resolve_host", public)
    validation.forget_resolved()
    yield
    validation.forget_resolved()


@pytest.fixture(autouse=True)
def _clean_cache() -> Iterator[None]:
    cache.clear()
    hotstore.clear()
    auth.forget_web_keys()  # the users' ids come back in the next test's database
    limiter.reset_local()
    yield
    if USING_REDIS:
        cache.clear()
        hotstore.clear()


def make_user(email: str, role: str = Role.MEMBER, **extra: object) -> User:
    return User.objects.create_user(
        email, PASSWORD, role=role, is_superuser=(role == Role.ADMIN), **extra
    )


def make_streaming_conversation(
    owner: User, text: str = "Hi", **fields: Any
) -> tuple[Conversation, Message]:
    """A new conversation as the ORM writes it: its user turn, and its reply being written.

    ``fields``: the conversation's own (its model chat-model unless given).
    """
    fields.setdefault("model", "chat-model")
    conversation = Conversation.objects.create(owner=owner, **fields)
    turn = Message.objects.create(conversation=conversation, role="user", content=text)
    reply = Message.objects.create(
        conversation=conversation,
        parent=turn,
        role="assistant",
        model=conversation.model,
        status=MessageStatus.STREAMING,
    )
    conversation.current_leaf = reply
    conversation.save()
    return conversation, reply


@pytest.fixture
def alice(db) -> User:
    return make_user("alice@example.com")


@pytest.fixture
def bob(db) -> User:
    return make_user("bob@example.com")


@pytest.fixture
def carol(db) -> User:
    return make_user("carol@example.com", Role.ADMIN)


@pytest.fixture
def frank(db) -> User:
    return make_user("frank@example.com", Role.FINANCE)


@pytest.fixture
async def _close_loop_clients() -> AsyncIterator[None]:
    """Close the per-event-loop HTTP and Redis clients an async test opened."""
    yield
    from chatapp.relay import http as relay_http

    await relay_http.aclose()
    await hotstore.aclose()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if inspect.iscoroutinefunction(getattr(item, "function", None)):
            item.add_marker(pytest.mark.usefixtures("_close_loop_clients"))


def early_in_a_minute(margin: float = 15.0) -> None:
    """Wait for the next minute when this one has less than ``margin`` seconds left.

    Rate windows are fixed minutes (``limiter.windows``): a test that counts requests
    "this minute" must not straddle two (it failed once at hh:mm:59).
    """
    left = 60 - time.time() % 60
    if left < margin:
        time.sleep(left + 0.05)
