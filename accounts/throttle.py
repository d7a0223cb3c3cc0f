"""Sign-in throttling: slow guessing down without letting anyone lock someone else out.

Who is asking.  The client address is the direct peer (``REMOTE_ADDR``), unless
that peer is one of ``SWITCHBOARD_TRUSTED_PROXIES``: then it is the right-most
address in ``X-Forwarded-For`` that is not itself a trusted proxy.  Everything to
the left of that is whatever the client chose to send, so it is never believed.
Behind a proxy that is not listed, every user shares the proxy's address.

The rule, with N = ``SWITCHBOARD_LOGIN_FAILURE_LIMIT`` and W =
``SWITCHBOARD_LOGIN_FAILURE_WINDOW`` (each count runs for W seconds from its first
failure):

1. One address guessing one email: after N failures that pair pauses, the right
   password included, until its count runs out.
2. One address guessing many emails: after ``ADDRESS_FACTOR`` × N failures the
   address pauses for every email.
3. Many addresses guessing one email: once an email has N failures from anywhere,
   an address that has already failed for that email must wait before trying it
   again: 1 s, doubling with each further failure on the email, up to W.  An
   address that has not failed for that email is never held back, so guessing
   from elsewhere slows itself down but cannot keep alice from signing in from
   her own computer.  (If she mistyped her password during such a run, her
   address waits like any other that failed, at most W.)

A refused attempt never reaches the password check and counts as nothing.  A
successful sign-in clears its own pair only; the address and email counts run
out on their own, so one valid account cannot reset a guessing run.

Counters live in the cache (Redis when configured, so every worker shares them).
When the cache does not answer, every call raises ``ThrottleUnavailable`` and
sign-in refuses with 503: without counters guessing would be unlimited.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

from django.conf import settings
from django.core.cache import cache
from django.http import HttpRequest
from redis.exceptions import RedisError

# Rule 2: an address may fail this many times N, across emails, before it pauses.
ADDRESS_FACTOR = 4

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ThrottleUnavailable(Exception):
    """The cache holding the counters does not answer; sign-in cannot be decided."""


@contextmanager
def _counters() -> Iterator[None]:
    try:
        yield
    except (RedisError, OSError) as exc:  # OSError: ConnectionError, TimeoutError
        raise ThrottleUnavailable(f"{type(exc).__name__}: {exc}") from exc


# --- Who is asking. ---


@functools.lru_cache(maxsize=8)
def _networks(specs: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(spec) for spec in specs)


def _parse_hop(hop: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address from ``X-Forwarded-For``: ``1.2.3.4``, ``1.2.3.4:80``, ``[::1]:80`` or ``::1``."""
    if hop.startswith("["):
        hop = hop[1:].partition("]")[0]
    elif hop.count(":") == 1:
        hop = hop.partition(":")[0]
    try:
        address = ipaddress.ip_address(hop)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def _is_trusted(hop: str, networks: tuple[Network, ...]) -> bool:
    address = _parse_hop(hop)
    return address is not None and any(address in network for network in networks)


def client_address(request: HttpRequest) -> str:
    """The address sign-in throttling counts against (see the module docstring)."""
    peer = request.META.get("REMOTE_ADDR") or "unknown"
    networks = _networks(tuple(settings.SWITCHBOARD_TRUSTED_PROXIES))
    if not _is_trusted(peer, networks):
        return peer
    forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
    hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
    address = peer
    for hop in reversed(hops):
        # Each hop we reach was appended by a trusted proxy; the first one that is
        # not a proxy itself is the client.  A hop that is not an address at all
        # is not a trusted proxy either: it is counted as given.
        parsed = _parse_hop(hop)
        address = str(parsed) if parsed is not None else hop[:64]
        if not _is_trusted(hop, networks):
            return address
    return address  # every hop is a trusted proxy: the left-most is the client


# --- Counting. ---


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def _keys(email: str, address: str) -> dict[str, str]:
    email = email.strip().lower()
    pair = _digest(email, address)
    return {
        "pair": f"login-fail:pair:{pair}",
        "last": f"login-fail:last:{pair}",
        "address": f"login-fail:addr:{_digest(address)}",
        "email": f"login-fail:email:{_digest(email)}",
    }


def _email_delay(email_failures: int) -> int:
    """Rule 3: seconds an address that failed for an email waits between its attempts."""
    limit = settings.LOGIN_FAILURE_LIMIT
    if email_failures < limit:
        return 0
    return min(settings.LOGIN_FAILURE_WINDOW, 2 ** min(email_failures - limit, 62))


def retry_after(email: str, address: str) -> int:
    """Seconds before ``address`` may try to sign in as ``email``; 0 means now."""
    keys = _keys(email, address)
    with _counters():
        found = cache.get_many(keys.values())
    count = {name: int(found.get(key, 0)) for name, key in keys.items() if name != "last"}
    limit = settings.LOGIN_FAILURE_LIMIT
    if count["pair"] >= limit or count["address"] >= ADDRESS_FACTOR * limit:
        return int(settings.LOGIN_FAILURE_WINDOW)
    last_failure = found.get(keys["last"])
    if last_failure is None:
        return 0  # this address has not failed for this email: never held back
    wait = float(last_failure) + _email_delay(count["email"]) - time.time()
    return max(0, math.ceil(wait))


def record_failure(email: str, address: str) -> None:
    keys = _keys(email, address)
    window = settings.LOGIN_FAILURE_WINDOW
    with _counters():
        for name in ("pair", "address", "email"):
            # add() only creates the key (with the window as its TTL); incr() is
            # atomic in Redis and in locmem, so concurrent failures are all counted.
            cache.add(keys[name], 0, timeout=window)
            try:
                cache.incr(keys[name])
            except ValueError:  # expired between add and incr
                cache.set(keys[name], 1, timeout=window)
        cache.set(keys["last"], time.time(), timeout=window)


def record_success(email: str, address: str) -> None:
    keys = _keys(email, address)
    with _counters():
        cache.delete_many([keys["pair"], keys["last"]])
