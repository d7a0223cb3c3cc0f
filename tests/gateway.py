"""A live gateway wired to a fake upstream, with clients from the official SDKs.

- ``fake_upstream``: a real HTTP server on loopback speaking OpenAI and Anthropic.
- ``gateway``: our ASGI app served live, with two providers pointing at the fake
  (one OpenAI-compatible, one Anthropic), models routed to each, and alice's key.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import anthropic
import openai
import pytest

from accounts.models import User
from chatapp.models import CatalogModel, Provider, Route
from chatapp.relay import routing
from keys import ledger
from keys.models import ApiKey, UsageRecord
from tests.conftest import make_user
from tests.fake_upstream import FakeUpstream, fake_upstream  # noqa: F401 - fixture
from tests.live import live_server_url  # noqa: F401 - fixture

UPSTREAM_KEY = "sk-upstream-secret"


@dataclass
class Gateway:
    url: str
    fake: FakeUpstream
    user: User
    key: str
    openai_provider: Provider
    anthropic_provider: Provider

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def openai(self, key: str | None = None, **options: object) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.base_url, api_key=key or self.key, max_retries=0, **options
        )  # type: ignore[arg-type]

    def anthropic(self, key: str | None = None, **options: object) -> anthropic.Anthropic:
        return anthropic.Anthropic(
            base_url=self.url, api_key=key or self.key, max_retries=0, **options
        )  # type: ignore[arg-type]

    def records(self) -> list[UsageRecord]:
        assert ledger.flush(10), "usage records were not written in time"
        return list(UsageRecord.objects.order_by("created_at", "id"))

    def wait_records(self, count: int, timeout: float = 5.0) -> list[UsageRecord]:
        """Records once ``count`` exist: a stream settles just after its last byte."""
        deadline = time.monotonic() + timeout
        records = self.records()
        while len(records) < count and time.monotonic() < deadline:
            time.sleep(0.02)
            records = self.records()
        return records

    def add_model(
        self, name: str, provider: Provider, upstream_model: str | None = None, **fields: object
    ) -> CatalogModel:
        model, _created = CatalogModel.objects.get_or_create(name=name, defaults=fields)
        Route.objects.create(
            model=model, provider=provider, upstream_model=upstream_model or f"up-{name}"
        )
        return model


@pytest.fixture
def gateway(live_server_url: str, fake_upstream: FakeUpstream) -> Iterator[Gateway]:  # noqa: F811
    routing.reset()
    user = make_user("alice@example.com")
    _key, raw = ApiKey.issue(user=user, name="tests")
    openai_provider = Provider(
        name="fake-openai", type="openai", base_url=fake_upstream.openai_base_url, timeout=5
    )
    openai_provider.api_key = UPSTREAM_KEY
    openai_provider.save()
    anthropic_provider = Provider(
        name="fake-anthropic",
        type="anthropic",
        base_url=fake_upstream.anthropic_base_url,
        timeout=5,
    )
    anthropic_provider.api_key = UPSTREAM_KEY
    anthropic_provider.save()
    gateway = Gateway(
        live_server_url, fake_upstream, user, raw, openai_provider, anthropic_provider
    )
    capabilities = {"supports_vision": True, "supports_tools": True}
    gateway.add_model("gpt-fake", openai_provider, "gpt-upstream", **capabilities)
    gateway.add_model("claude-fake", anthropic_provider, "claude-upstream", **capabilities)
    gateway.add_model(
        "embed-fake",
        openai_provider,
        "embed-upstream",
        supports_embeddings=True,
        supports_chat=False,
    )
    yield gateway
    ledger.flush(10)
    routing.reset()
