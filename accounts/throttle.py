"""Sign-in throttling: a pause after repeated failures, per email and per client address.

Counters live in the cache (Redis when configured, so every worker shares them).
A failure bumps both counters; a success clears the email's counter only, so one
valid account cannot be used to reset a guessing run against others from the same
address.
"""

from __future__ import annotations

import hashlib

from django.conf import settings
from django.core.cache import cache


def _keys(email: str, address: str) -> list[str]:
    digest = hashlib.sha256(email.strip().lower().encode()).hexdigest()[:32]
    return [f"login-fail:email:{digest}", f"login-fail:addr:{address}"]


def is_throttled(email: str, address: str) -> bool:
    counts = cache.get_many(_keys(email, address))
    return any(count >= settings.LOGIN_FAILURE_LIMIT for count in counts.values())


def record_failure(email: str, address: str) -> None:
    for key in _keys(email, address):
        # add() only creates the key (with the window as its TTL); incr() is atomic
        # in Redis and in locmem, so concurrent failures are all counted.
        cache.add(key, 0, timeout=settings.LOGIN_FAILURE_WINDOW)
        try:
            cache.incr(key)
        except ValueError:  # expired between add and incr
            cache.set(key, 1, timeout=settings.LOGIN_FAILURE_WINDOW)


def clear_failures(email: str, address: str) -> None:
    cache.delete(_keys(email, address)[0])
