"""Whose address a sign-in counts against: X-Forwarded-For only from trusted proxies."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import Client, RequestFactory
from django.urls import reverse

from accounts.models import User
from accounts.throttle import client_address
from chatapp.environ import Env
from tests.conftest import PASSWORD

ROOT = Path(__file__).resolve().parents[2]
PROXY = "10.0.0.2"


def address_of(remote_addr: str, forwarded_for: str | None = None) -> str:
    extra = {"REMOTE_ADDR": remote_addr}
    if forwarded_for is not None:
        extra["HTTP_X_FORWARDED_FOR"] = forwarded_for
    return client_address(RequestFactory().post("/accounts/login/", **extra))


def test_without_trusted_proxies_the_header_is_ignored(settings) -> None:
    settings.SWITCHBOARD_TRUSTED_PROXIES = []
    assert address_of("203.0.113.9", "198.51.100.1") == "203.0.113.9"


def test_a_trusted_proxy_gives_the_right_most_untrusted_address(settings) -> None:
    settings.SWITCHBOARD_TRUSTED_PROXIES = ["10.0.0.0/8", "127.0.0.1/32"]
    # The client wrote "1.1.1.1" itself; the outer proxy appended the client's real
    # address, the inner one the outer one's.
    assert address_of(PROXY, "1.1.1.1, 198.51.100.7, 10.0.0.9") == "198.51.100.7"
    assert address_of(PROXY, "198.51.100.7:51234") == "198.51.100.7"
    assert address_of(PROXY, "[2001:db8::7]:443") == "2001:db8::7"
    assert address_of("::ffff:10.0.0.2", "2001:db8::7") == "2001:db8::7"
    # Only proxies in the chain: the left-most is the client; no header: the proxy.
    assert address_of(PROXY, "10.0.0.5, 10.0.0.9") == "10.0.0.5"
    assert address_of(PROXY) == PROXY


def test_a_peer_that_is_not_a_trusted_proxy_cannot_choose_its_address(settings) -> None:
    settings.SWITCHBOARD_TRUSTED_PROXIES = ["10.0.0.0/8"]
    assert address_of("203.0.113.9", "10.0.0.5") == "203.0.113.9"


@pytest.mark.django_db
def test_behind_a_trusted_proxy_one_guesser_does_not_lock_out_everyone(
    settings, alice: User
) -> None:
    settings.SWITCHBOARD_TRUSTED_PROXIES = [PROXY]
    settings.LOGIN_FAILURE_LIMIT = 3

    def sign_in(client: Client, password: str, client_ip: str):
        return client.post(
            reverse("accounts:login"),
            {"username": alice.email, "password": password},
            REMOTE_ADDR=PROXY,
            headers={"x-forwarded-for": client_ip},
        )

    # Given a guesser paused behind the same proxy as alice
    for _attempt in range(3):
        sign_in(Client(), "wrong", "198.51.100.66")
    assert sign_in(Client(), PASSWORD, "198.51.100.66").status_code == 429
    # and trying to pass for someone else through the header is no use,
    assert sign_in(Client(), PASSWORD, "192.0.2.10, 198.51.100.66").status_code == 429
    # alice, behind the same proxy, signs in.
    assert sign_in(Client(), PASSWORD, "192.0.2.10").status_code == 302


def test_the_setting_takes_addresses_and_networks() -> None:
    env = Env({"SWITCHBOARD_TRUSTED_PROXIES": " 127.0.0.1, 10.0.0.0/8 ,::1,fd00::/8"})
    assert env.networks("SWITCHBOARD_TRUSTED_PROXIES") == [
        "127.0.0.1/32",
        "10.0.0.0/8",
        "::1/128",
        "fd00::/8",
    ]
    assert Env({}).networks("SWITCHBOARD_TRUSTED_PROXIES") == []


@pytest.mark.parametrize("value", ["proxy.internal", "10.0.0.1/8", "10.0.0.0/33"])
def test_the_setting_refuses_junk(value: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=r"^SWITCHBOARD_TRUSTED_PROXIES: "):
        Env({"SWITCHBOARD_TRUSTED_PROXIES": value}).networks("SWITCHBOARD_TRUSTED_PROXIES")


def test_junk_in_the_setting_stops_startup_with_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "REDIS_URL"))}
    env.update(
        SWITCHBOARD_DATA_DIR=str(tmp_path),
        SWITCHBOARD_TRUSTED_PROXIES="10.0.0.1,proxy.internal",
        DJANGO_SETTINGS_MODULE="chatapp.settings",
    )
    result = subprocess.run(
        [sys.executable, "-c", "from chatapp.startup import load_settings_or_exit as f; f()"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(
        "switchboard: configuration error: SWITCHBOARD_TRUSTED_PROXIES: 'proxy.internal'"
    )
