"""Failover across routes, retries with backoff, the circuit breaker, mid-stream failures, disconnects."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from chatapp.models import CatalogModel, Provider, Route
from chatapp.relay import routing
from chatapp.relay.tokens import estimate_text
from tests.fake_upstream import DropMidStream, Fail, FakeUpstream, Hang, Malformed, Reply
from tests.gateway import Gateway
from tests.sse import iter_sse

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture
def second_upstream(gateway: Gateway) -> Provider:
    """A second, healthy upstream at a lower priority for gpt-fake."""
    backup = FakeUpstream().start()
    provider = Provider.objects.create(
        name="backup", type="openai", base_url=backup.openai_base_url, timeout=5
    )
    Route.objects.create(
        model=CatalogModel.objects.get(name="gpt-fake"),
        provider=provider,
        upstream_model="gpt-backup",
        priority=1,
    )
    provider.fake = backup  # type: ignore[attr-defined]
    yield provider
    backup.stop()


def test_a_failing_route_fails_over_to_the_next_priority(
    gateway: Gateway, second_upstream: Provider
) -> None:
    gateway.fake.script(Fail(503, "down for maintenance"))
    second_upstream.fake.script(Reply(text="from the backup"))  # type: ignore[attr-defined]
    completion = gateway.openai().chat.completions.create(model="gpt-fake", messages=USER)  # type: ignore[arg-type]
    assert completion.choices[0].message.content == "from the backup"
    [record] = gateway.wait_records(1)
    assert (record.provider, record.upstream_model, record.attempts, record.status) == (
        "backup",
        "gpt-backup",
        2,
        "ok",
    )


@pytest.mark.parametrize(
    "failure", [Malformed(), DropMidStream(after_chunks=0)], ids=["malformed", "dropped"]
)
def test_a_stream_that_dies_before_any_content_fails_over(
    gateway: Gateway, second_upstream: Provider, failure: object
) -> None:
    gateway.fake.script(failure)  # type: ignore[arg-type]
    second_upstream.fake.script(Reply(text="steady stream"))  # type: ignore[attr-defined]
    chunks = list(
        gateway.openai().chat.completions.create(model="gpt-fake", messages=USER, stream=True)
    )  # type: ignore[arg-type]
    assert (
        "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        == "steady stream"
    )


def test_a_route_that_keeps_failing_cools_down_and_is_probed_later(
    gateway: Gateway, second_upstream: Provider, monkeypatch: pytest.MonkeyPatch
) -> None:
    route = Route.objects.get(provider=gateway.openai_provider, model__name="gpt-fake")
    gateway.fake.script(*[Fail(500, "broken")] * routing.FAILURE_THRESHOLD)
    client = gateway.openai()
    for _ in range(routing.FAILURE_THRESHOLD):
        client.chat.completions.create(model="gpt-fake", messages=USER)  # type: ignore[arg-type]
    assert routing.is_open(route.pk)
    before = len(gateway.fake.requests)
    client.chat.completions.create(model="gpt-fake", messages=USER)  # type: ignore[arg-type]
    assert len(gateway.fake.requests) == before  # the open route was not tried first

    # After the cool-down the route is probed again and closes on success.
    real_monotonic = time.monotonic
    monkeypatch.setattr(
        routing.time, "monotonic", lambda: real_monotonic() + routing.COOLDOWN_SECONDS + 1
    )
    client.chat.completions.create(model="gpt-fake", messages=USER)  # type: ignore[arg-type]
    assert len(gateway.fake.requests) == before + 1
    assert not routing.is_open(route.pk)


def test_a_single_route_is_retried_with_backoff(gateway: Gateway) -> None:
    gateway.fake.script(Fail(502, "flaky"), Fail(500, "flaky"), Reply(text="third time lucky"))
    started = time.monotonic()
    completion = gateway.openai().chat.completions.create(model="gpt-fake", messages=USER)  # type: ignore[arg-type]
    assert completion.choices[0].message.content == "third time lucky"
    assert time.monotonic() - started >= 0.3  # 0.1 s then 0.2 s of backoff
    assert gateway.records()[0].attempts == 3


def test_a_short_retry_after_is_honoured(gateway: Gateway) -> None:
    gateway.fake.script(
        Fail(429, "wait a moment", headers={"retry-after": "1"}), Reply(text="ok now")
    )
    started = time.monotonic()
    completion = gateway.openai().chat.completions.create(model="gpt-fake", messages=USER)  # type: ignore[arg-type]
    assert completion.choices[0].message.content == "ok now"
    assert time.monotonic() - started >= 1.0


def test_a_timeout_is_504(gateway: Gateway) -> None:
    Provider.objects.filter(pk=gateway.openai_provider.pk).update(timeout=0.5)
    Provider.objects.get(pk=gateway.openai_provider.pk).save()
    gateway.fake.script(Hang(), Hang(), Hang())
    with pytest.raises(openai.APIStatusError) as caught:
        gateway.openai().chat.completions.create(model="gpt-fake", messages=USER)  # type: ignore[arg-type]
    assert caught.value.status_code == 504
    assert gateway.records()[0].http_status == 504


def test_a_drop_mid_stream_becomes_an_in_stream_error_and_is_billed(gateway: Gateway) -> None:
    gateway.fake.script(
        DropMidStream(after_chunks=2, text="alpha beta gamma delta", chunk_delay=0.1)
    )
    received = ""
    with pytest.raises(openai.APIError, match="Upstream error mid-stream"):  # noqa: PT012 - the error arrives mid-iteration
        for chunk in gateway.openai().chat.completions.create(
            model="gpt-fake", messages=USER, stream=True
        ):  # type: ignore[arg-type]
            received += chunk.choices[0].delta.content or "" if chunk.choices else ""
    assert received == "alpha beta"
    [record] = gateway.wait_records(1)
    assert (record.status, record.http_status, record.estimated) == ("error", 502, True)
    assert record.output_tokens > 0


def test_a_client_that_disconnects_mid_stream_is_billed_for_what_was_generated(
    gateway: Gateway,
) -> None:
    gateway.fake.script(Reply(text=" ".join(f"w{i}" for i in range(40)), chunk_delay=0.05))
    with httpx.stream(
        "POST",
        gateway.base_url + "/chat/completions",
        headers={"authorization": f"Bearer {gateway.key}"},
        json={"model": "gpt-fake", "messages": USER, "stream": True},
    ) as response:
        seen = 0
        for _name, chunk in iter_sse(response.iter_lines()):
            choices = chunk.get("choices") if isinstance(chunk, dict) else None
            if choices and choices[0]["delta"].get("content"):
                seen += 1
                if seen == 5:
                    break
    # Given the client left after 5 words, the upstream stream is closed and the record says so.
    [record] = gateway.wait_records(1)
    assert record.status == "client_disconnected"
    assert record.estimated is True
    assert 0 < record.output_tokens < estimate_text(" ".join(f"w{i}" for i in range(40)))
    assert record.input_tokens > 0
    assert (
        record.latency_ms < 1500
    )  # settled when the client left, not when the reply would have ended


def test_an_upstreams_cookie_is_never_sent_back_with_another_request(gateway: Gateway) -> None:
    # The relay's connections are shared by every user: a cookie one answer sets would
    # otherwise go back with the next request to that host, whoever makes it.
    gateway.fake.script(
        Fail(429, "wait a moment", headers={"set-cookie": "session=alice-secret; Path=/"}),
        Reply(text="ok now"),
        Reply(text="and again"),
    )
    client = gateway.openai()
    completion = client.chat.completions.create(model="gpt-fake", messages=USER)  # type: ignore[arg-type]
    assert completion.choices[0].message.content == "ok now"
    stream = client.chat.completions.create(model="gpt-fake", messages=USER, stream=True)  # type: ignore[arg-type]
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    requests = [
        request for request in gateway.fake.requests if request.path.endswith("/chat/completions")
    ]
    assert len(requests) == 3
    assert [request.headers.get("cookie") for request in requests] == [None, None, None]
    assert requests[0].headers["user-agent"] == "Switchboard"
