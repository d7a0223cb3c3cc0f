"""/docs/: the API guide, built from the live catalog and the reader's own keys.

The samples are taken from the rendered HTML as they stand and run against a live
gateway with the fake upstream: Python in this process (the SDKs are dev
dependencies), curl with the real ``curl``, Node with ``node`` and the SDKs that
``.ci/run`` installs into ``SWITCHBOARD_NODE_SDKS`` (default tests/artifacts/node-sdks).
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from accounts.models import User
from chatapp.docs import ERROR_HELP, error_rows
from chatapp.models import CatalogModel
from chatapp.relay.openapi import raised_errors
from keys.models import ApiKey, ModelPrice
from tests.gateway import Gateway

NODE_SDKS = Path(
    os.environ.get(
        "SWITCHBOARD_NODE_SDKS",
        Path(__file__).resolve().parents[1] / "artifacts" / "node-sdks",
    )
).resolve()
SAMPLE = re.compile(r'<code id="sample-([\w-]+)" data-run="(\w+)">(.*?)</code>', re.S)


def samples(page: str) -> dict[str, tuple[str, str]]:
    """The page's samples: id → (how to run it, its code as the reader copies it)."""
    return {m[1]: (m[2], html.unescape(m[3])) for m in SAMPLE.finditer(page)}


def guide(client: Client, **headers: Any) -> str:
    response = client.get("/docs/", **headers)
    assert response.status_code == 200
    return response.content.decode()


def model(name: str, **fields: Any) -> CatalogModel:
    return CatalogModel.objects.create(name=name, **fields)


def price(catalog_model: CatalogModel, inp: str, out: str, cached: str | None = None) -> None:
    ModelPrice.objects.create(
        model=catalog_model,
        input_per_mtok=Decimal(inp),
        output_per_mtok=Decimal(out),
        cached_input_per_mtok=Decimal(cached) if cached else None,
        currency="USD",
        effective_from=timezone.now() - timedelta(seconds=1),
    )


def model_row(page: str, name: str) -> str | None:
    found = re.search(rf'<tr data-model="{re.escape(name)}">(.*?)</tr>', page, re.S)
    return found[1] if found else None


# -- who sees what -----------------------------------------------------------------------------


def test_anonymous_readers_are_sent_to_sign_in_unless_the_docs_are_public(
    client: Client, db: None, settings: Any
) -> None:
    response = client.get("/docs/")
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("accounts:login"))

    settings.SWITCHBOARD_PUBLIC_DOCS = True
    model("open-model")
    page = guide(client)
    assert model_row(page, "open-model")
    assert 'id="limits"' not in page  # nothing personal
    assert "Sign in" in page


def test_it_uses_the_public_url_when_configured(client: Client, alice: User, settings: Any) -> None:
    client.force_login(alice)
    model("chatty")
    assert "http://testserver/v1" in guide(client)
    settings.SWITCHBOARD_PUBLIC_URL = "https://llm.example.com/gw"
    page = guide(client)
    assert 'base_url="https://llm.example.com/gw/v1"' in html.unescape(page)
    assert "https://llm.example.com/gw/v1/openapi.json" in page
    assert "testserver" not in page


def test_the_docs_section_of_the_console_opens_the_guide(client: Client, frank: User) -> None:
    client.force_login(frank)
    response = client.get(reverse("console:keys"))
    assert 'href="/docs/"' in response.content.decode()


def test_it_is_in_chinese_too(client: Client, alice: User) -> None:
    client.force_login(alice)
    client.cookies["django_language"] = "zh-hans"
    page = guide(client)
    assert "API 指南" in page
    assert "错误" in page


# -- tables follow the catalog, the keys and the prices ----------------------------------------


def test_the_model_table_follows_the_catalog_and_the_prices(client: Client, alice: User) -> None:
    client.force_login(alice)
    vision = model(
        "seer", display_name="Seer 2", context_window=200_000, max_output_tokens=8192,
        supports_vision=True, supports_tools=True,
    )  # fmt: skip
    model("hidden", enabled=False)
    row = model_row(guide(client), "seer")
    assert row is not None
    assert "Seer 2" in row
    assert "200000" in row
    assert "8192" in row
    assert "vision" in row
    assert "tools" in row
    assert "embeddings" not in row
    assert "not priced" in row
    assert model_row(guide(client), "hidden") is None

    price(vision, "3", "15", "0.3")
    row = model_row(guide(client), "seer")
    assert row is not None
    assert re.findall(r'<td class="num[^"]*">([\d.]+)</td>', row)[2:] == ["3", "0.3", "15"]

    price(vision, "2.5", "10")  # a newer price: the one in force is shown
    row = model_row(guide(client), "seer")
    assert row is not None
    assert re.findall(r'<td class="num[^"]*">([\d.]+)</td>', row)[2:] == ["2.5", "2.5", "10"]

    CatalogModel.objects.filter(pk=vision.pk).update(context_window=32_000, enabled=True)
    row = model_row(guide(client), "seer")
    assert row is not None
    assert "32000" in row


