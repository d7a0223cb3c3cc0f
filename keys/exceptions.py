"""What ``keys`` refuses, as domain exceptions.

``keys`` knows who may call and what it costs; it knows nothing of HTTP dialects.
The relay maps these to each dialect's status, error body and rate-limit headers
(``chatapp.relay.errors.from_domain``); the browser chat shows their message.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class RateWindow:
    """One rate limit as a client sees it: its limit, what is left, when it resets."""

    kind: str  # "requests" | "tokens"
    limit: int
    remaining: int
    resets_at: datetime


class KeyRefused(Exception):
    """The key cannot be used at all.

    ``reason`` is one of ``missing`` (no key sent), ``unknown`` (no such key),
    ``revoked``, ``disabled``, ``owner_disabled`` or ``expired``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class LimitExceeded(Exception):
    """A rate limit, the concurrency limit or a budget would be exceeded by this request.

    ``kind``: ``rpm``, ``rpd``, ``tpm``, ``tpd``, ``concurrency``, ``token_budget`` or
    ``money_budget``; ``limit`` and ``used`` in the limit's unit (money in the
    currency); ``resets_at`` when the window or period ends (None: never, or when a
    request in flight ends); ``retry_after`` in whole seconds.
    """

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        limit: object,
        used: object,
        resets_at: datetime | None,
        retry_after: int | None,
        rate: tuple[RateWindow, ...] = (),
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.limit = limit
        self.used = used
        self.resets_at = resets_at
        self.retry_after = retry_after
        self.rate = rate

    @property
    def is_budget(self) -> bool:
        return self.kind in ("token_budget", "money_budget")


class LimiterUnavailable(Exception):
    """The limiter cannot decide now (its counters are being rebuilt); try again shortly."""

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
