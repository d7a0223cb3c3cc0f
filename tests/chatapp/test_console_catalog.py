"""The catalog's console pages: providers (health, credential, test, import), models and routes."""

from __future__ import annotations

import json
from io import StringIO

import openai
import pytest
from django.core.management import call_command
from django.test import Client

from accounts.audit import SECRET_SHOWN
from accounts.models import AuditEvent, AuditSource, User
from chatapp.actions import do_add_model
from chatapp.models import CatalogModel, Provider, Route
from chatapp.relay import routing
from tests.fake_upstream import Fail
from tests.gateway import UPSTREAM_KEY, Gateway

USER = [{"role": "user", "content": "Hello"}]
SECRET = "sk-live-7c1d5e0f9a8b4c3d2e1f0a9b8c7d6e5f"
NEW_SECRET = "sk-live-replacement-0123456789abcdefWXYZ"


def signed_in(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def htmx(client: Client, method: str, url: str, data: dict[str, object] | None = None):
    call = client.post if method == "post" else client.get
    return call(url, data or {}, HTTP_HX_REQUEST="true")


def add_provider(name: str = "acme", api_key: str = SECRET, **fields: object) -> Provider:
    provider = Provider(
        name=name,
        type=str(fields.pop("type", "openai")),
        base_url=str(fields.pop("base_url", "https://api.acme.test/v1")),
        **fields,  # type: ignore[arg-type]
    )
    provider.api_key = api_key
    provider.save()
    return provider


def provider_form(provider: Provider | None = None, **changes: object) -> dict[str, object]:
    data: dict[str, object] = {
        "name": provider.name if provider else "acme",
        "type": provider.type if provider else "openai",
        "base_url": provider.base_url if provider else "https://api.acme.test/v1",
        "model_path": "",
        "timeout": provider.timeout if provider else 60,
        "api_key": "",
    }
    data.update(changes)
    return data


# --- Providers: the list and its health ---


def test_the_list_shows_each_routes_breaker_after_a_failure(gateway: Gateway, carol: User) -> None:
    # Given one answered request (a latency) and then an upstream that keeps failing
    gateway.openai().chat.completions.create(model="gpt-fake", messages=USER)  # type: ignore[arg-type]
    gateway.fake.script(*[Fail(503, "the upstream is melting")] * 5)
    with pytest.raises(openai.APIStatusError):
        gateway.openai().chat.completions.create(model="gpt-fake", messages=USER)  # type: ignore[arg-type]

    # When the admin opens the provider list (same process: same breakers)
    page = signed_in(carol).get("/console/providers/").content.decode()

    # Then the OpenAI provider's row names the breaker's state, the error and a latency
    row = page.split(f'id="provider-{gateway.openai_provider.pk}"')[1].split("</tr>")[0]
    assert "the upstream is melting" in row
    assert 'class="badge bad">open<' in row
    assert "3 failures" in row
    assert " ms" in row
    assert "as seen by this worker" in page
    other = page.split(f'id="provider-{gateway.anthropic_provider.pk}"')[1].split("</tr>")[0]
    assert 'class="badge ok">closed<' in other


def test_a_provider_page_shows_each_routes_health(gateway: Gateway, carol: User) -> None:
    route = Route.objects.get(model__name="gpt-fake")
    routing.record_failure(route.pk, error="refused by the upstream")
    page = signed_in(carol).get(f"/console/providers/{gateway.openai_provider.pk}/")
    assert page.status_code == 200
    assert "refused by the upstream" in page.content.decode()
    assert "1 failure" in page.content.decode()


# --- Add and edit: the credential is write-only ---


def test_adding_a_provider_never_shows_its_credential(db, carol: User) -> None:
    client = signed_in(carol)
    response = client.post("/console/providers/new/", provider_form(api_key=SECRET), follow=True)
    assert response.status_code == 200
    provider = Provider.objects.get(name="acme")
    assert provider.api_key == SECRET
    assert provider.api_key_encrypted
    assert SECRET not in provider.api_key_encrypted

    pages = [response]
    for url in [
        "/console/providers/",
        f"/console/providers/{provider.pk}/",
        "/console/providers/new/",
        "/console/models/",
    ]:
        pages.append(client.get(url))
    for page in pages:
        assert page.status_code == 200
        assert SECRET not in page.content.decode()
    edit = pages[2].content.decode()
    assert "set, ending in …" + SECRET[-4:] in edit
    assert 'type="password"' in edit
    # The event records that a key was set, never the key.
    event = AuditEvent.objects.get(object_type="provider", action="create")
    assert event.changes["api_key"] == [None, SECRET_SHOWN]
    assert event.source == AuditSource.CONSOLE
    assert event.actor == carol
    assert SECRET not in json.dumps(event.changes)


def test_a_blank_credential_keeps_the_stored_one(db, carol: User) -> None:
    provider = add_provider()
    client = signed_in(carol)
    response = client.post(
        f"/console/providers/{provider.pk}/", provider_form(provider, timeout=42, api_key="")
    )
    assert response.status_code == 302
    provider.refresh_from_db()
    assert provider.api_key == SECRET
    assert provider.timeout == 42
    event = AuditEvent.objects.get(object_type="provider", action="update")
    assert event.changes == {"timeout": ["600.0", "42.0"]}


def test_a_new_credential_replaces_the_stored_one_and_is_masked_in_the_log(db, carol: User) -> None:
    provider = add_provider()
    response = signed_in(carol).post(
        f"/console/providers/{provider.pk}/", provider_form(provider, api_key=NEW_SECRET)
    )
    assert response.status_code == 302
    provider.refresh_from_db()
    assert provider.api_key == NEW_SECRET
    event = AuditEvent.objects.get(object_type="provider", action="update")
    assert event.changes == {"api_key": [SECRET_SHOWN, SECRET_SHOWN]}
    assert NEW_SECRET not in json.dumps(event.changes)
    assert SECRET not in json.dumps(event.changes)


def test_a_refused_provider_form_changes_nothing(db, carol: User) -> None:
    provider = add_provider()
    response = signed_in(carol).post(
        f"/console/providers/{provider.pk}/",
        provider_form(provider, base_url="not a url", timeout=5, api_key=NEW_SECRET),
    )
    assert response.status_code == 400
    page = response.content.decode()
    assert 'id="id_base_url-error"' in page  # beside its field
    assert NEW_SECRET not in page
    assert SECRET not in page
    provider.refresh_from_db()
    assert provider.base_url == "https://api.acme.test/v1"
    assert provider.timeout == 600
    assert provider.api_key == SECRET
    assert not AuditEvent.objects.exists()


def test_the_type_choices_come_from_the_upstream_registry(db, carol: User, monkeypatch) -> None:
    from chatapp.relay import upstreams

    monkeypatch.setitem(upstreams.UPSTREAMS, "madeup", "x.y.Z")
    page = signed_in(carol).get("/console/providers/new/").content.decode()
    assert 'value="madeup"' in page
    assert 'value="anthropic"' in page


def test_a_duplicate_name_is_refused_beside_the_field(db, carol: User) -> None:
    add_provider("taken")
    response = signed_in(carol).post("/console/providers/new/", provider_form(name="taken"))
    assert response.status_code == 400
    assert 'id="id_name-error"' in response.content.decode()
    assert Provider.objects.count() == 1


def test_disabling_a_provider_is_recorded(db, carol: User) -> None:
    provider = add_provider()
    response = signed_in(carol).post(
        f"/console/providers/{provider.pk}/enabled/", {"enabled": "0", "next": "https://evil.test/"}
    )
    assert response.status_code == 302
    assert response["Location"] == f"/console/providers/{provider.pk}/"
    provider.refresh_from_db()
    assert not provider.enabled
    event = AuditEvent.objects.get(object_type="provider")
    assert (event.action, event.changes) == ("disable", {"enabled": [True, False]})


# --- Test and import, against the fake upstream ---


def test_the_test_button_shows_the_latency(gateway: Gateway, carol: User) -> None:
    url = f"/console/providers/{gateway.openai_provider.pk}/test/"
    response = htmx(signed_in(carol), "post", url)
    assert response.status_code == 200
    text = response.content.decode()
    assert text.lstrip().startswith('<div id="test-result"')  # the partial only
    assert "answered in" in text
    assert " ms" in text
    sent = gateway.fake.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.json["model"] == "gpt-upstream"  # its first route's upstream model


def test_the_test_button_shows_the_upstreams_error(gateway: Gateway, carol: User) -> None:
    gateway.fake.script(Fail(401, "Incorrect API key provided: sk-nope"))
    url = f"/console/providers/{gateway.anthropic_provider.pk}/test/"
    client = signed_in(carol)
    text = htmx(client, "post", url, {"upstream_model": "claude-x"}).content.decode()
    assert "failed" in text
    assert "Incorrect API key provided" in text
    assert gateway.fake.requests[-1].json["model"] == "claude-x"
    # Without htmx: the whole page, with the same result
    gateway.fake.script(Fail(401, "Incorrect API key provided: sk-nope"))
    page = client.post(url).content.decode()
    assert "<html" in page
    assert "Incorrect API key provided" in page
    assert UPSTREAM_KEY not in page


def test_import_offers_the_upstreams_models_not_in_the_catalog(
    gateway: Gateway, carol: User
) -> None:
    client = signed_in(carol)
    do_add_model(name="gpt-4o-mini", provider=gateway.openai_provider, upstream_model="x")
    url = f"/console/providers/{gateway.openai_provider.pk}/import/"
    page = client.get(url).content.decode()
    assert 'value="gpt-4o"' in page
    assert 'value="text-embedding-3-small"' in page
    assert 'value="gpt-4o-mini"' not in page  # in the catalog already
    assert gateway.fake.requests[-1].headers["authorization"] == f"Bearer {UPSTREAM_KEY}"

    response = client.post(url, {"models": ["gpt-4o", "text-embedding-3-small"]})
    assert response.status_code == 302
    route = Route.objects.get(model__name="gpt-4o")
    assert (route.provider, route.upstream_model) == (gateway.openai_provider, "gpt-4o")
    assert CatalogModel.objects.get(name="text-embedding-3-small").supports_embeddings
    # The new model answers through /v1 at once.
    reply = gateway.openai().chat.completions.create(model="gpt-4o", messages=USER)  # type: ignore[arg-type]
    assert reply.choices[0].message.content
    assert set(
        AuditEvent.objects.filter(action="create").values_list("object_type", flat=True)
    ) == {"catalogmodel", "route"}


def test_import_reads_anthropics_model_list(gateway: Gateway, carol: User) -> None:
    url = f"/console/providers/{gateway.anthropic_provider.pk}/import/"
    response = htmx(signed_in(carol), "get", url)
    text = response.content.decode()
    assert text.lstrip().startswith('<div id="import"')
    assert 'value="claude-sonnet-4-6"' in text
    sent = gateway.fake.requests[-1]
    assert sent.path == "/v1/models"
    assert sent.headers["x-api-key"] == UPSTREAM_KEY
    assert "anthropic-version" in sent.headers


def test_import_refuses_a_model_already_in_the_catalog(gateway: Gateway, carol: User) -> None:
    url = f"/console/providers/{gateway.openai_provider.pk}/import/"
    response = signed_in(carol).post(url, {"models": ["gpt-4o", "gpt-fake"]})
    assert response.status_code == 400
    assert not CatalogModel.objects.filter(name="gpt-4o").exists()


def test_import_shows_why_the_list_cannot_be_read(db, carol: User) -> None:
    provider = add_provider(base_url="http://127.0.0.1:9/v1")
    page = signed_in(carol).get(f"/console/providers/{provider.pk}/import/").content.decode()
    assert "could not be read" in page
    assert "cannot reach" in page


# --- Models and routes ---


def test_the_model_list_filters_and_pages(db, frank: User) -> None:
    acme, other = add_provider(), add_provider("other", base_url="https://o.test/v1")
    for number in range(55):
        do_add_model(name=f"m-{number:02d}", provider=acme, upstream_model="u")
    do_add_model(name="special", provider=other, upstream_model="deep-thought")
    CatalogModel.objects.filter(name="m-00").update(enabled=False)
    client = signed_in(frank)

    first = client.get("/console/models/").content.decode()
    assert "special" in first
    assert "m-06" in first
    assert "m-05" not in first
    assert "after=" in first
    rest = client.get("/console/models/?after=" + first.split("after=")[1].split('"')[0])
    assert "m-05" in rest.content.decode()
    assert "special" not in rest.content.decode()

    assert "m-01" not in client.get("/console/models/?provider=other").content.decode()
    searched = client.get("/console/models/?q=deep-thou").content.decode()
    assert "special" in searched
    assert "m-54" not in searched
    enabled = client.get("/console/models/?status=enabled&q=m-0").content.decode()
    assert "m-00" not in enabled
    assert "m-01" in enabled
    disabled = client.get("/console/models/?status=disabled").content.decode()
    assert "m-00" in disabled
    assert "m-01" not in disabled
    rows = htmx(client, "get", "/console/models/?q=special").content.decode()
    assert rows.lstrip().startswith('<div id="model-rows"')


def test_a_route_is_edited_in_place(db, carol: User) -> None:
    acme, other = add_provider(), add_provider("other", base_url="https://o.test/v1")
    model, route, _created = do_add_model(name="m", provider=acme, upstream_model="u1")
    client = signed_in(carol)
    url = f"/console/routes/{route.pk}/"

    editor = htmx(client, "get", url).content.decode()
    assert editor.lstrip().startswith(f'<tr id="route-{route.pk}" class="editing"')
    assert f'form="route-form-{route.pk}"' in editor

    prefix = f"route-{route.pk}-"
    data = {
        prefix + "provider": other.pk,
        prefix + "upstream_model": "u2",
        prefix + "priority": 5,
        prefix + "weight": 3,
    }
    row = htmx(client, "post", url, data).content.decode()
    assert row.lstrip().startswith(f'<tr id="route-{route.pk}">')
    assert "u2" in row
    assert "disabled" in row
    route.refresh_from_db()
    assert (route.provider, route.upstream_model, route.priority, route.weight, route.enabled) == (
        other,
        "u2",
        5,
        3,
        False,
    )
    event = AuditEvent.objects.get(object_type="route", action="update")
    assert event.changes["upstream_model"] == ["u1", "u2"]
    assert event.changes["provider"] == ["acme", "other"]

    # A refused edit comes back in place with its error, and changes nothing.
    refused = htmx(client, "post", url, {**data, prefix + "weight": 0}).content.decode()
    assert 'class="editing"' in refused
    assert "field-error" in refused
    route.refresh_from_db()
    assert route.weight == 3


def test_a_route_edit_works_without_javascript(db, carol: User) -> None:
    acme = add_provider()
    model, route, _created = do_add_model(name="m", provider=acme, upstream_model="u1")
    client = signed_in(carol)
    response = client.get(f"/console/routes/{route.pk}/")
    assert response["Location"] == f"/console/models/{model.pk}/?edit={route.pk}#route-{route.pk}"
    page = client.get(response["Location"]).content.decode()
    assert f'id="route-form-{route.pk}"' in page
    prefix = f"route-{route.pk}-"
    data = {
        prefix + "provider": acme.pk,
        prefix + "upstream_model": "u9",
        prefix + "priority": 1,
        prefix + "weight": 1,
        prefix + "enabled": "on",
    }
    response = client.post(f"/console/routes/{route.pk}/", data)
    assert response.status_code == 302
    route.refresh_from_db()
    assert route.upstream_model == "u9"


def test_a_route_can_be_added_and_a_model_edited(db, carol: User) -> None:
    acme, other = add_provider(), add_provider("other", base_url="https://o.test/v1")
    model, _route, _created = do_add_model(name="m", provider=acme, upstream_model="u1")
    client = signed_in(carol)
    response = client.post(
        f"/console/models/{model.pk}/routes/",
        {"provider": "other", "upstream_model": "u2", "priority": 1, "weight": 2},
    )
    assert response.status_code == 302
    assert model.routes.filter(provider=other, upstream_model="u2", weight=2).exists()
    response = client.post(
        f"/console/models/{model.pk}/",
        {
            "display_name": "Model M",
            "description": "",
            "context_window": 32000,
            "max_output_tokens": 1000,
            "supports_chat": "on",
            "supports_vision": "on",
        },
    )
    assert response.status_code == 302
    model.refresh_from_db()
    assert (model.display_name, model.context_window, model.supports_vision) == (
        "Model M",
        32000,
        True,
    )
    event = AuditEvent.objects.get(object_type="catalogmodel", action="update")
    assert event.changes["context_window"] == [128000, 32000]


def test_a_disabled_model_is_refused_by_v1(gateway: Gateway, carol: User) -> None:
    model = CatalogModel.objects.get(name="gpt-fake")
    response = signed_in(carol).post(f"/console/models/{model.pk}/enabled/", {"enabled": "0"})
    assert response.status_code == 302
    with pytest.raises(openai.NotFoundError):
        gateway.openai().chat.completions.create(model="gpt-fake", messages=USER)  # type: ignore[arg-type]
    event = AuditEvent.objects.get(object_type="catalogmodel")
    assert (event.action, event.changes) == ("disable", {"enabled": [True, False]})


# --- Who may do what ---


def test_finance_reads_the_models_but_changes_nothing(db, frank: User) -> None:
    acme = add_provider()
    model, route, _created = do_add_model(name="m", provider=acme, upstream_model="u1")
    events = AuditEvent.objects.count()
    client = signed_in(frank)
    for url in ["/console/models/", f"/console/models/{model.pk}/"]:
        page = client.get(url)
        assert page.status_code == 200
        text = page.content.decode()
        assert 'method="post"' not in text.split('class="console-page"')[1]
        assert ">Edit<" not in text
        assert ">Add model<" not in text
        assert ">Disable<" not in text
    for url, data in [
        ("/console/models/new/", {"name": "x", "provider": "acme", "upstream_model": "u"}),
        (f"/console/models/{model.pk}/", {"display_name": "x"}),
        (f"/console/models/{model.pk}/enabled/", {"enabled": "0"}),
        (f"/console/models/{model.pk}/routes/", {"provider": "acme", "upstream_model": "v"}),
        (f"/console/routes/{route.pk}/", {f"route-{route.pk}-weight": 9}),
    ]:
        assert client.post(url, data).status_code == 403, url
    assert client.get("/console/providers/").status_code == 403
    assert client.get(f"/console/providers/{acme.pk}/").status_code == 403
    model.refresh_from_db()
    assert model.enabled
    assert AuditEvent.objects.count() == events


def test_members_get_403_and_strangers_the_login_page(db, alice: User) -> None:
    acme = add_provider()
    model, _route, _created = do_add_model(name="m", provider=acme, upstream_model="u1")
    client = signed_in(alice)
    for url in [
        "/console/providers/",
        f"/console/providers/{acme.pk}/",
        "/console/models/",
        f"/console/models/{model.pk}/",
    ]:
        assert client.get(url).status_code == 403, url
    assert client.post(f"/console/providers/{acme.pk}/test/").status_code == 403
    response = Client().get("/console/models/")
    assert response.status_code == 302
    assert "/accounts/login/" in response["Location"]


def test_unknown_rows_are_404(db, carol: User) -> None:
    client = signed_in(carol)
    for url in ["/console/providers/999/", "/console/models/999/", "/console/routes/999/"]:
        assert client.get(url).status_code == 404


# --- The audit log covers the command line too ---


def test_the_provider_command_is_recorded_as_the_command_line(db) -> None:
    call_command(
        "provider",
        "add",
        "cli",
        "--type",
        "openai",
        "--base-url",
        "https://cli.test/v1",
        "--api-key",
        SECRET,
        stdout=StringIO(),
    )
    call_command("provider", "disable", "cli", stdout=StringIO())
    events = list(AuditEvent.objects.order_by("id"))
    assert [event.action for event in events] == ["create", "disable"]
    assert all(event.source == AuditSource.COMMAND for event in events)
    assert events[0].actor_label == "command line"
    assert events[0].changes["api_key"] == [None, SECRET_SHOWN]
    assert SECRET not in json.dumps([event.changes for event in events])


def test_the_django_admin_is_audited(db, carol: User) -> None:
    provider = add_provider()
    client = signed_in(carol)
    response = client.post(
        "/admin/chatapp/provider/",
        {"action": "disable_selected", "_selected_action": [provider.pk]},
    )
    assert response.status_code == 302
    event = AuditEvent.objects.get(object_type="provider", action="disable")
    assert event.source == AuditSource.ADMIN
    response = client.post(
        f"/admin/chatapp/provider/{provider.pk}/change/",
        {
            "name": "acme",
            "type": "openai",
            "base_url": "https://api.acme.test/v1",
            "timeout": 30,
            "extra_headers": "{}",
            "api_key": NEW_SECRET,
        },
    )
    assert response.status_code == 302
    provider.refresh_from_db()
    assert provider.api_key == NEW_SECRET
    event = AuditEvent.objects.get(object_type="provider", action="update")
    assert event.changes["api_key"] == [SECRET_SHOWN, SECRET_SHOWN]
    assert event.changes["timeout"] == ["600.0", "30.0"]
    assert NEW_SECRET not in json.dumps(event.changes)


def test_an_async_action_run_from_a_view_leaves_no_log_context_behind() -> None:
    # A provider test runs the pipeline, which names its request in the log context;
    # the sync view that ran it must not carry that request id into its later lines.
    import contextvars

    from chatapp import logs
    from chatapp.views import _run_async

    async def action(*, request_id: str) -> str:
        logs.begin(request_id)
        return request_id

    def view() -> dict[str, object]:
        assert _run_async(action, request_id="req_test") == "req_test"
        return dict(logs.current())

    assert contextvars.Context().run(view) == {}
