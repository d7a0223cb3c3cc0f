"""The one pipeline, seen from clients: what it owns whatever the transport.

- a same-dialect stream reaches the client as the upstream sent it (unknown events
  and fields included), only the model name swapped;
- counting tokens admits without reserving: it never holds a concurrency slot;
- every request is settled once, with the outcome the pipeline saw.
"""

from __future__ import annotations

import json

import httpx
import pytest

from keys.actions import do_set_limits
from keys.models import ApiKey
from tests.fake_upstream import Hang, Reply
from tests.gateway import Gateway
from tests.sse import parse_sse

USER = [{"role": "user", "content": "Say hello"}]


def test_an_anthropic_stream_passes_unknown_events_and_fields_to_an_anthropic_client(
    gateway: Gateway,
) -> None:
    gateway.fake.script(
        Reply(
            text="Hello there",
            extra_fields={"future_field": {"x": 1}},
            extra_events=[("future_event", {"type": "future_event", "detail": "new"})],
        )
    )
    with httpx.stream(
        "POST",
        gateway.url + "/v1/messages",
        headers={"x-api-key": gateway.key, "anthropic-version": "2023-06-01"},
        json={"model": "claude-fake", "max_tokens": 50, "messages": USER, "stream": True},
    ) as response:
        events = parse_sse(response.read())

    names = [name for name, _data in events]
    assert "future_event" in names
    assert dict(events)["future_event"] == {"type": "future_event", "detail": "new"}
    assert all(
        data.get("future_field") == {"x": 1} for name, data in events if name != "future_event"
    )
    start = dict(events)["message_start"]
    assert start["message"]["model"] == "claude-fake"  # the client's name, not the upstream's
    assert gateway.wait_records(1)[-1].status == "ok"


def test_an_openai_stream_passes_unknown_chunks_and_fields_to_an_openai_client(
    gateway: Gateway,
) -> None:
    gateway.fake.script(
        Reply(
            text="Hello there",
            extra_fields={"future_field": [1, 2]},
            extra_events=[("message", {"choices": [], "annotation": "new"})],
        )
    )
    with httpx.stream(
        "POST",
        gateway.base_url + "/chat/completions",
        headers={"authorization": f"Bearer {gateway.key}"},
        json={"model": "gpt-fake", "messages": USER, "stream": True},
    ) as response:
        events = parse_sse(response.read())

    chunks = [data for _name, data in events if data != "[DONE]"]
    assert events[-1] == ("message", "[DONE]")
    assert any(chunk.get("annotation") == "new" for chunk in chunks)
    assert all(chunk.get("future_field") == [1, 2] for chunk in chunks if "annotation" not in chunk)
    assert {chunk["model"] for chunk in chunks} == {"gpt-fake"}
    text = "".join(
        choice["delta"].get("content") or ""
        for chunk in chunks
        for choice in chunk.get("choices", [])
    )
    assert text == "Hello there"


def test_counting_tokens_takes_no_concurrency_slot(gateway: Gateway) -> None:
    key = ApiKey.objects.get(user=gateway.user, name="tests")
    do_set_limits(key=key, concurrency=1)
    client = gateway.anthropic()

    for _ in range(3):
        count = client.messages.count_tokens(model="claude-fake", messages=USER)  # type: ignore[arg-type]
        assert count.input_tokens > 0
    # The next request is admitted at once: no count left a reservation behind.
    gateway.fake.script(Reply(text="ok"))
    message = client.messages.create(model="claude-fake", max_tokens=20, messages=USER)  # type: ignore[arg-type]
    assert message.content[0].text == "ok"  # type: ignore[union-attr]


def test_a_refused_body_is_recorded_once_with_its_reason(gateway: Gateway) -> None:
    response = httpx.post(
        gateway.base_url + "/chat/completions",
        headers={"authorization": f"Bearer {gateway.key}"},
        json={"model": "gpt-fake", "messages": "not a list"},
    )
    assert response.status_code == 400
    (record,) = gateway.records()
    assert (record.status, record.http_status, record.model) == ("error", 400, "gpt-fake")
    assert "messages" in record.error_message


@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
def test_a_client_that_leaves_mid_stream_is_recorded_as_disconnected(
    gateway: Gateway, dialect: str
) -> None:
    gateway.fake.script(Reply(text=" ".join(f"w{i}" for i in range(200)), chunk_delay=0.02))
    if dialect == "openai":
        url, headers = (
            gateway.base_url + "/chat/completions",
            {"authorization": f"Bearer {gateway.key}"},
        )
        body = {"model": "gpt-fake", "messages": USER, "stream": True}
    else:
        url = gateway.url + "/v1/messages"
        headers = {"x-api-key": gateway.key, "anthropic-version": "2023-06-01"}
        body = {"model": "claude-fake", "max_tokens": 500, "messages": USER, "stream": True}
    with httpx.stream("POST", url, headers=headers, json=body) as response:
        for line in response.iter_lines():
            if "w3" in line:
                break  # the client goes away
    (record,) = gateway.wait_records(1)
    assert record.status == "client_disconnected"
    assert record.output_tokens > 0


