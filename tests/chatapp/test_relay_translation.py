"""Translation both ways: OpenAI clients on Anthropic upstreams and vice versa."""

from __future__ import annotations

import base64
import json

from tests.fake_upstream import Reply
from tests.gateway import Gateway

TOOLS_OPENAI = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
TOOLS_ANTHROPIC = [
    {
        "name": "get_weather",
        "description": "Weather for a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
]
PIXEL = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16).decode()


def test_an_openai_client_talks_to_an_anthropic_upstream(gateway: Gateway) -> None:
    gateway.fake.script(Reply(text="Bonjour.", input_tokens=20, output_tokens=3, cached_tokens=4))
    completion = gateway.openai().chat.completions.create(
        model="claude-fake",
        messages=[
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Salut"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Again"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL}"}},
                ],
            },
        ],
        max_tokens=64,
        temperature=1.7,
        stop=["\n\n"],
    )
    assert completion.choices[0].message.content == "Bonjour."
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    # Anthropic counts cache reads apart from input_tokens; OpenAI's prompt_tokens include them.
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (24, 3)
    assert completion.usage.prompt_tokens_details.cached_tokens == 4  # type: ignore[union-attr]

    sent = gateway.fake.requests[-1]
    assert sent.path == "/v1/messages"
    body = sent.json
    assert body is not None
    assert body["system"] == "Answer in French."
    assert body["max_tokens"] == 64
    assert body["temperature"] == 1.0  # clamped to Anthropic's range
    assert body["stop_sequences"] == ["\n\n"]
    assert [message["role"] for message in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][2]["content"][1] == {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": PIXEL},
    }
    [record] = gateway.wait_records(1)
    assert (record.provider, record.input_tokens, record.cached_tokens) == ("fake-anthropic", 24, 4)


def test_an_openai_stream_from_an_anthropic_upstream(gateway: Gateway) -> None:
    gateway.fake.script(Reply(text="uno dos tres", input_tokens=6, output_tokens=3))
    chunks = list(
        gateway.openai().chat.completions.create(
            model="claude-fake",
            messages=[{"role": "user", "content": "count"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert (
        "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        == "uno dos tres"
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "stop"
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (6, 3)


def test_openai_tools_against_an_anthropic_upstream(gateway: Gateway) -> None:
    gateway.fake.script(
        Reply(
            text="",
            tool_calls=[{"id": "toolu_5", "name": "get_weather", "arguments": {"city": "Lima"}}],
        ),
        Reply(text="It is sunny."),
    )
    client = gateway.openai()
    stream = client.chat.completions.create(
        model="claude-fake",
        messages=[{"role": "user", "content": "Weather in Lima?"}],
        tools=TOOLS_OPENAI,
        tool_choice="required",
        stream=True,  # type: ignore[arg-type]
    )
    arguments, ids, finish = "", [], None
    for chunk in stream:
        if not chunk.choices:
            continue
        for delta in chunk.choices[0].delta.tool_calls or []:
            if delta.id:
                ids.append(delta.id)
            arguments += delta.function.arguments or "" if delta.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert ids == ["toolu_5"]
    assert json.loads(arguments) == {"city": "Lima"}
    assert finish == "tool_calls"
    sent = gateway.fake.requests[-1].json
    assert sent is not None
    assert sent["tools"][0]["input_schema"]["properties"] == {"city": {"type": "string"}}
    assert sent["tool_choice"] == {"type": "any"}

    # The tool result goes back as an Anthropic tool_result block in a user turn.
    client.chat.completions.create(
        model="claude-fake",
        tools=TOOLS_OPENAI,  # type: ignore[arg-type]
        messages=[
            {"role": "user", "content": "Weather in Lima?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "toolu_5",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Lima"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_5", "content": "Sunny"},
        ],
    )
    sent = gateway.fake.requests[-1].json
    assert sent is not None
    assert sent["messages"][1]["content"] == [
        {"type": "tool_use", "id": "toolu_5", "name": "get_weather", "input": {"city": "Lima"}}
    ]
    assert sent["messages"][2] == {
        "role": "user",
        "content": [
            {
                "type": "tool_result",
                "tool_use_id": "toolu_5",
                "content": [{"type": "text", "text": "Sunny"}],
            }
        ],
    }


def test_an_anthropic_client_talks_to_an_openai_upstream(gateway: Gateway) -> None:
    gateway.fake.script(Reply(text="Hello!", input_tokens=8, output_tokens=2))
    message = gateway.anthropic().messages.create(
        model="gpt-fake",
        max_tokens=30,
        system="Be nice.",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Hi"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": PIXEL},
                    },
                ],
            }
        ],
        stop_sequences=["STOP"],
    )
    assert message.content[0].text == "Hello!"  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (8, 2)
    body = gateway.fake.requests[-1].json
    assert body is not None
    assert body["messages"][0] == {"role": "system", "content": "Be nice."}
    assert body["messages"][1]["content"][1] == {
        "type": "image_url",
        "image_url": {"url": f"data:image/png;base64,{PIXEL}"},
    }
    assert body["max_tokens"] == 30
    assert body["stop"] == ["STOP"]


def test_an_anthropic_stream_from_an_openai_upstream_with_tools(gateway: Gateway) -> None:
    gateway.fake.script(
        Reply(
            text="Checking.",
            tool_calls=[{"id": "call_7", "name": "get_weather", "arguments": {"city": "Quito"}}],
            input_tokens=9,
            output_tokens=6,
        )
    )
    with gateway.anthropic().messages.stream(
        model="gpt-fake",
        max_tokens=50,
        messages=[{"role": "user", "content": "Weather?"}],
        tools=TOOLS_ANTHROPIC,  # type: ignore[arg-type]
    ) as stream:
        message = stream.get_final_message()
    assert message.content[0].text == "Checking."  # type: ignore[union-attr]
    tool = message.content[1]
    assert (tool.type, tool.id, tool.input) == ("tool_use", "call_7", {"city": "Quito"})  # type: ignore[union-attr]
    assert message.stop_reason == "tool_use"
    assert message.usage.output_tokens == 6
    assert message.usage.input_tokens == 9
    body = gateway.fake.requests[-1].json
    assert body is not None
    assert body["stream_options"] == {"include_usage": True}
    assert body["tools"][0]["function"]["parameters"] == {
        "type": "object",
        "properties": {"city": {"type": "string"}},
    }


def test_finish_reasons_translate(gateway: Gateway) -> None:
    gateway.fake.script(Reply(text="cut", finish="length"), Reply(text="cut", finish="length"))
    completion = gateway.openai().chat.completions.create(
        model="claude-fake", messages=[{"role": "user", "content": "x"}], max_tokens=1
    )
    assert completion.choices[0].finish_reason == "length"
    message = gateway.anthropic().messages.create(
        model="gpt-fake", max_tokens=1, messages=[{"role": "user", "content": "x"}]
    )
    assert message.stop_reason == "max_tokens"
