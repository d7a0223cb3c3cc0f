"""Errors raised anywhere in the pipeline; each dialect renders them in its own body.

``keys`` raises domain exceptions (``keys.exceptions``) that know nothing of HTTP;
``from_domain`` is the one place that gives them a status, an error type and code.
"""

from __future__ import annotations

from keys.exceptions import KeyRefused, LimiterUnavailable, LimitExceeded, RateWindow

# status → the error type both dialects use for it
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "upstream_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


class RelayError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        rate: tuple[RateWindow, ...] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or ERROR_TYPES.get(status, "api_error")
        self.param = param
        self.code = code
        self.headers = headers or {}
        self.rate = rate  # the key's rate limits, rendered as the dialect's headers


class UpstreamError(Exception):
    """An upstream answered with an error or could not be reached."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        retryable: bool = True,
        body: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after = retry_after
        self.retryable = retryable
        self.body = body


KEY_REFUSALS = {
    # reason → (status, code)
    "missing": (401, "missing_api_key"),
    "unknown": (401, "invalid_api_key"),
    "revoked": (403, "key_revoked"),
    "disabled": (403, "key_disabled"),
    "owner_disabled": (403, "user_disabled"),
    "expired": (403, "key_expired"),
}


def from_domain(exc: KeyRefused | LimitExceeded | LimiterUnavailable) -> RelayError:
    """A refusal from ``keys`` as the error both dialects render."""
    if isinstance(exc, KeyRefused):
        status, code = KEY_REFUSALS[exc.reason]
        return RelayError(status, exc.message, code=code)
    if isinstance(exc, LimiterUnavailable):
        return RelayError(
            503,
            exc.message,
            type="overloaded_error",
            code="limiter_unavailable",
            headers={"retry-after": str(exc.retry_after)},
        )
    headers = {"retry-after": str(exc.retry_after)} if exc.retry_after is not None else {}
    if exc.is_budget:
        return RelayError(
            429,
            exc.message,
            type="insufficient_quota",
            code="insufficient_quota",
            headers=headers,
            rate=exc.rate,
        )
    return RelayError(
        429,
        exc.message,
        type="rate_limit_error",
        code="rate_limit_exceeded",
        headers=headers,
        rate=exc.rate,
    )


def body_too_large(limit: int, size: int | None = None) -> RelayError:
    """The one 413 of ``/v1``, wherever the size is found out (header, reading, Django)."""
    told = f"The request body ({size} bytes) is" if size is not None else "The request body is"
    return RelayError(
        413,
        f"{told} over the limit of {limit} bytes (SWITCHBOARD_MAX_BODY_BYTES).",
        type="request_too_large",
        code="request_too_large",
    )
