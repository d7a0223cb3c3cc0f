"""/v1/messages and /v1/messages/count_tokens through the official anthropic SDK."""

from __future__ import annotations

import base64

import httpx

from tests.fake_upstream import Reply
from tests.gateway import UPSTREAM_KEY, Gateway
from tests.sse import parse_sse

USER = [{"role": "user", "content": "Say hello"}]
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


def test_a_message_is_relayed_with_the_x_api_key_header(gateway: Gateway) -> None:
    gateway.fake.script(Reply(text="Hi from Claude.", input_tokens=12, output_tokens=5))
    response = gateway.anthropic().messages.with_raw_response.create(
        model="claude-fake",
        max_tokens=100,
        system=[{"type": "text", "text": "Be brief."}],
        messages=USER,  # type: ignore[arg-type]
        stop_sequences=["END"],
        extra_body={"top_k": 5},
        metadata={"user_id": "u-1"},
    )
    message = response.parse()
    assert message.content[0].text == "Hi from Claude."  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    assert message.model == "claude-fake"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (12, 5)
    assert response.headers["x-request-id"].startswith("req_")

    sent = gateway.fake.requests[-1]
    assert sent.path == "/v1/messages"
    assert sent.headers["x-api-key"] == UPSTREAM_KEY
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert sent.json is not None
    assert sent.json["model"] == "claude-upstream"
    assert sent.json["system"] == [{"type": "text", "text": "Be brief."}]
    assert sent.json["top_k"] == 5

    [record] = gateway.wait_records(1)
    assert (record.endpoint, record.dialect, record.input_tokens, record.output_tokens) == (
        "messages",
        "anthropic",
        12,
        5,
    )


def test_a_bearer_token_works_on_messages_too(gateway: Gateway) -> None:
    response = httpx.post(
        gateway.url + "/v1/messages",
        headers={
            "authorization": f"Bearer {gateway.key}",
            "anthropic-version": "2023-06-01",
            "anthropic-beta": "whatever-2025",
        },
        json={"model": "claude-fake", "max_tokens": 20, "messages": USER},
    )
    assert response.status_code == 200
    assert response.json()["type"] == "message"


def test_the_stream_is_the_real_event_sequence(gateway: Gateway) -> None:
    gateway.fake.script(Reply(text="one two three", input_tokens=7, output_tokens=3))
    with gateway.anthropic().messages.stream(
        model="claude-fake", max_tokens=50, messages=USER
    ) as stream:  # type: ignore[arg-type]
        names = [event.type for event in stream]
        message = stream.get_final_message()
    assert names[0] == "message_start"
    assert "ping" not in names  # the SDK hides pings; the raw stream test below checks them
    assert names[-1] == "message_stop"
    assert message.content[0].text == "one two three"  # type: ignore[union-attr]
    assert message.usage.output_tokens == 3
    [record] = gateway.wait_records(1)
    assert (record.stream, record.input_tokens, record.output_tokens) == (True, 7, 3)


def test_tool_use_streams_input_json_deltas(gateway: Gateway) -> None:
    gateway.fake.script(
        Reply(
            text="Let me check.",
            tool_calls=[{"id": "toolu_1", "name": "get_weather", "arguments": {"city": "Oslo"}}],
        )
    )
    with gateway.anthropic().messages.stream(
        model="claude-fake",
        max_tokens=50,
        messages=USER,
        tools=[WEATHER_TOOL],  # type: ignore[arg-type, list-item]
    ) as stream:
        message = stream.get_final_message()
    assert message.stop_reason == "tool_use"
    tool = message.content[1]
    assert (tool.type, tool.id, tool.name, tool.input) == (
        "tool_use",
        "toolu_1",
        "get_weather",
        {"city": "Oslo"},
    )  # type: ignore[union-attr]


def test_tool_results_and_images_reach_the_upstream(gateway: Gateway) -> None:
    pixel = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16).decode()
    gateway.anthropic().messages.create(
        model="claude-fake",
        max_tokens=50,
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Weather here?"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": pixel},
                    },
                    {
                        "type": "image",
                        "source": {"type": "url", "url": "https://example.com/sky.jpg"},
                    },
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "tool_use",
                        "id": "toolu_9",
                        "name": "get_weather",
                        "input": {"city": "Oslo"},
                    }
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_9", "content": "Sunny, 21°C"}
                ],
            },
        ],
    )
    sent = gateway.fake.requests[-1].json
    assert sent is not None
    assert sent["messages"][0]["content"][1]["source"]["data"] == pixel
    assert sent["messages"][2]["content"][0] == {
        "type": "tool_result",
        "tool_use_id": "toolu_9",
        "content": "Sunny, 21°C",
    }


def test_raw_stream_has_ping_and_named_events(gateway: Gateway) -> None:
    gateway.fake.script(Reply(text="hi there"))
    with httpx.stream(
        "POST",
        gateway.url + "/v1/messages",
        headers={"x-api-key": gateway.key, "anthropic-version": "2023-06-01"},
        json={"model": "claude-fake", "max_tokens": 20, "messages": USER, "stream": True},
    ) as response:
        events = parse_sse(response.read(), strict=True)
    assert all(data["type"] == name for name, data in events)
    names = [name for name, _data in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]


def test_count_tokens_uses_the_upstream_count(gateway: Gateway) -> None:
    count = gateway.anthropic().messages.count_tokens(model="claude-fake", messages=USER)  # type: ignore[arg-type]
    assert count.input_tokens > 0
    assert gateway.fake.requests[-1].path == "/v1/messages/count_tokens"


def test_count_tokens_estimates_for_an_openai_routed_model(gateway: Gateway) -> None:
    count = gateway.anthropic().messages.count_tokens(
        model="gpt-fake", messages=[{"role": "user", "content": "x" * 400}]
    )
    assert 100 <= count.input_tokens <= 120


def test_models_in_anthropic_shape_when_anthropic_version_is_sent(gateway: Gateway) -> None:
    page = gateway.anthropic().models.list()
    assert sorted(model.id for model in page.data) == ["claude-fake", "embed-fake", "gpt-fake"]
    assert all(model.type == "model" for model in page.data)
    assert gateway.anthropic().models.retrieve("claude-fake").display_name == "claude-fake"
