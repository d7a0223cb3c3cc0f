"""The console's access matrix, generated from the URL conf.

Every URL pattern under the ``console`` namespace (accounts', keys', the catalog's
and any added later) is requested as anonymous, alice (member), bob (another
member, on alice's objects), frank (finance) and carol (admin), by GET and POST.
The expected status comes from the view itself: ``console_read`` / ``console_write``
(set by ``accounts.roles.console_page``) and the methods a ``require_*`` decorator
allows.  A console view without those attributes, an unnamed pattern or a path
parameter this file cannot fill fails the test: a new page cannot slip past.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver, reverse

from accounts.models import AuditEvent, Role, User
from keys import ledger
from tests.conftest import make_user

LOGIN = "/accounts/login/"


@dataclass(frozen=True)
class ConsoleURL:
    name: str  # without the namespace
    route: str
    params: tuple[str, ...]
    view: Callable[..., Any]

    def __str__(self) -> str:
        return self.name


def _walk(patterns: list[Any], prefix: str = "") -> Iterator[tuple[str, URLPattern]]:
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            yield from _walk(pattern.url_patterns, prefix + str(pattern.pattern))
        else:
            yield prefix + str(pattern.pattern), pattern


def console_urls() -> list[ConsoleURL]:
    """Every pattern of the ``console`` namespace, as mounted by chatapp/urls.py."""
    found = [
        resolver
        for resolver in get_resolver().url_patterns
        if isinstance(resolver, URLResolver) and resolver.namespace == "console"
    ]
    assert len(found) == 1, "one resolver with the console namespace"
    urls = []
    for route, pattern in _walk(found[0].url_patterns):
        assert pattern.name, f"console pattern {route!r} has no name: name it"
        params = tuple(pattern.pattern.regex.groupindex)
        urls.append(ConsoleURL(pattern.name, route, params, pattern.callback))
    return urls


CONSOLE_URLS = console_urls()


# --- The objects that fill path parameters ---


@dataclass
class Cast:
    alice: User
    bob: User
    carol: User
    frank: User
    objects: dict[str, Any]  # kind → object


# Kinds of object a member owns: another member asking for one gets 404.
OWNED_BY_ALICE = {"user", "key", "usage", "statement"}


@pytest.fixture
def cast(transactional_db) -> Cast:
    # transactional_db: a provider's Test relays a real request, and the ledger's writer
    # thread records it on its own connection; the tables are emptied after each test, so
    # no such record outlives it (with `db` it was committed outside the test's transaction).
    from datetime import date

    from chatapp.models import CatalogModel, Provider, Route
    from keys.models import ApiKey, ModelPrice, Statement, StatementMonth, UsageRecord

    alice = make_user("alice@example.com")
    key, _raw = ApiKey.issue(user=alice, name="laptop")
    provider = Provider.objects.create(
        name="upstream", type="openai", base_url="http://127.0.0.1:9/v1", timeout=1
    )
    model = CatalogModel.objects.create(name="gpt-test")
    route = Route.objects.create(model=model, provider=provider, upstream_model="gpt-test-1")
    price = ModelPrice.objects.create(
        model=model, input_per_mtok=Decimal("1"), output_per_mtok=Decimal("2"), currency="USD"
    )
    record = UsageRecord.objects.create(
        request_id="req-1", user=alice, key=key, model="gpt-test", status="ok"
    )
    month = StatementMonth.objects.create(month=date(2026, 10, 1), zone="UTC", currency="USD")
    statement = Statement.objects.create(month=month, user=alice, csv_file=b"a", xlsx_file=b"b")
    return Cast(
        alice=alice,
        bob=make_user("bob@example.com"),
        carol=make_user("carol@example.com", Role.ADMIN),
        frank=make_user("frank@example.com", Role.FINANCE),
        objects={
            "user": alice,
            "key": key,
            "provider": provider,
            "model": model,
            "route": route,
            "price": price,
            "usage": record,
            "statement": statement,
            "month": month,
        },
    )


def kind_of(url: ConsoleURL, param: str) -> str:
    """What a path parameter names: ``user_id`` a user; ``pk`` the kind the URL's name starts with."""
    if param.endswith("_id"):
        return param.removesuffix("_id")
    if param == "pk":
        return url.name.split("_")[0]
    if param == "ref" and url.name.startswith("price"):
        return "model name"
    return param


def fill(url: ConsoleURL, cast: Cast) -> tuple[str, set[str]]:
    """The URL with its parameters filled, and the kinds of object it names."""
    kwargs: dict[str, Any] = {}
    kinds = set()
    for param in url.params:
        kind = kind_of(url, param)
        if kind == "model name":
            kwargs[param] = cast.objects["model"].name
            kinds.add("model")
            continue
        if param == "kind":  # a statement file's format
            kwargs[param] = "csv"
            continue
        if kind == "month":  # a statement month, by its YYYY-MM
            kwargs[param] = str(cast.objects["month"])
            kinds.add(kind)
            continue
        if kind not in cast.objects:
            pytest.fail(
                f"console:{url.name} ({url.route}) takes the path parameter {param!r} "
                f"(read as an object of kind {kind!r}), which tests/test_console_access.py "
                f"cannot fill: create such an object in the `cast` fixture and map it in kind_of()"
            )
        kwargs[param] = cast.objects[kind].pk
        kinds.add(kind)
    return reverse(f"console:{url.name}", kwargs=kwargs), kinds


