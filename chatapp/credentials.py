"""Upstream credentials encrypted at rest with Fernet.

The key comes from ``SWITCHBOARD_ENCRYPTION_KEY`` (or its generated file in the
data directory), never from the database it protects.
"""

from __future__ import annotations

from functools import cache

from cryptography.fernet import Fernet, InvalidToken
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


@cache
def _fernet(key: str) -> Fernet:
    try:
        return Fernet(key.encode())
    except ValueError:
        raise ImproperlyConfigured(
            "SWITCHBOARD_ENCRYPTION_KEY is not a Fernet key: expected 32 url-safe base64-encoded bytes "
            "(python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())')"
        ) from None


def encrypt(plaintext: str) -> str:
    if not plaintext:
        return ""
    return _fernet(settings.SWITCHBOARD_ENCRYPTION_KEY).encrypt(plaintext.encode()).decode()


def decrypt(token: str) -> str:
    if not token:
        return ""
    try:
        return _fernet(settings.SWITCHBOARD_ENCRYPTION_KEY).decrypt(token.encode()).decode()
    except InvalidToken:
        raise ImproperlyConfigured(
            "a stored provider credential cannot be decrypted: SWITCHBOARD_ENCRYPTION_KEY "
            "is not the key it was encrypted with"
        ) from None
