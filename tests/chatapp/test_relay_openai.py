"""/v1/chat/completions, /v1/embeddings and /v1/models through the official openai SDK."""

from __future__ import annotations

import base64
import json
import struct

import httpx
import openai
import pytest

from tests.fake_upstream import Reply, embedding_for
from tests.gateway import UPSTREAM_KEY, Gateway
from tests.sse import has_event_names, parse_sse

USER = [{"role": "user", "content": "Say hello"}]


def test_a_chat_completion_is_relayed_and_recorded(gateway: Gateway) -> None:
    gateway.fake.script(Reply(text="Hello there, friend.", input_tokens=11, output_tokens=4))

    response = gateway.openai().chat.completions.with_raw_response.create(
        model="gpt-fake", messages=USER, temperature=0.3, seed=7, user="u-42"
    )
    completion = response.parse()

    assert completion.choices[0].message.content == "Hello there, friend."
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "gpt-fake"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (11, 4)
    assert response.headers["x-request-id"].startswith("req_")

    # The upstream got the upstream model id, our provider's key, and the client's fields.
    sent = gateway.fake.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.json is not None
    assert sent.json["model"] == "gpt-upstream"
    assert sent.json["temperature"] == 0.3
    assert sent.json["seed"] == 7
    assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"

    [record] = gateway.wait_records(1)
    assert record.request_id == response.headers["x-request-id"]
    assert (record.model, record.provider, record.upstream_model) == (
        "gpt-fake",
        "fake-openai",
        "gpt-upstream",
    )
    assert (record.input_tokens, record.output_tokens, record.estimated) == (11, 4, False)
    assert (record.status, record.http_status, record.stream, record.dialect) == (
        "ok",
        200,
        False,
        "openai",
    )
    assert record.user_id == gateway.user.pk
    assert record.ttft_ms is not None


def test_unknown_fields_pass_through_to_an_openai_upstream(gateway: Gateway) -> None:
    gateway.openai().chat.completions.create(
        model="gpt-fake",
        messages=USER,
        extra_body={"logit_bias": {"50256": -100}, "vendor_knob": True},
    )
    sent = gateway.fake.requests[-1].json
    assert sent is not None
    assert sent["logit_bias"] == {"50256": -100}
    assert sent["vendor_knob"] is True


def test_a_stream_arrives_in_chunks_with_usage_when_asked(gateway: Gateway) -> None:
    gateway.fake.script(Reply(text="one two three four", input_tokens=9, output_tokens=4))
    stream = gateway.openai().chat.completions.create(
        model="gpt-fake", messages=USER, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == "one two three four"
    assert len([chunk for chunk in chunks if chunk.choices and chunk.choices[0].delta.content]) == 4
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "stop"
    assert all(chunk.model == "gpt-fake" for chunk in chunks)
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == 9

    # The relay always asks the upstream for usage.
    sent = gateway.fake.requests[-1].json
    assert sent is not None
    assert sent["stream_options"] == {"include_usage": True}
    [record] = gateway.wait_records(1)
    assert (record.stream, record.input_tokens, record.output_tokens, record.status) == (
        True,
        9,
        4,
        "ok",
    )


def test_a_stream_without_include_usage_carries_no_usage_but_is_still_billed(
    gateway: Gateway,
) -> None:
    gateway.fake.script(Reply(text="a b", input_tokens=5, output_tokens=2))
    chunks = list(
        gateway.openai().chat.completions.create(model="gpt-fake", messages=USER, stream=True)
    )
    assert all(chunk.usage is None for chunk in chunks)
    assert all(chunk.choices for chunk in chunks)
    [record] = gateway.wait_records(1)
    assert (record.input_tokens, record.output_tokens, record.estimated) == (5, 2, False)


def test_the_raw_stream_ends_with_done(gateway: Gateway) -> None:
    with httpx.stream(
        "POST",
        gateway.base_url + "/chat/completions",
        headers={"authorization": f"Bearer {gateway.key}"},
        json={"model": "gpt-fake", "messages": USER, "stream": True},
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        body = response.read()
    events = parse_sse(body, strict=True)
    assert not has_event_names(body)
    assert events[-1] == ("message", "[DONE]")
    assert len(events) >= 4
    assert all(chunk["object"] == "chat.completion.chunk" for _name, chunk in events[:-1])


def test_tool_calls_round_trip(gateway: Gateway) -> None:
    gateway.fake.script(
        Reply(
            text="",
            tool_calls=[{"id": "call_1", "name": "get_weather", "arguments": {"city": "Paris"}}],
        ),
        Reply(
            text="",
            tool_calls=[{"id": "call_2", "name": "get_weather", "arguments": {"city": "Rome"}}],
        ),
    )
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    client = gateway.openai()
    completion = client.chat.completions.create(
        model="gpt-fake", messages=USER, tools=tools, tool_choice="auto"
    )  # type: ignore[arg-type]
    call = completion.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert completion.choices[0].finish_reason == "tool_calls"
    assert (call.id, call.function.name) == ("call_1", "get_weather")  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]

    stream = client.chat.completions.create(
        model="gpt-fake", messages=USER, tools=tools, stream=True
    )  # type: ignore[arg-type]
    arguments = ""
    names = []
    for chunk in stream:
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            if delta.function and delta.function.name:
                names.append(delta.function.name)
            arguments += (delta.function.arguments or "") if delta.function else ""
    assert names == ["get_weather"]
    assert json.loads(arguments) == {"city": "Rome"}


def test_images_as_urls_and_data_urls_reach_the_upstream(gateway: Gateway) -> None:
    pixel = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 32).decode()
    gateway.openai().chat.completions.create(
        model="gpt-fake",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in these?"},
                    {
                        "type": "image_url",
                        "image_url": {"url": "https://example.com/cat.png", "detail": "low"},
                    },
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{pixel}"}},
                ],
            }
        ],
    )
    sent = gateway.fake.requests[-1].json
    assert sent is not None
    parts = sent["messages"][0]["content"]
    assert parts[1]["image_url"] == {"url": "https://example.com/cat.png", "detail": "low"}
    assert parts[2]["image_url"]["url"] == f"data:image/png;base64,{pixel}"