def test_only_the_models_the_readers_keys_may_use_are_shown(
    client: Client, alice: User, bob: User
) -> None:
    for name in ("one", "two", "three"):
        model(name)
    ApiKey.issue(user=alice, name="narrow", allowed_models=["one"])
    ApiKey.issue(user=alice, name="other", allowed_models=["two"])
    ApiKey.issue(user=bob, name="everything")
    client.force_login(alice)
    page = guide(client)
    assert model_row(page, "one")
    assert model_row(page, "two")
    assert model_row(page, "three") is None
    assert '"model": "three"' not in page
    assert '"three"' not in html.unescape(page)

    client.force_login(bob)
    page = guide(client)
    assert all(model_row(page, name) for name in ("one", "two", "three"))


def test_the_limits_table_shows_each_own_key_with_its_use_and_reset(
    client: Client, alice: User, bob: User
) -> None:
    key, _raw = ApiKey.issue(
        user=alice, name="batch", rpm=30, tpd=500_000, concurrency=4,
        money_budget=Decimal("25"), budget_period="monthly", max_output_tokens=2048,
    )  # fmt: skip
    ApiKey.issue(user=bob, name="bobs-key", rpm=999)
    revoked, _raw = ApiKey.issue(user=alice, name="old-one")
    ApiKey.objects.filter(pk=revoked.pk).update(revoked_at=timezone.now())
    client.force_login(alice)
    page = guide(client)
    table = re.search(
        rf'<table class="list limits" data-key="{key.prefix}">(.*?)</table>', page, re.S
    )
    assert table is not None
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", table[1]))
    assert "Requests per minute 30 0" in text
    assert "Tokens per day 500000 0" in text
    assert "Concurrent requests 4 0" in text
    assert "Max output tokens per request (larger max_tokens is refused) 2048" in text
    assert "Money budget (monthly) 25 USD 0 USD" in text
    assert re.search(r"Requests per minute 30 0 \d{4}-\d\d-\d\d \d\d:\d\d", text)
    assert "bobs-key" not in page
    assert "999" not in text
    assert "old-one" not in page

    key.rpm = 45
    key.save()
    assert "Requests per minute 45" in re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", guide(client)))


def test_a_reader_without_a_key_is_told_where_to_make_one(client: Client, alice: User) -> None:
    client.force_login(alice)
    page = guide(client)
    assert "You have no working API key" in page
    assert f'href="{reverse("console:keys")}"' in page


# -- the error table is the relay's own ---------------------------------------------------------


def test_every_error_the_relay_raises_is_explained_and_nothing_stale() -> None:
    keys = {error.key for error in raised_errors()}
    assert {"rate_limit_exceeded", "invalid_api_key", "context_length_exceeded"} <= keys
    assert keys - set(ERROR_HELP) == set(), "explain these in chatapp.docs.ERROR_HELP"
    assert set(ERROR_HELP) - keys == set(), "the relay no longer raises these"
    assert all(row.meaning and row.action for row in error_rows())


def test_the_error_table_lists_them(client: Client, alice: User) -> None:
    client.force_login(alice)
    page = guide(client)
    table = re.search(r'<table class="list" id="error-table">(.*?)</table>', page, re.S)
    assert table is not None
    assert table[1].count("<tr>") == len(raised_errors()) + 1
    assert "<code>insufficient_quota</code>" in table[1]


# -- the samples run as they stand --------------------------------------------------------------


@pytest.fixture
def page_samples(gateway: Gateway, transactional_db: None) -> dict[str, tuple[str, str]]:
    """The samples of alice's guide, served by the live gateway."""
    client = Client()
    client.force_login(gateway.user)
    host = gateway.url.removeprefix("http://")
    page = guide(client, HTTP_HOST=host)
    found = samples(page)
    assert gateway.key not in page  # a placeholder, never the secret
    return found


