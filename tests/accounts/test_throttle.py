"""Sign-in throttling: guessing slows down, but nobody can lock someone else out."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from django.core.cache import cache
from django.test import Client
from django.urls import reverse

from accounts import throttle
from accounts.models import User
from tests.conftest import PASSWORD

pytestmark = pytest.mark.django_db

ALICE_AT_HOME = "192.0.2.10"


def sign_in(client: Client, email: str, password: str, address: str, **headers: str):
    return client.post(
        reverse("accounts:login"),
        {"username": email, "password": password},
        REMOTE_ADDR=address,
        headers=headers,
    )


def signed_in(client: Client) -> bool:
    return "_auth_user_id" in client.session


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The throttle's wall clock, moved by hand (``clock[0] += seconds``)."""
    now = [1_000_000.0]
    monkeypatch.setattr(throttle, "time", SimpleNamespace(time=lambda: now[0]))
    return now


@pytest.fixture(autouse=True)
def _limit(settings) -> None:
    settings.LOGIN_FAILURE_LIMIT = 3
    settings.LOGIN_FAILURE_WINDOW = 900


def test_guessing_from_one_address_pauses_only_that_address(alice: User, bob: User) -> None:
    attacker = Client()
    for _attempt in range(3):
        assert sign_in(attacker, alice.email, "wrong", "203.0.113.5").status_code == 400
    paused = sign_in(attacker, alice.email, PASSWORD, "203.0.113.5")
    assert paused.status_code == 429
    assert paused["Retry-After"] == "900"
    assert "Try again in 15 minutes" in paused.content.decode()
    assert not signed_in(attacker)
    # The same address may still sign in to another account (one typo-prone
    # colleague does not lock a whole office out) ...
    assert sign_in(attacker, bob.email, PASSWORD, "203.0.113.5").status_code == 302
    # ... and alice signs in from her own address.
    alice_client = Client()
    assert sign_in(alice_client, alice.email, PASSWORD, ALICE_AT_HOME).status_code == 302
    assert signed_in(alice_client)


def test_guessing_from_many_addresses_cannot_lock_alice_out(alice: User, clock) -> None:
    # Given 50 wrong passwords for alice, each from a different address
    for number in range(50):
        response = sign_in(Client(), alice.email, "wrong", f"198.51.100.{number}")
        assert response.status_code == 400
    # then alice, from an address that never failed, signs in at once.
    alice_client = Client()
    assert sign_in(alice_client, alice.email, PASSWORD, ALICE_AT_HOME).status_code == 302
    assert signed_in(alice_client)


def test_an_address_that_failed_for_a_guessed_email_waits_longer_each_time(
    alice: User, clock
) -> None:
    # Given 10 failures for alice from 10 addresses (limit 3: 2**7 = 128 s)
    for number in range(10):
        sign_in(Client(), alice.email, "wrong", f"198.51.100.{number}")
    # when the first guesser tries again at once, even the right password is refused
    guesser = Client()
    response = sign_in(guesser, alice.email, PASSWORD, "198.51.100.0")
    assert response.status_code == 429
    assert response["Retry-After"] == "128"
    assert "Try again in 3 minutes" in response.content.decode()
    assert not signed_in(guesser)
    # and 100 s later it is still early, with a shorter wait
    clock[0] += 100
    response = sign_in(guesser, alice.email, PASSWORD, "198.51.100.0")
    assert response.status_code == 429
    assert "Try again in 28 seconds" in response.content.decode()
    # then after the wait the attempt is checked again.
    clock[0] += 28
    assert sign_in(guesser, alice.email, PASSWORD, "198.51.100.0").status_code == 302


def test_the_wait_is_in_chinese_for_chinese_readers(alice: User, clock) -> None:
    for number in range(4):
        sign_in(Client(), alice.email, "wrong", f"198.51.100.{number}")
    response = sign_in(
        Client(), alice.email, "wrong", "198.51.100.0", **{"accept-language": "zh-Hans"}
    )
    assert response.status_code == 429
    assert "登录失败次数过多，请 2 秒后再试。" in response.content.decode()


def test_a_refused_attempt_is_not_counted(alice: User, clock) -> None:
    for _attempt in range(3):
        sign_in(Client(), alice.email, "wrong", "203.0.113.5")
    for _attempt in range(20):
        assert sign_in(Client(), alice.email, "wrong", "203.0.113.5").status_code == 429
    # Twenty refused attempts added nothing to alice's count: after her own typo
    # (the fourth failure) she waits 2 s, not the whole window.
    sign_in(Client(), alice.email, "wrong", ALICE_AT_HOME)
    assert sign_in(Client(), alice.email, PASSWORD, ALICE_AT_HOME).status_code == 429
    clock[0] += 2
    assert sign_in(Client(), alice.email, PASSWORD, ALICE_AT_HOME).status_code == 302


def test_sign_in_answers_503_when_the_cache_is_down(client: Client, alice: User, settings) -> None:
    # A Redis that does not answer (nothing listens on port 1).
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": "redis://127.0.0.1:1/0",
        }
    }
    response = sign_in(client, alice.email, PASSWORD, ALICE_AT_HOME)
    assert response.status_code == 503
    assert "Sign-in cannot be checked right now" in response.content.decode()
    assert not signed_in(client)
    chinese = sign_in(
        client, alice.email, PASSWORD, ALICE_AT_HOME, **{"accept-language": "zh-Hans"}
    )
    assert chinese.status_code == 503
    assert "暂时无法登录" in chinese.content.decode()


def test_sign_in_answers_503_when_recording_a_failure_fails(
    client: Client, alice: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(cache, "add", refuse)
    response = sign_in(client, alice.email, "wrong", ALICE_AT_HOME)
    assert response.status_code == 503
    assert "Sign-in unavailable" in response.content.decode()
