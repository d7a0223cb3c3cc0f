"""API key → principal, cached with explicit invalidation.

Every request looks its key up here.  The entry (``chatapp.hotstore``: Redis when
configured) holds only the key's id and state, never the secret; any change to the
key or its owner deletes the entry at once (``invalidate_*`` below, wired to model
signals in ``keys.apps``), so a revoked key fails on its very next request in every
process.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from channels.db import database_sync_to_async
from django.db import transaction
from django.utils import timezone

from chatapp import hotstore
from keys.exceptions import KeyRefused
from keys.limiter import Limits
from keys.models import ApiKey, hash_key

CACHE_SECONDS = 300
MISSING = "missing"


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: int
    key_name: str
    prefix: str
    user_id: int
    user_email: str
    state: str  # active | revoked | disabled | owner_disabled
    expires_at: datetime | None
    allowed_models: frozenset[str]  # empty: every enabled model
    is_web_key: bool
    limits: Limits = Limits()

    @property
    def label(self) -> str:
        return f"API key {self.prefix}…"

    def may_use(self, model: str) -> bool:
        return not self.allowed_models or model in self.allowed_models


def cache_key(digest: str) -> str:
    return f"apikey:{digest}"


def _load(digest: str) -> Principal | None:
    key = ApiKey.objects.select_related("user").filter(key_hash=digest).first()
    return None if key is None else principal_of(key)


def principal_of(key: ApiKey) -> Principal:
    """The principal of a key row just read (with its user), as the cache would hold it."""
    if key.revoked_at is not None:
        state = "revoked"
    elif not key.enabled:
        state = "disabled"
    elif not key.user.is_active:
        state = "owner_disabled"
    else:
        state = "active"
    return Principal(
        key_id=key.pk,
        key_name=key.name,
        prefix=key.prefix,
        user_id=key.user_id,
        user_email=key.user.email,
        state=state,
        expires_at=key.expires_at,
        allowed_models=frozenset(key.allowed_models or ()),
        is_web_key=key.is_web_key,
        limits=key.limits,
    )


def raw_key_from_headers(authorization: str | None, x_api_key: str | None) -> str | None:
    if x_api_key:
        return x_api_key.strip()
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return None


async def aauthenticate(raw_key: str | None) -> Principal:
    """The principal behind ``raw_key``, or ``KeyRefused`` saying why not."""
    if not raw_key:
        raise KeyRefused(
            "missing",
            "Missing API key: send it as 'Authorization: Bearer <key>' or 'X-Api-Key: <key>'.",
        )
    digest = hash_key(raw_key)
    principal = await aprincipal(digest)
    if principal is None:
        shown = raw_key[:7] + "…" if len(raw_key) > 10 else "…"
        raise KeyRefused("unknown", f"Invalid API key ({shown}): no such key.")
    return check_principal(principal)


async def aprincipal(digest: str) -> Principal | None:
    """The principal of the key with this hash (cached), or None."""
    cached = await hotstore.aget(cache_key(digest))
    if cached is None:
        principal = await database_sync_to_async(_load)(digest)
        # NX: if the key changed while we read it, the change's fresher write wins.
        await hotstore.aadd(cache_key(digest), principal or MISSING, CACHE_SECONDS)
    else:
        principal = None if cached == MISSING else cached
    return principal


# User id → the hash of that user's web key (``keys.actions.do_get_web_key`` makes it
# once; it is never replaced).  With it the chat finds a sender's key in the hot store,
# kept coherent like every principal, instead of the database.
_web_key_hashes: dict[int, str] = {}


def remember_web_key(user_id: int, digest: str) -> None:
    _web_key_hashes[user_id] = digest


def forget_web_keys() -> None:
    """Forget every web key learnt (tests: a new database reuses the users' ids)."""
    _web_key_hashes.clear()


async def awarm_web_key(user_id: int) -> None:
    """Learn the user's web-key hash and cache its principal (a chat page opening)."""
    if user_id in _web_key_hashes:
        return
    digest = await database_sync_to_async(_web_key_hash)(user_id)
    if digest is not None:
        remember_web_key(user_id, digest)
        await aprincipal(digest)


def _web_key_hash(user_id: int) -> str | None:
    return (
        ApiKey.objects.filter(user_id=user_id, is_web_key=True)
        .values_list("key_hash", flat=True)
        .first()
    )


async def aweb_principal(user_id: int) -> Principal | None:
    """The principal of the user's web key, when this process has seen its hash (cached)."""
    digest = _web_key_hashes.get(user_id)
    return None if digest is None else await aprincipal(digest)


def check_principal(principal: Principal) -> Principal:
    if principal.state == "revoked":
        raise KeyRefused("revoked", f"API key {principal.prefix}… has been revoked.")
    if principal.state == "disabled":
        raise KeyRefused("disabled", f"API key {principal.prefix}… is disabled.")
    if principal.state == "owner_disabled":
        raise KeyRefused("owner_disabled", f"The owner of API key {principal.prefix}… is disabled.")
    if principal.expires_at is not None and principal.expires_at <= timezone.now():
        raise KeyRefused(
            "expired", f"API key {principal.prefix}… expired at {principal.expires_at.isoformat()}."
        )
    return principal


def invalidate_key(digest: str) -> None:
    """Forget a key's cached state now, and write its committed state once the change commits.

    The delete makes the very next request reload; the write after commit closes
    the race where a request read the row just before the change committed and
    would otherwise cache the stale state (its write is ``add``-only, see above).
    """
    hotstore.delete(cache_key(digest))
    transaction.on_commit(lambda: _refresh(digest))


def _refresh(digest: str) -> None:
    hotstore.set(cache_key(digest), _load(digest) or MISSING, CACHE_SECONDS)


def invalidate_user_keys(user_id: int) -> None:
    for digest in ApiKey.objects.filter(user_id=user_id).values_list("key_hash", flat=True):
        invalidate_key(digest)