def test_embeddings_as_floats_and_base64(gateway: Gateway) -> None:
    client = gateway.openai()
    floats = client.embeddings.create(
        model="embed-fake", input=["alpha", "beta"], encoding_format="float"
    )
    assert floats.data[0].embedding == pytest.approx(embedding_for("alpha"))
    assert floats.data[1].embedding == pytest.approx(embedding_for("beta"))
    assert floats.model == "embed-fake"
    # The SDK's default asks for base64 and decodes it.
    decoded = client.embeddings.create(model="embed-fake", input="alpha")
    assert decoded.data[0].embedding == pytest.approx(embedding_for("alpha"), rel=1e-6)
    raw = httpx.post(
        gateway.base_url + "/embeddings",
        headers={"authorization": f"Bearer {gateway.key}"},
        json={"model": "embed-fake", "input": "alpha", "encoding_format": "base64"},
    ).json()
    vector = struct.unpack(
        f"<{len(embedding_for('alpha'))}f", base64.b64decode(raw["data"][0]["embedding"])
    )
    assert list(vector) == pytest.approx(embedding_for("alpha"), rel=1e-6)
    records = gateway.records()
    assert [record.endpoint for record in records] == ["embeddings"] * 3
    assert all(record.input_tokens > 0 for record in records)


def test_models_lists_only_what_the_key_may_use(gateway: Gateway) -> None:
    client = gateway.openai()
    assert sorted(model.id for model in client.models.list()) == [
        "claude-fake",
        "embed-fake",
        "gpt-fake",
    ]
    assert client.models.retrieve("gpt-fake").id == "gpt-fake"

    from keys.models import ApiKey

    _key, limited = ApiKey.issue(user=gateway.user, allowed_models=["claude-fake"])
    limited_client = gateway.openai(limited)
    assert [model.id for model in limited_client.models.list()] == ["claude-fake"]
    with pytest.raises(openai.NotFoundError):
        limited_client.models.retrieve("gpt-fake")
    with pytest.raises(openai.PermissionDeniedError, match="may not use the model 'gpt-fake'"):
        limited_client.chat.completions.create(model="gpt-fake", messages=USER)  # type: ignore[arg-type]


def test_n_choices_come_back_from_an_openai_upstream(gateway: Gateway) -> None:
    completion = gateway.openai().chat.completions.create(model="gpt-fake", messages=USER, n=2)  # type: ignore[arg-type]
    assert [choice.index for choice in completion.choices] == [0, 1]
