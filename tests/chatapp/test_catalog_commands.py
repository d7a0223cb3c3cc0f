"""``manage.py provider`` and ``manage.py model``, and the catalog in the admin."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from accounts.models import User
from chatapp.models import CatalogModel, Provider, Route

pytestmark = pytest.mark.django_db


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def add_provider(name: str = "openai", base_url: str = "https://api.openai.com/v1", **fields: Any):
    provider = Provider(name=name, type=fields.pop("type", "openai"), base_url=base_url, **fields)
    provider.save()
    return provider


# --- A tiny upstream on loopback ---


@dataclass
class Upstream:
    """Answers ``/ok/...`` like a working provider and ``/denied/...`` with a 401."""

    url: str
    requests: list[dict[str, Any]] = field(default_factory=list)


class UpstreamHandler(BaseHTTPRequestHandler):
    upstream: Upstream

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.upstream.requests.append(
            {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, **body}
        )
        if self.path == "/ok/v1/chat/completions":
            self.answer(
                200,
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "created": 1700000000,
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "OK"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10},
                },
            )
        elif self.path == "/ok/v1/messages":
            self.answer(
                200,
                {
                    "id": "msg_1",
                    "type": "message",
                    "role": "assistant",
                    "model": body["model"],
                    "content": [{"type": "text", "text": "OK."}],
                    "stop_reason": "end_turn",
                    "usage": {"input_tokens": 9, "output_tokens": 2},
                },
            )
        else:
            self.answer(
                401,
                {
                    "error": {
                        "message": "Incorrect API key provided: sk-wrong.",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "invalid_api_key",
                    }
                },
            )

    def answer(self, status: int, body: dict[str, Any]) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), UpstreamHandler)
    state = Upstream(url=f"http://127.0.0.1:{server.server_address[1]}")
    UpstreamHandler.upstream = state
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- provider add ---


def test_provider_add_stores_the_api_key_encrypted() -> None:
    output = run(
        "provider",
        "add",
        "openai",
        "--type",
        "openai",
        "--base-url",
        "https://api.openai.com/v1/",
        "--api-key",
        "sk-upstream-secret",
    )

    assert "added enabled openai provider openai at https://api.openai.com/v1" in output
    assert "sk-upstream-secret" not in output
    provider = Provider.objects.get(name="openai")
    assert provider.base_url == "https://api.openai.com/v1"
    assert provider.api_key_encrypted
    assert provider.api_key_encrypted != "sk-upstream-secret"
    assert "sk-upstream-secret" not in provider.api_key_encrypted
    assert Provider.objects.get(name="openai").api_key == "sk-upstream-secret"


def test_provider_add_reads_the_key_from_a_file_and_takes_options(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("sk-ant-from-file\n")

    run(
        "provider",
        "add",
        "claude",
        "--type=anthropic",
        "--base-url=https://api.anthropic.com",
        f"--api-key-file={key_file}",
        "--timeout=30",
        "--header",
        "anthropic-beta: prompt-caching-2024-07-31",
        "--header=X-Team:research",
        "--disabled",
    )

    provider = Provider.objects.get(name="claude")
    assert provider.api_key == "sk-ant-from-file"
    assert provider.type == "anthropic"
    assert provider.timeout == 30
    assert provider.extra_headers == {
        "anthropic-beta": "prompt-caching-2024-07-31",
        "X-Team": "research",
    }
    assert not provider.enabled


def test_provider_add_without_a_key_stores_none() -> None:
    run("provider", "add", "ollama", "--type=openai", "--base-url=http://localhost:11434/v1")
    assert Provider.objects.get(name="ollama").api_key_encrypted == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--type=openai", "--base-url=api.openai.com"], "base_url: Enter an http:// or https://"),
        (
            ["--type=openai", "--base-url=ftp://example.com"],
            "base_url: Enter an http:// or https://",
        ),
        (
            ["--type=anthropic", "--base-url=https://api.anthropic.com/v1"],
            "base_url: Anthropic base URLs stop before /v1",
        ),
        (["--type=cohere", "--base-url=https://example.com"], "invalid choice: 'cohere'"),
        (["--type=openai", "--base-url=https://x.test", "--timeout=0"], "timeout: Ensure"),
        (
            ["--type=openai", "--base-url=https://x.test", "--header=NoColon"],
            "expected 'Name: value'",
        ),
        (
            ["--type=openai", "--base-url=https://x.test", "--api-key-file=/nonexistent/key"],
            "--api-key-file: No such file or directory: /nonexistent/key",
        ),
    ],
)
def test_provider_add_rejects_bad_input_in_one_line(args: list[str], message: str) -> None:
    with pytest.raises(CommandError) as error:
        run("provider", "add", "broken", *args)
    assert message in str(error.value)
    assert "\n" not in str(error.value).strip()
    assert not Provider.objects.exists()


def test_provider_add_rejects_a_name_that_is_not_a_slug() -> None:
    with pytest.raises(CommandError, match="^name: "):
        run("provider", "add", "my provider", "--type=openai", "--base-url=https://x.test")


def test_provider_add_rejects_a_duplicate_name() -> None:
    add_provider("openai")
    with pytest.raises(CommandError, match="a provider named 'openai' already exists"):
        run("provider", "add", "openai", "--type=openai", "--base-url=https://x.test")


# --- provider list, enable, disable ---


def test_provider_list_shows_whether_a_key_is_set_but_never_the_key() -> None:
    with_key = Provider(name="openai", type="openai", base_url="https://api.openai.com/v1")
    with_key.api_key = "sk-upstream-secret"
    with_key.save()
    add_provider("ollama", "http://localhost:11434/v1", enabled=False)

    text = run("provider", "list")
    rows = json.loads(run("provider", "list", "--json"))

    assert text.splitlines() == [
        "ollama\topenai\thttp://localhost:11434/v1\tno key\tdisabled\t0 routes",
        "openai\topenai\thttps://api.openai.com/v1\tkey set\tenabled\t0 routes",
    ]
    assert [(row["name"], row["api_key_set"], row["enabled"]) for row in rows] == [
        ("ollama", False, False),
        ("openai", True, True),
    ]
    assert set(rows[1]) >= {"id", "type", "base_url", "timeout", "extra_headers", "routes"}
    for output in (text, json.dumps(rows)):
        assert "sk-upstream-secret" not in output
        assert with_key.api_key_encrypted not in output


def test_provider_disable_and_enable_switch_it() -> None:
    add_provider("openai")

    assert run("provider", "disable", "openai").strip() == "disabled provider openai"
    assert not Provider.objects.get().enabled
    assert run("provider", "enable", "openai").strip() == "enabled provider openai"
    assert Provider.objects.get().enabled


@pytest.mark.parametrize("action", ["enable", "disable", "test"])
def test_provider_commands_reject_an_unknown_provider(action: str) -> None:
    with pytest.raises(CommandError, match="^no provider named 'nope'$"):
        run("provider", action, "nope")


# --- provider test: a real request to a real (loopback) server ---


@pytest.mark.django_db(transaction=True)
def test_provider_test_sends_a_tiny_chat_and_prints_latency_and_reply(upstream: Upstream) -> None:
    # Given an OpenAI-compatible provider with a key, an extra header and two routes
    provider = add_provider("local", f"{upstream.url}/ok/v1", extra_headers={"x-team": "qa"})
    provider.api_key = "sk-upstream-secret"
    provider.save()
    model = CatalogModel.objects.create(name="gpt-4o")
    Route.objects.create(model=model, provider=provider, upstream_model="gpt-4o-backup", priority=1)
    Route.objects.create(model=model, provider=provider, upstream_model="gpt-4o-2024-08-06")

    # When it is tested
    output = run("provider", "test", "local")

    # Then the first route's model got a tiny request with the decrypted key
    assert output.startswith("local answered in ")
    assert output.strip().endswith(" ms: 'OK'")
    (sent,) = upstream.requests
    assert sent["path"] == "/ok/v1/chat/completions"
    assert sent["model"] == "gpt-4o-2024-08-06"
    assert sent["max_tokens"] == 5
    assert sent["messages"] == [{"role": "user", "content": "Say OK"}]
    assert sent["headers"]["authorization"] == "Bearer sk-upstream-secret"
    assert sent["headers"]["x-team"] == "qa"


@pytest.mark.django_db(transaction=True)
def test_provider_test_speaks_anthropic_to_an_anthropic_provider(upstream: Upstream) -> None:
    provider = add_provider("claude", f"{upstream.url}/ok", type="anthropic")
    provider.api_key = "sk-ant-secret"
    provider.save()

    output = run("provider", "test", "claude", "--model", "claude-haiku-4-5")

    assert output.strip().endswith(" ms: 'OK.'")
    (sent,) = upstream.requests
    assert sent["path"] == "/ok/v1/messages"
    assert sent["model"] == "claude-haiku-4-5"
    assert sent["max_tokens"] == 5
    assert sent["headers"]["x-api-key"] == "sk-ant-secret"


@pytest.mark.django_db(transaction=True)
def test_provider_test_fails_with_the_status_and_the_upstreams_message(upstream: Upstream) -> None:
    add_provider("local", f"{upstream.url}/denied/v1")

    with pytest.raises(CommandError) as error:
        run("provider", "test", "local", "--model", "gpt-4o")

    assert str(error.value) == (
        "local answered 401 for gpt-4o: Incorrect API key provided: sk-wrong."
    )


@pytest.mark.django_db(transaction=True)
def test_provider_test_fails_clearly_when_the_upstream_is_unreachable() -> None:
    add_provider("local", f"http://127.0.0.1:{closed_port()}/v1")

    with pytest.raises(CommandError, match=r"^local: cannot reach http://127\.0\.0\.1:\d+/v1/chat"):
        run("provider", "test", "local", "--model", "gpt-4o")


@pytest.mark.django_db(transaction=True)
def test_provider_test_needs_a_model_when_the_provider_has_no_enabled_route() -> None:
    provider = add_provider("local")
    model = CatalogModel.objects.create(name="gpt-4o")
    Route.objects.create(model=model, provider=provider, upstream_model="gpt-4o", enabled=False)

    with pytest.raises(CommandError, match="provider local has no enabled route"):
        run("provider", "test", "local")


# --- model add ---


def test_model_add_creates_the_model_and_its_route() -> None:
    add_provider("openai")

    output = run(
        "model",
        "add",
        "gpt-4o",
        "--provider=openai",
        "--upstream-model=gpt-4o-2024-08-06",
        "--display-name=GPT-4o",
        "--description=OpenAI's flagship",
        "--vision",
        "--tools",
        "--context=128000",
        "--max-output=16384",
        "--priority=2",
        "--weight=3",
    )

    assert output.strip() == (
        "added model gpt-4o → openai/gpt-4o-2024-08-06 (priority 2, weight 3; chat, vision, tools)"
    )
    model = CatalogModel.objects.get()
    assert (model.name, model.display_name, model.description) == (
        "gpt-4o",
        "GPT-4o",
        "OpenAI's flagship",
    )
    assert (model.context_window, model.max_output_tokens) == (128000, 16384)
    assert model.supports_chat
    assert model.supports_vision
    assert model.supports_tools
    assert not model.supports_embeddings
    route = Route.objects.get()
    assert (route.provider.name, route.upstream_model, route.priority, route.weight) == (
        "openai",
        "gpt-4o-2024-08-06",
        2,
        3,
    )


def test_model_add_for_embeddings_only() -> None:
    add_provider("openai")
    run(
        "model",
        "add",
        "embed",
        "--provider=openai",
        "--upstream-model=text-embedding-3-small",
        "--embeddings",
        "--no-chat",
    )
    model = CatalogModel.objects.get()
    assert model.supports_embeddings
    assert not model.supports_chat


def test_model_add_with_another_provider_adds_a_route_and_updates_given_flags() -> None:
    add_provider("openai")
    add_provider("azure", "https://example.openai.azure.com/openai/v1")
    run("model", "add", "gpt-4o", "--provider=openai", "--upstream-model=gpt-4o", "--tools")

    output = run(
        "model", "add", "gpt-4o", "--provider=azure", "--upstream-model=gpt-4o", "--vision"
    )

    assert output.startswith("added a route to model gpt-4o → azure/gpt-4o")
    model = CatalogModel.objects.get()
    assert model.supports_vision
    assert model.supports_tools  # not given again: kept
    assert sorted(model.routes.values_list("provider__name", flat=True)) == ["azure", "openai"]


def test_model_add_rejects_the_same_route_twice() -> None:
    add_provider("openai")
    run("model", "add", "gpt-4o", "--provider=openai", "--upstream-model=gpt-4o")

    with pytest.raises(CommandError, match="^model 'gpt-4o' already routes to openai/gpt-4o$"):
        run("model", "add", "gpt-4o", "--provider=openai", "--upstream-model=gpt-4o", "--vision")

    assert Route.objects.count() == 1
    assert not CatalogModel.objects.get().supports_vision


def test_model_add_rejects_an_unknown_provider() -> None:
    with pytest.raises(CommandError, match="^no provider named 'nope'$"):
        run("model", "add", "gpt-4o", "--provider=nope", "--upstream-model=gpt-4o")
    assert not CatalogModel.objects.exists()


def test_model_add_names_the_field_it_rejects() -> None:
    add_provider("openai")
    with pytest.raises(CommandError, match="^weight: Ensure this value is greater than or equal"):
        run("model", "add", "gpt-4o", "--provider=openai", "--upstream-model=gpt-4o", "--weight=0")
    # the model is not left behind without its route
    assert not CatalogModel.objects.exists()


# --- model list, enable, disable ---


def test_model_list_shows_each_model_with_its_routes() -> None:
    openai = add_provider("openai")
    azure = add_provider("azure", "https://example.openai.azure.com/openai/v1", enabled=False)
    gpt = CatalogModel.objects.create(name="gpt-4o", supports_vision=True)
    Route.objects.create(model=gpt, provider=openai, upstream_model="gpt-4o-2024-08-06")
    Route.objects.create(model=gpt, provider=azure, upstream_model="gpt-4o", priority=1, weight=2)
    CatalogModel.objects.create(name="o1", enabled=False)

    text = run("model", "list")
    rows = json.loads(run("model", "list", "--json"))

    assert text.splitlines() == [
        "gpt-4o\tenabled\tchat,vision",
        "  → openai/gpt-4o-2024-08-06\tpriority 0\tweight 1\tenabled",
        "  → azure/gpt-4o\tpriority 1\tweight 2\tprovider disabled",
        "o1\tdisabled\tchat",
    ]
    assert [row["name"] for row in rows] == ["gpt-4o", "o1"]
    assert rows[0]["capabilities"] == ["chat", "vision"]
    assert [
        {key: route[key] for key in ("provider", "upstream_model", "priority", "weight", "enabled")}
        for route in rows[0]["routes"]
    ] == [
        {
            "provider": "openai",
            "upstream_model": "gpt-4o-2024-08-06",
            "priority": 0,
            "weight": 1,
            "enabled": True,
        },
        {
            "provider": "azure",
            "upstream_model": "gpt-4o",
            "priority": 1,
            "weight": 2,
            "enabled": True,
        },
    ]
    assert rows[1]["enabled"] is False
    assert rows[1]["routes"] == []


def test_model_disable_and_enable_switch_it() -> None:
    CatalogModel.objects.create(name="gpt-4o")

    assert run("model", "disable", "gpt-4o").strip() == "disabled model gpt-4o"
    assert not CatalogModel.objects.get().enabled
    assert run("model", "enable", "gpt-4o").strip() == "enabled model gpt-4o"
    assert CatalogModel.objects.get().enabled


def test_model_enable_rejects_an_unknown_model() -> None:
    with pytest.raises(CommandError, match="^no model named 'nope'$"):
        run("model", "enable", "nope")


# --- the admin ---


@pytest.mark.parametrize("name", ["provider", "catalogmodel", "route"])
def test_admin_changelist_and_add_pages_render(client, carol: User, name: str) -> None:
    provider = add_provider("openai")
    model = CatalogModel.objects.create(name="gpt-4o")
    Route.objects.create(model=model, provider=provider, upstream_model="gpt-4o")
    client.force_login(carol)

    assert client.get(f"/admin/chatapp/{name}/").status_code == 200
    assert client.get(f"/admin/chatapp/{name}/add/").status_code == 200


def test_admin_never_shows_a_providers_key_and_keeps_it_when_left_blank(
    client, carol: User
) -> None:
    client.force_login(carol)
    form = {
        "name": "openai",
        "type": "openai",
        "base_url": "https://api.openai.com/v1",
        "enabled": "on",
        "timeout": "600",
        "extra_headers": "{}",
    }

    response = client.post("/admin/chatapp/provider/add/", {**form, "api_key": "sk-admin-typed"})
    assert response.status_code == 302
    provider = Provider.objects.get()
    assert provider.api_key == "sk-admin-typed"
    assert "sk-admin-typed" not in provider.api_key_encrypted

    page = client.get(f"/admin/chatapp/provider/{provider.pk}/change/").content.decode()
    listing = client.get("/admin/chatapp/provider/").content.decode()
    for html in (page, listing):
        assert "sk-admin-typed" not in html
        assert provider.api_key_encrypted not in html

    response = client.post(
        f"/admin/chatapp/provider/{provider.pk}/change/", {**form, "timeout": "60"}
    )
    assert response.status_code == 302
    provider.refresh_from_db()
    assert provider.timeout == 60
    assert provider.api_key == "sk-admin-typed"

    client.post(f"/admin/chatapp/provider/{provider.pk}/change/", {**form, "clear_api_key": "on"})
    provider.refresh_from_db()
    assert provider.api_key_encrypted == ""