def test_every_task_has_python_node_and_curl_samples(
    page_samples: dict[str, tuple[str, str]],
) -> None:
    for task in ("chat", "stream", "vision", "tools", "embeddings"):
        assert {page_samples[f"{task}-{run}"][0] for run in ("python", "node", "curl")} == {
            "python", "node", "curl",
        }  # fmt: skip
    assert "import anthropic" in page_samples["messages-python"][1]
    assert "@anthropic-ai/sdk" in page_samples["messages-node"][1]
    assert "x-api-key" in page_samples["messages-curl"][1]


def test_the_python_samples_run(
    page_samples: dict[str, tuple[str, str]],
    gateway: Gateway,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SWITCHBOARD_API_KEY", gateway.key)
    python = {name: code for name, (run, code) in page_samples.items() if run == "python"}
    assert len(python) >= 9
    for name, code in python.items():
        exec(compile(code, f"<sample {name}>", "exec"), {"__name__": "__sample__"})  # noqa: S102
        out = capsys.readouterr().out
        assert out.strip(), f"{name} printed nothing"
        assert "Error" not in out, f"{name}: {out}"
    records = gateway.records()
    assert len(records) == len(python)
    assert {record.status for record in records} == {"ok"}


def _run(command: list[str], cwd: Path, gateway: Gateway, name: str) -> str:
    result = subprocess.run(
        command,
        cwd=cwd,
        env={**os.environ, "SWITCHBOARD_API_KEY": gateway.key, "NO_PROXY": "*"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, f"{name}: {result.stderr or result.stdout}"
    assert result.stdout.strip(), f"{name} printed nothing"
    return result.stdout


def test_the_curl_samples_run(
    page_samples: dict[str, tuple[str, str]], gateway: Gateway, tmp_path: Path
) -> None:
    if shutil.which("curl") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI needs curl to run the guide's curl samples")
        pytest.skip("curl is not installed")
    curl = {name: code for name, (run, code) in page_samples.items() if run == "curl"}
    assert len(curl) >= 7
    for name, code in curl.items():
        # --fail-with-body: an HTTP error fails the run (the sample itself stays plain).
        out = _run(["bash", "-c", code.replace("curl ", "curl -sS --fail-with-body ", 1)],
                   tmp_path, gateway, name)  # fmt: skip
        assert '"error"' not in out, f"{name}: {out}"
        if "stream" in name:
            assert "data:" in out
    assert {record.status for record in gateway.records()} == {"ok"}


def test_the_node_samples_run(page_samples: dict[str, tuple[str, str]], gateway: Gateway) -> None:
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    installed = all((NODE_SDKS / "node_modules" / name).is_dir()
                    for name in ("openai", "@anthropic-ai/sdk"))  # fmt: skip
    if not installed:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs the Node SDKs in {NODE_SDKS} (.ci/run installs them)")
        pytest.skip(f"npm install --prefix {NODE_SDKS} openai @anthropic-ai/sdk")
    node = {name: code for name, (run, code) in page_samples.items() if run == "node"}
    assert len(node) >= 7
    for name, code in node.items():
        # ES modules resolve packages from their own directory: write them beside node_modules.
        script = NODE_SDKS / f"docs-sample-{name}.mjs"
        script.write_text(code, encoding="utf-8")
        try:
            _run(["node", script.name], NODE_SDKS, gateway, name)
        finally:
            script.unlink()
    assert {record.status for record in gateway.records()} == {"ok"}


# -- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("https://llm.example.com/", "https://llm.example.com"),
        ("http://10.0.0.5:8000/gateway", "http://10.0.0.5:8000/gateway"),
    ],
)
def test_the_public_url_setting_is_parsed_strictly(value: str, expected: str) -> None:
    from chatapp.environ import Env

    assert Env({"SWITCHBOARD_PUBLIC_URL": value}).url("SWITCHBOARD_PUBLIC_URL") == expected
    assert Env({}).url("SWITCHBOARD_PUBLIC_URL") is None


@pytest.mark.parametrize(
    "junk",
    ["llm.example.com", "ftp://llm.example.com", "https://x.com/?a=1", "https://:80", "http://h:x"],
)
def test_a_junk_public_url_stops_the_process(junk: str) -> None:
    from django.core.exceptions import ImproperlyConfigured

    from chatapp.environ import Env

    with pytest.raises(ImproperlyConfigured, match="SWITCHBOARD_PUBLIC_URL"):
        Env({"SWITCHBOARD_PUBLIC_URL": junk}).url("SWITCHBOARD_PUBLIC_URL")