# --- What the view declares ---


def roles_of(view: Callable[..., Any], url: ConsoleURL) -> tuple[tuple[str, ...], tuple[str, ...]]:
    read = getattr(view, "console_read", None)
    write = getattr(view, "console_write", None)
    if read is None or write is None:
        pytest.fail(
            f"console:{url.name} ({url.route}) is not guarded by accounts.roles.console_page "
            "(no console_read/console_write): every console view must be"
        )
    return tuple(read), tuple(write)


def _chain(view: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    while view is not None:
        yield view
        view = getattr(view, "__wrapped__", None)  # type: ignore[assignment]


def allowed_methods(view: Callable[..., Any]) -> tuple[set[str] | None, bool]:
    """The methods a ``require_*`` decorator allows (None: any), and whether it runs first.

    ``require_http_methods`` keeps its list in its wrapper's closure; "first" means
    it wraps ``console_page``, so even an anonymous visitor gets its 405.
    """
    guarded = False
    for function in _chain(view):
        if "console_page" in getattr(function, "__qualname__", ""):
            guarded = True
        for cell in getattr(function, "__closure__", None) or ():
            try:
                value = cell.cell_contents
            except ValueError:
                continue
            if (
                isinstance(value, list | tuple)
                and value
                and all(isinstance(item, str) and item.isupper() for item in value)
            ):
                return set(value), not guarded
    return None, False


# --- The matrix ---

VISITORS = ("anonymous", "alice", "bob", "frank", "carol")


def expected(url: ConsoleURL, visitor: str, user: User | None, method: str, kinds: set[str]) -> str:
    """``login`` | ``403`` | ``404`` | ``405`` | ``ok`` (a page or a redirect) | ``done``."""
    read, write = roles_of(url.view, url)
    methods, method_first = allowed_methods(url.view)
    if methods is not None and method not in methods and method_first:
        return "405"
    if user is None:
        return "login"
    if user.role not in read and user.role != Role.ADMIN:
        return "403"
    if method == "POST" and user.role not in write and user.role != Role.ADMIN:
        return "403"
    if methods is not None and method not in methods:
        return "405"
    if visitor == "bob" and kinds & OWNED_BY_ALICE:
        return "404"
    return "ok" if method == "GET" else "done"


def check(response: Any, outcome: str, what: str) -> None:
    status = response.status_code
    location = response.get("Location", "")
    if outcome == "login":
        assert status == 302, f"{what}: expected a redirect to sign in, got {status}"
        assert location.startswith(LOGIN), f"{what}: redirected to {location}, not to sign in"
    elif outcome in ("403", "404", "405"):
        assert status == int(outcome), f"{what}: expected {outcome}, got {status}"
    elif outcome == "ok":
        assert status in (200, 302), f"{what}: expected 200, got {status}"
        if status == 302:
            assert not location.startswith(LOGIN), f"{what}: sent to sign in"
    else:  # a write the visitor may make, with an empty form: refused by the form, not the role
        assert status < 500, f"{what}: server error {status}"
        assert status not in (401, 403, 405), f"{what}: refused with {status}"
        assert not location.startswith(LOGIN), f"{what}: sent to sign in"


@pytest.mark.parametrize("url", CONSOLE_URLS, ids=str)
def test_the_console_answers_each_role_as_the_view_declares(url: ConsoleURL, cast: Cast) -> None:
    address, kinds = fill(url, cast)
    users: dict[str, User | None] = {
        "anonymous": None,
        "alice": cast.alice,
        "bob": cast.bob,
        "frank": cast.frank,
        "carol": cast.carol,
    }
    # The admin's writes come last: they may change the objects the others ask for.
    for visitor in VISITORS:
        for method in ("GET", "POST"):
            user = users[visitor]
            client = Client()
            if user is not None:
                client.force_login(user)
            outcome = expected(url, visitor, user, method, kinds)
            events = AuditEvent.objects.count()
            response = client.get(address) if method == "GET" else client.post(address, {})
            check(response, outcome, f"{method} {address} as {visitor}")
            if method == "GET":
                # A GET never changes anything: every change writes an audit event.
                assert AuditEvent.objects.count() == events, f"GET {address} changed something"
    ledger.flush(5)  # what this test relayed is written while its database is still here


def test_every_console_url_is_in_the_matrix() -> None:
    names = {url.name for url in CONSOLE_URLS}
    # The foundation's and accounts' own pages at least; the other apps' join by themselves.
    assert {"home", "users", "user", "user_new", "audit"} <= names


def test_a_view_without_console_page_fails_the_matrix() -> None:
    def bare(request: Any) -> None:
        return None

    url = ConsoleURL("bare", "bare/", (), bare)
    with pytest.raises(pytest.fail.Exception, match="not guarded by accounts.roles.console_page"):
        expected(url, "alice", None, "GET", set())


def test_an_unknown_path_parameter_fails_the_matrix(cast: Cast) -> None:
    url = ConsoleURL("users", "users/<int:invoice_id>/", ("invoice_id",), CONSOLE_URLS[0].view)
    with pytest.raises(pytest.fail.Exception, match="cannot fill"):
        fill(url, cast)
