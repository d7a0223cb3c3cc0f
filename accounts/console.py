"""What every console page shares: the navigation for the viewer's role, and paging.

The console is not an app of its own: each app owns the pages of the data it owns
(``accounts`` users and the audit log, ``keys`` keys, prices and usage, ``chatapp``
providers and models) and lists them in its ``console_urlpatterns``; they are
mounted together under ``/console/`` with the ``console`` namespace
(``chatapp/urls.py``).  Views are guarded by ``accounts.roles.console_page``;
templates extend ``console/base.html``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar
from urllib.parse import urlencode

from django.db import models
from django.http import HttpRequest
from django.urls import NoReverseMatch, reverse
from django.utils.functional import Promise
from django.utils.translation import gettext_lazy as _

from accounts.models import Role, User

EVERYONE = (Role.MEMBER, Role.FINANCE, Role.ADMIN)
STAFF = (Role.FINANCE, Role.ADMIN)  # finance reads, admins change
ADMINS = (Role.ADMIN,)


@dataclass(frozen=True)
class Section:
    url_name: str
    label: str | Promise
    roles: tuple[str, ...]


# In the order of the navigation.  A section whose page is not installed is left out.
SECTIONS = (
    Section("console:users", _("Users"), STAFF),
    Section("console:keys", _("API keys"), EVERYONE),
    Section("console:providers", _("Providers"), ADMINS),
    Section("console:models", _("Models"), STAFF),
    Section("console:prices", _("Prices"), STAFF),
    Section("console:usage", _("Usage"), EVERYONE),
    Section("console:alerts", _("Alerts"), EVERYONE),
    Section("console:reports", _("Reports"), EVERYONE),  # members: their own usage and statements
    Section("console:audit", _("Audit log"), ADMINS),
    Section("docs", _("Docs"), EVERYONE),  # the API guide, chatapp.docs (/docs/)
)


@dataclass(frozen=True)
class NavItem:
    url: str
    label: str | Promise
    current: bool


def sections_for(user: Any) -> list[tuple[Section, str]]:
    """The sections ``user`` may open, with their URLs."""
    if not isinstance(user, User):
        return []
    found = []
    for section in SECTIONS:
        if not user.has_role(*section.roles):
            continue
        try:
            found.append((section, reverse(section.url_name)))
        except NoReverseMatch:
            continue
    return found


def navigation(request: HttpRequest) -> dict[str, Any]:
    """Context processor: ``console_nav`` on console pages (the current section marked)."""
    if not request.path.startswith("/console/"):
        return {}
    items = [
        NavItem(url, section.label, request.path.startswith(url))
        for section, url in sections_for(getattr(request, "user", None))
    ]
    return {"console_nav": items, "can_write": _can_write(request)}


def _can_write(request: HttpRequest) -> bool:
    """Whether to show buttons that change things: finance never gets one it would be refused."""
    user = getattr(request, "user", None)
    return isinstance(user, User) and user.has_role(Role.ADMIN)


Row = TypeVar("Row", bound=models.Model)

PER_PAGE = 50
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass
class Page(Generic[Row]):
    """One page of a keyset-paginated list: rows, and links that keep the filters."""

    rows: list[Row]
    next_url: str | None
    previous_url: str | None


def keyset_page(
    request: HttpRequest,
    queryset: models.QuerySet[Row],
    *,
    per_page: int | None = None,
    by_time: str | None = None,
) -> Page[Row]:
    """The page of ``queryset`` (newest id first) that ``?after=`` / ``?before=`` asks for.

    Keyset paging on the primary key: each page is one indexed range scan, as fast on
    page 2,000 of 100,000 rows as on the first (an OFFSET would read every row
    before it).  Other query parameters (the filters) are kept in the links.

    ``by_time`` (a datetime field): newest first by that field, then by id, for a
    queryset cut to a time range.  By id alone the database would walk the primary
    key back from today to reach an old range; by time it starts at the range's end
    on the field's index.  The cursor then carries the row's time too (``?at=``, in
    microseconds since the epoch).
    """
    per_page = per_page or PER_PAGE
    params = request.GET.copy()
    after = _int(params.pop("after", [None])[-1])
    before = _int(params.pop("before", [None])[-1])
    at = _int(params.pop("at", [None])[-1])
    if by_time is None or (at is None and (after is not None or before is not None)):
        by_time = None  # an id cursor (or a link from before ``by_time``): by id
    order = ("-" + by_time, "-pk") if by_time else ("-pk",)
    if before is not None:
        rows = list(
            _beyond(queryset, by_time, at, before, newer=True).order_by(
                *(name.removeprefix("-") for name in order)
            )[: per_page + 1]
        )
        more_before = len(rows) > per_page
        rows = list(reversed(rows[:per_page]))
        more_after = True
    else:
        ordered = queryset.order_by(*order)
        if after is not None:
            ordered = _beyond(ordered, by_time, at, after, newer=False)
        rows = list(ordered[: per_page + 1])
        more_after = len(rows) > per_page
        rows = rows[:per_page]
        more_before = after is not None
    base = {key: value for key, value in params.items() if value != ""}

    def link(row: Row, direction: str) -> str:
        cursor: dict[str, int] = {direction: row.pk}
        if by_time:
            cursor["at"] = _microseconds(getattr(row, by_time))
        return "?" + urlencode({**base, **cursor})

    return Page(
        rows=rows,
        next_url=link(rows[-1], "after") if rows and more_after else None,
        previous_url=link(rows[0], "before") if rows and more_before else None,
    )


def _beyond(
    queryset: models.QuerySet[Row], by_time: str | None, at: int | None, pk: int, *, newer: bool
) -> models.QuerySet[Row]:
    """The rows after the cursor ``(at, pk)`` (older ones, or ``newer`` ones)."""
    if by_time is None or at is None:
        return queryset.filter(pk__gt=pk) if newer else queryset.filter(pk__lt=pk)
    try:
        moment = EPOCH + timedelta(microseconds=at)
    except OverflowError:  # a hand-edited cursor: outside any time a row can have
        return queryset.none()
    # (time, id) beyond the cursor's: an index range on time, and at the cursor's very
    # time only the ids past its own.
    if newer:
        return queryset.filter(**{f"{by_time}__gte": moment}).exclude(
            **{by_time: moment, "pk__lte": pk}
        )
    return queryset.filter(**{f"{by_time}__lte": moment}).exclude(
        **{by_time: moment, "pk__gte": pk}
    )


def _microseconds(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(microseconds=1)


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None