def test_an_upstream_that_never_answers_times_out_and_is_recorded(gateway: Gateway) -> None:
    gateway.openai_provider.timeout = 1
    gateway.openai_provider.save()
    gateway.fake.script(Hang(), Hang(), Hang())
    response = httpx.post(
        gateway.base_url + "/chat/completions",
        headers={"authorization": f"Bearer {gateway.key}"},
        json={"model": "gpt-fake", "messages": USER},
        timeout=30,
    )
    assert response.status_code == 504, response.text
    assert json.loads(response.text)["error"]["type"] == "timeout_error"
    (record,) = gateway.records()
    assert (record.status, record.http_status) == ("error", 504)


HOSTILE = {
    "deep nesting": b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "a 5,000-digit integer": b'{"model": "m", "max_tokens": ' + b"9" * 5000 + b"}",
    "a lone surrogate": b'{"model": "x\\ud800", "messages": [{"role": "user", "content": "hi"}]}',
    "a NUL": b'{"model": "gpt-fake", "messages": [{"role": "user", "content": "a\\u0000b"}]}',
}
ENDPOINTS = ["/v1/chat/completions", "/v1/messages", "/v1/messages/count_tokens", "/v1/embeddings"]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("what", list(HOSTILE))
def test_hostile_json_is_a_400_naming_the_problem_and_is_recorded(
    gateway: Gateway, endpoint: str, what: str
) -> None:
    response = httpx.post(
        gateway.url + endpoint,
        headers={
            "authorization": f"Bearer {gateway.key}",
            "anthropic-version": "2023-06-01",
            "content-type": "application/json",
        },
        content=HOSTILE[what],
    )
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    expected = {
        "deep nesting": "nest",
        "a 5,000-digit integer": "integer too long",
        "a lone surrogate": "surrogate",
        "a NUL": "NUL",
    }[what]
    assert expected in message
    (record,) = gateway.records()
    assert (record.status, record.http_status) == ("error", 400)
    assert expected in record.error_message
    # The ledger went on writing: the next request is recorded too.
    gateway.fake.script(Reply(text="ok"))
    gateway.openai().chat.completions.create(model="gpt-fake", messages=USER)  # type: ignore[arg-type]
    assert len(gateway.records()) == 2


@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
async def test_a_stream_is_recorded_before_its_last_element_reaches_the_transport(
    gateway: Gateway, dialect: str
) -> None:
    # A client that received the whole answer has a usage record, whatever happens to
    # the worker afterwards: the pipeline settles (journals the record) before it hands
    # the upstream's last element to the transport that writes it.
    from chatapp.relay import pipeline
    from chatapp.relay.canonical import ChatRequest, TextPart
    from chatapp.relay.canonical import Message as Turn

    model = "claude-fake" if dialect == "anthropic" else "gpt-fake"
    gateway.fake.script(Reply(text="one two three"))
    call = pipeline.Call(
        principal=None,
        endpoint="test",
        dialect=dialect,
        model=model,
        stream=True,
        request=ChatRequest(
            model=model,
            messages=[Turn("user", [TextPart("hi")])],
            max_tokens=50,
            stream=True,
            include_usage=True,
            dialect=dialect,
        ),
    )
    settled_at_last: list[bool] = []
    async with pipeline.chat(call) as stream:
        async for _item in stream:
            settled_at_last.append(call.settled)
        assert call.status == "ok"
    if dialect == "anthropic":
        # message_stop is the upstream's (and the client's) last element.
        assert settled_at_last[-1] is True
    else:
        # OpenAI's last element is [DONE], which the transport writes after the loop.
        assert call.settled
    assert settled_at_last.count(True) <= 1


async def test_a_cancel_swallowed_on_the_way_still_ends_the_stream(gateway: Gateway) -> None:
    # On Python 3.11 asyncio.wait_for returns normally when it is cancelled just as what
    # it waits for completes (redis-py wraps every write in one).  A shutdown's or a
    # disconnect's cancel lost that way must still end the stream, billed as cut.
    import asyncio

    from chatapp.relay import pipeline
    from chatapp.relay.canonical import ChatRequest, TextPart
    from chatapp.relay.canonical import Message as Turn

    gateway.fake.script(Reply(text=" ".join(f"w{i}" for i in range(60)), chunk_delay=0.02))
    call = pipeline.Call(
        principal=None,
        endpoint="test",
        dialect="openai",
        model="gpt-fake",
        stream=True,
        request=ChatRequest(
            model="gpt-fake",
            messages=[Turn("user", [TextPart("count")])],
            max_tokens=200,
            stream=True,
            include_usage=True,
            dialect="openai",
        ),
        on_cancel=pipeline.INTERRUPTED,
    )
    loop = asyncio.get_running_loop()
    written = loop.create_future()  # what the consumer's write waits for
    writing = asyncio.Event()
    items = 0

    async def consume() -> None:
        nonlocal items
        async with pipeline.chat(call) as stream:
            async for _item in stream:
                items += 1
                if items == 3:
                    writing.set()
                    await asyncio.wait_for(written, 5)

    task = asyncio.create_task(consume())
    await asyncio.wait_for(writing.wait(), 10)
    # The write completes and the cancel arrives in the same turn of the loop.
    written.set_result(None)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert items == 3
    assert call.status == "interrupted"
    assert call.settled
