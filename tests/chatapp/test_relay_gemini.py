"""A Gemini upstream (provider type ``gemini``) through the live app, with the official SDKs.

The fake in ``tests/fake_gemini.py`` speaks Google's v1beta wire format and refuses what
the real API refuses (unknown fields, unsigned function calls, mismatched function
responses); the ``google-genai`` SDK, where it is installed, checks both the fake and the
request bodies we send.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import re
from decimal import Decimal
from typing import Any

import anthropic
import httpx
import openai
import pytest
from channels.testing import WebsocketCommunicator
from django.core.exceptions import ValidationError
from django.utils import translation

from chatapp.actions import alist_models
from chatapp.models import CatalogModel, Conversation, Provider, Route
from chatapp.relay import routing
from chatapp.relay.upstreams import gemini
from keys import ledger
from keys.actions import do_set_price
from keys.models import UsageRecord
from keys.pricing import MILLION
from tests.conftest import make_user
from tests.fake_gemini import (
    GEMINI_MODELS,
    DropMidStream,
    Fail,
    FakeGemini,
    GeminiReply,
    Malformed,
    Reply,
    fake_gemini,  # noqa: F401 - fixture
    text_of,
)
from tests.fake_upstream import RecordedRequest
from tests.gateway import Gateway

GEMINI_KEY = "AIza-fake-gemini-key"
USER = [{"role": "user", "content": "Say hello"}]
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}
OPENAI_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather for a city", "parameters": WEATHER},
}
ANTHROPIC_TOOL = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": WEATHER,
}
PIXEL = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16).decode()


@pytest.fixture
def gem(gateway: Gateway, fake_gemini: FakeGemini) -> Gateway:  # noqa: F811
    """The gateway with a Gemini provider (at the fake, which wants its key) and ``gemini-fake``."""
    fake_gemini.api_key = GEMINI_KEY
    provider = Provider(name="fake-gemini", type="gemini", base_url=fake_gemini.url, timeout=5)
    provider.api_key = GEMINI_KEY
    provider.full_clean()
    provider.save()
    gateway.add_model(
        "gemini-fake",
        provider,
        "gemini-2.5-flash",
        supports_vision=True,
        supports_tools=True,
        max_output_tokens=8192,
    )
    gateway.gemini = fake_gemini  # type: ignore[attr-defined]
    return gateway


def fake(gateway: Gateway) -> FakeGemini:
    return gateway.gemini  # type: ignore[attr-defined, no-any-return]


def last(gateway: Gateway) -> RecordedRequest:
    return fake(gateway).requests[-1]


def body(gateway: Gateway) -> dict[str, Any]:
    sent = last(gateway).json
    assert isinstance(sent, dict)
    return sent


# --- text, system, parameters ---


def test_a_chat_completion_is_a_generate_content_call(gem: Gateway) -> None:
    fake(gem).script(Reply(text="Hi from Gemini.", input_tokens=12, output_tokens=5))
    completion = gem.openai().chat.completions.create(
        model="gemini-fake",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hello"},
            {"role": "assistant", "content": "Hello?"},
            {"role": "user", "content": "Again"},
        ],
        max_tokens=100,
        temperature=0.4,
        top_p=0.9,
        stop=["END"],
        seed=7,
    )
    assert completion.choices[0].message.content == "Hi from Gemini."
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "gemini-fake"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (12, 5)  # type: ignore[union-attr]

    sent = last(gem)
    assert sent.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert sent.headers["x-goog-api-key"] == GEMINI_KEY
    assert "authorization" not in sent.headers
    assert body(gem) == {
        "contents": [
            {"role": "user", "parts": [{"text": "Say hello"}]},
            {"role": "model", "parts": [{"text": "Hello?"}]},
            {"role": "user", "parts": [{"text": "Again"}]},
        ],
        "systemInstruction": {"parts": [{"text": "Be brief."}]},
        "generationConfig": {
            "maxOutputTokens": 100,
            "temperature": 0.4,
            "topP": 0.9,
            "seed": 7,
            "stopSequences": ["END"],
        },
    }
    [record] = gem.wait_records(1)
    assert (record.provider, record.upstream_model, record.dialect) == (
        "fake-gemini",
        "gemini-2.5-flash",
        "openai",
    )
    assert (record.input_tokens, record.output_tokens, record.estimated) == (12, 5, False)


def test_a_streamed_completion_arrives_word_by_word_with_usage(gem: Gateway) -> None:
    fake(gem).script(Reply(text="one two three", input_tokens=7, output_tokens=3))
    stream = gem.openai().chat.completions.create(
        model="gemini-fake",
        messages=USER,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    usage = chunks[-1].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (7, 3)

    sent = last(gem)
    assert sent.path == "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
    assert sent.query == {"alt": "sse"}
    [record] = gem.wait_records(1)
    assert (record.stream, record.input_tokens, record.output_tokens) == (True, 7, 3)


def test_an_anthropic_client_gets_a_message_from_gemini(gem: Gateway) -> None:
    fake(gem).script(Reply(text="Bonjour.", input_tokens=9, output_tokens=2, finish="length"))
    message = gem.anthropic().messages.create(
        model="gemini-fake",
        max_tokens=2,
        system="Answer in French.",
        messages=USER,  # type: ignore[arg-type]
        extra_body={"top_k": 3, "temperature": 0.2},
    )
    assert message.content[0].text == "Bonjour."  # type: ignore[union-attr]
    assert message.stop_reason == "max_tokens"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (9, 2)
    sent = body(gem)
    assert sent["systemInstruction"] == {"parts": [{"text": "Answer in French."}]}
    assert sent["generationConfig"] == {"maxOutputTokens": 2, "temperature": 0.2, "topK": 3}


def test_an_anthropic_stream_from_gemini_is_the_real_event_sequence(gem: Gateway) -> None:
    fake(gem).script(Reply(text="a b c d", input_tokens=5, output_tokens=4, chunk_delay=0.01))
    with gem.anthropic().messages.stream(
        model="gemini-fake",
        max_tokens=50,
        messages=USER,  # type: ignore[arg-type]
    ) as stream:
        names = [event.type for event in stream]
        message = stream.get_final_message()
    assert names[0] == "message_start"
    assert names[-1] == "message_stop"
    assert message.content[0].text == "a b c d"  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (5, 4)
    [record] = gem.wait_records(1)
    assert (record.dialect, record.stream, record.output_tokens) == ("anthropic", True, 4)


def test_several_choices_are_several_candidates(gem: Gateway) -> None:
    fake(gem).script(Reply(text="same"), Reply(text="x y"))
    completion = gem.openai().chat.completions.create(model="gemini-fake", messages=USER, n=2)  # type: ignore[arg-type]
    assert [choice.message.content for choice in completion.choices] == ["same", "same"]
    assert body(gem)["generationConfig"] == {"candidateCount": 2}

    stream = gem.openai().chat.completions.create(
        model="gemini-fake",
        messages=USER,  # type: ignore[arg-type]
        n=2,
        stream=True,
    )
    texts = ["", ""]
    finished = set()
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert texts == ["x y", "x y"]
    assert finished == {0, 1}


def test_json_response_formats_become_response_mime_type_and_schema(gem: Gateway) -> None:
    fake(gem).script(Reply(text='{"a": 1}'), Reply(text='{"city": "Oslo"}'))
    gem.openai().chat.completions.create(
        model="gemini-fake",
        messages=USER,  # type: ignore[arg-type]
        response_format={"type": "json_object"},
    )
    assert body(gem)["generationConfig"] == {"responseMimeType": "application/json"}
    gem.openai().chat.completions.create(
        model="gemini-fake",
        messages=USER,  # type: ignore[arg-type]
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "place", "schema": WEATHER, "strict": True},
        },
    )
    assert body(gem)["generationConfig"] == {
        "responseMimeType": "application/json",
        "responseJsonSchema": WEATHER,
    }


# --- tools ---


def test_a_tool_round_trip_with_the_openai_sdk(gem: Gateway) -> None:
    # Given: Gemini calls two functions at once, without ids (as it does)
    fake(gem).script(
        Reply(
            text="",
            tool_calls=[
                {"name": "get_weather", "arguments": {"city": "Oslo"}},
                {"name": "get_weather", "arguments": {"city": "Lima"}},
            ],
        ),
        Reply(text="Cold in Oslo, mild in Lima."),
    )
    client = gem.openai()
    first = client.chat.completions.create(
        model="gemini-fake",
        messages=USER,  # type: ignore[arg-type]
        tools=[OPENAI_TOOL],  # type: ignore[list-item]
        tool_choice="required",
    )
    # Then: the client gets OpenAI tool calls with ids of ours
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [  # type: ignore[union-attr]
        ("get_weather", {"city": "Oslo"}),
        ("get_weather", {"city": "Lima"}),
    ]
    assert all(c.id.startswith("call_") for c in calls)
    assert len({c.id for c in calls}) == 2
    sent = body(gem)
    assert sent["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "get_weather",
                    "description": "Weather for a city",
                    "parametersJsonSchema": WEATHER,
                }
            ]
        }
    ]
    assert sent["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}

    # When: the client answers both calls, one as an error
    second = client.chat.completions.create(
        model="gemini-fake",
        messages=[
            *USER,
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": calls[0].id, "content": "-3 C"},
            {"role": "tool", "tool_call_id": calls[1].id, "content": "18 C"},
        ],  # type: ignore[list-item]
        tools=[OPENAI_TOOL],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    assert second.choices[0].message.content == "Cold in Oslo, mild in Lima."
    # Then: Gemini gets its calls back (signed as Google documents for replayed calls) and
    # one user turn with both responses, named after the calls, matched by our ids
    contents = body(gem)["contents"]
    assert contents[1] == {
        "role": "model",
        "parts": [
            {
                "functionCall": {
                    "id": calls[0].id,
                    "name": "get_weather",
                    "args": {"city": "Oslo"},
                },
                "thoughtSignature": "skip_thought_signature_validator",
            },
            {
                "functionCall": {
                    "id": calls[1].id,
                    "name": "get_weather",
                    "args": {"city": "Lima"},
                },
                "thoughtSignature": "skip_thought_signature_validator",
            },
        ],
    }
    assert contents[2] == {
        "role": "user",
        "parts": [
            {
                "functionResponse": {
                    "id": calls[0].id,
                    "name": "get_weather",
                    "response": {"output": "-3 C"},
                }
            },
            {
                "functionResponse": {
                    "id": calls[1].id,
                    "name": "get_weather",
                    "response": {"output": "18 C"},
                }
            },
        ],
    }
    assert body(gem)["toolConfig"] == {
        "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}
    }


def test_gemini_call_ids_are_kept_and_tool_choice_none_and_auto_map(gem: Gateway) -> None:
    fake(gem).script(
        Reply(text="", tool_calls=[{"id": "gem-7", "name": "get_weather", "arguments": {}}]),
        Reply(text="ok"),
    )
    first = gem.openai().chat.completions.create(
        model="gemini-fake",
        messages=USER,  # type: ignore[arg-type]
        tools=[OPENAI_TOOL],  # type: ignore[list-item]
        tool_choice="auto",
    )
    assert first.choices[0].message.tool_calls[0].id == "gem-7"  # type: ignore[index]
    assert body(gem)["toolConfig"] == {"functionCallingConfig": {"mode": "AUTO"}}
    gem.openai().chat.completions.create(
        model="gemini-fake",
        messages=USER,  # type: ignore[arg-type]
        tools=[OPENAI_TOOL],  # type: ignore[list-item]
        tool_choice="none",
    )
    assert body(gem)["toolConfig"] == {"functionCallingConfig": {"mode": "NONE"}}


def test_a_tool_round_trip_with_the_anthropic_sdk_streamed(gem: Gateway) -> None:
    fake(gem).script(
        Reply(
            text="Let me check.",
            tool_calls=[{"name": "get_weather", "arguments": {"city": "Oslo"}}],
        ),
        Reply(text="It is cold."),
    )
    client = gem.anthropic()
    with client.messages.stream(
        model="gemini-fake",
        max_tokens=50,
        messages=USER,  # type: ignore[arg-type]
        tools=[ANTHROPIC_TOOL],  # type: ignore[list-item]
    ) as stream:
        message = stream.get_final_message()
    assert message.stop_reason == "tool_use"
    text, tool = message.content
    assert text.text == "Let me check."  # type: ignore[union-attr]
    assert (tool.type, tool.name, tool.input) == ("tool_use", "get_weather", {"city": "Oslo"})  # type: ignore[union-attr]

    answer = client.messages.create(
        model="gemini-fake",
        max_tokens=50,
        tools=[ANTHROPIC_TOOL],  # type: ignore[list-item]
        messages=[
            *USER,
            {"role": "assistant", "content": [block.model_dump() for block in message.content]},
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": tool.id,  # type: ignore[union-attr]
                        "content": "no such city",
                        "is_error": True,
                    },
                    {"type": "text", "text": "Sorry, try again."},
                ],
            },
        ],  # type: ignore[arg-type]
    )
    assert answer.content[0].text == "It is cold."  # type: ignore[union-attr]
    contents = body(gem)["contents"]
    assert contents[1]["parts"][0] == {"text": "Let me check."}
    assert contents[2] == {
        "role": "user",
        "parts": [
            {
                "functionResponse": {
                    "id": tool.id,  # type: ignore[union-attr]
                    "name": "get_weather",
                    "response": {"error": "no such city"},
                }
            },
            {"text": "Sorry, try again."},
        ],
    }


def test_a_tool_result_for_an_unknown_call_is_refused_with_a_reason(gem: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        gem.openai().chat.completions.create(
            model="gemini-fake",
            messages=[*USER, {"role": "tool", "tool_call_id": "call_x", "content": "1"}],  # type: ignore[list-item]
            tools=[OPENAI_TOOL],  # type: ignore[list-item]
        )
    assert "answers no tool call" in caught.value.message
    assert "call_x" in caught.value.message
    assert fake(gem).requests == []


# --- images ---


def test_images_go_as_inline_data_and_urls_as_file_data(gem: Gateway) -> None:
    gem.openai().chat.completions.create(
        model="gemini-fake",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What are these?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL}"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.webp"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/photo?id=3"}},
                ],
            }
        ],  # type: ignore[list-item]
    )
    assert body(gem)["contents"][0]["parts"] == [
        {"text": "What are these?"},
        {"inlineData": {"mimeType": "image/png", "data": PIXEL}},
        {"fileData": {"mimeType": "image/webp", "fileUri": "https://example.com/cat.webp"}},
        {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://example.com/photo?id=3"}},
    ]


def test_an_image_a_tool_returned_rides_beside_its_response(gem: Gateway) -> None:
    fake(gem).script(Reply(text="A pixel."))
    gem.anthropic().messages.create(
        model="gemini-fake",
        max_tokens=20,
        tools=[ANTHROPIC_TOOL],  # type: ignore[list-item]
        messages=[
            *USER,
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [
                            {"type": "text", "text": "radar"},
                            {
                                "type": "image",
                                "source": {
                                    "type": "base64",
                                    "media_type": "image/png",
                                    "data": PIXEL,
                                },
                            },
                        ],
                    }
                ],
            },
        ],  # type: ignore[arg-type]
    )
    assert body(gem)["contents"][2]["parts"] == [
        {
            "functionResponse": {
                "id": "toolu_1",
                "name": "get_weather",
                "response": {"output": "radar"},
            }
        },
        {"inlineData": {"mimeType": "image/png", "data": PIXEL}},
    ]


# --- usage and cost ---


def test_cached_and_thinking_tokens_are_recorded_and_priced(gem: Gateway) -> None:
    # Given: prices per 1M tokens, input 1.25, cached input 0.125, output 10
    do_set_price(
        model=CatalogModel.objects.get(name="gemini-fake"),
        input_price=Decimal("1.25"),
        output_price=Decimal(10),
        cached_input_price=Decimal("0.125"),
    )
    # and Gemini reports 4,000 prompt tokens (3,000 from its cache), 40 + 200 thinking out
    reply = GeminiReply(
        text="The answer.",
        thoughts="Let me think about it.",
        thoughts_tokens=200,
        input_tokens=4_000,
        cached_tokens=3_000,
        output_tokens=40,
    )
    fake(gem).script(reply, reply)
    # When: asked once plainly (OpenAI) and once streamed (Anthropic)
    completion = gem.openai().chat.completions.create(model="gemini-fake", messages=USER)  # type: ignore[arg-type]
    with gem.anthropic().messages.stream(
        model="gemini-fake",
        max_tokens=500,
        messages=USER,  # type: ignore[arg-type]
    ) as stream:
        message = stream.get_final_message()
    # Then: the thought summary is not the answer but the reasoning before it, and each
    # dialect says the same numbers
    assert completion.choices[0].message.content == "The answer."
    assert completion.choices[0].message.reasoning_content == "Let me think about it."  # type: ignore[attr-defined]
    assert [block.type for block in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == "Let me think about it."  # type: ignore[union-attr]
    assert message.content[1].text == "The answer."  # type: ignore[union-attr]
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens_details is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (4_000, 240)
    assert usage.completion_tokens_details.reasoning_tokens == 200  # type: ignore[union-attr]
    assert usage.prompt_tokens_details.cached_tokens == 3_000
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens) == (1_000, 3_000)
    assert message.usage.output_tokens == 240
    # and both usage records hold them, priced exactly
    expected = (1_000 * Decimal("1.25") + 3_000 * Decimal("0.125") + 240 * 10) / MILLION
    records = gem.wait_records(2)
    for record in records:
        assert (record.input_tokens, record.cached_tokens, record.output_tokens) == (
            4_000,
            3_000,
            240,
        )
        assert record.cost == expected
        assert record.estimated is False


def test_tool_use_prompt_tokens_count_as_input(gem: Gateway) -> None:
    fake(gem).script(
        GeminiReply(text="ok", input_tokens=10, tool_use_prompt_tokens=5, output_tokens=1)
    )
    completion = gem.openai().chat.completions.create(model="gemini-fake", messages=USER)  # type: ignore[arg-type]
    assert completion.usage.prompt_tokens == 15  # type: ignore[union-attr]


# --- finish reasons ---


@pytest.mark.parametrize(
    ("gemini_finish", "openai_finish", "anthropic_stop"),
    [
        ("length", "length", "max_tokens"),
        ("content_filter", "content_filter", "refusal"),
        ("RECITATION", "content_filter", "refusal"),
        ("MALFORMED_FUNCTION_CALL", "stop", "end_turn"),
    ],
)
def test_finish_reasons_map_to_each_dialect(
    gem: Gateway, gemini_finish: str, openai_finish: str, anthropic_stop: str
) -> None:
    fake(gem).script(
        Reply(text="cut", finish=gemini_finish), Reply(text="cut", finish=gemini_finish)
    )
    completion = gem.openai().chat.completions.create(model="gemini-fake", messages=USER)  # type: ignore[arg-type]
    assert completion.choices[0].finish_reason == openai_finish
    with gem.anthropic().messages.stream(
        model="gemini-fake",
        max_tokens=50,
        messages=USER,  # type: ignore[arg-type]
    ) as stream:
        message = stream.get_final_message()
    assert message.stop_reason == anthropic_stop


def test_a_blocked_prompt_is_a_content_filter_finish(gem: Gateway) -> None:
    blocked = GeminiReply(block_reason="SAFETY", input_tokens=6)
    fake(gem).script(blocked, blocked)
    completion = gem.openai().chat.completions.create(model="gemini-fake", messages=USER)  # type: ignore[arg-type]
    assert completion.choices[0].finish_reason == "content_filter"
    assert completion.choices[0].message.content in ("", None)
    stream = gem.openai().chat.completions.create(
        model="gemini-fake",
        messages=USER,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "content_filter"
    records = gem.wait_records(2)
    assert [(r.status, r.input_tokens) for r in records] == [("ok", 6), ("ok", 6)]


# --- errors ---


def test_gemini_errors_reach_each_dialect_with_the_right_status(gem: Gateway) -> None:
    # A rate limit: 429 with its retry-after, the upstream's own words in the message
    fake(gem).script(
        *[
            Fail(
                429,
                "Resource has been exhausted (e.g. check quota).",
                headers={"retry-after": "30"},
            )
        ]
    )
    with pytest.raises(openai.RateLimitError) as limited:
        gem.openai().chat.completions.create(model="gemini-fake", messages=USER)  # type: ignore[arg-type]
    assert limited.value.response.headers["retry-after"] == "30"
    assert "Resource has been exhausted" in limited.value.message
    assert "RESOURCE_EXHAUSTED" in limited.value.message

    # A request Gemini refuses: a 400 for the client, not retried
    fake(gem).script(Fail(400, "Invalid value at 'generation_config.temperature'"))
    with pytest.raises(anthropic.BadRequestError) as refused:
        gem.anthropic().messages.create(model="gemini-fake", max_tokens=5, messages=USER)  # type: ignore[arg-type]
    assert refused.value.status_code == 400
    assert "generation_config.temperature" in refused.value.message
    assert "INVALID_ARGUMENT" in refused.value.message

    # Server errors are retried, then a 502 upstream_error
    fake(gem).script(
        Fail(503, "The model is overloaded."), Fail(500, "Internal error"), Fail(503, "down")
    )
    before = len(fake(gem).requests)
    with pytest.raises(openai.APIStatusError) as failed:
        gem.openai().chat.completions.create(model="gemini-fake", messages=USER)  # type: ignore[arg-type]
    assert failed.value.status_code == 502
    assert len(fake(gem).requests) - before == 3
    assert failed.value.body["code"] == "upstream_error"  # type: ignore[index]

    # A key Gemini does not know, or none: the gateway's fault, never retried
    for key in ("wrong-key", ""):
        provider = Provider.objects.get(name="fake-gemini")
        provider.api_key = key
        provider.save()
        before = len(fake(gem).requests)
        with pytest.raises(openai.APIStatusError) as unknown:
            gem.openai().chat.completions.create(model="gemini-fake", messages=USER)  # type: ignore[arg-type]
        assert len(fake(gem).requests) - before == 1
        assert ("API key not valid" if key else "unregistered callers") in unknown.value.message
        assert unknown.value.status_code == 502  # not the client's 400
        assert unknown.value.body["code"] == "upstream_error"  # type: ignore[index]

    records = gem.wait_records(5)
    assert [r.status for r in records] == ["error"] * 5
    assert [r.http_status for r in records] == [429, 400, 502, 502, 502]


def test_a_stream_cut_or_garbled_mid_way_ends_with_an_error(gem: Gateway) -> None:
    fake(gem).script(DropMidStream(after_chunks=2, text="one two three four"))
    stream = gem.openai().chat.completions.create(
        model="gemini-fake",
        messages=USER,  # type: ignore[arg-type]
        stream=True,
    )
    received: list[str] = []

    def read() -> None:
        for chunk in stream:
            received.append((chunk.choices[0].delta.content or "") if chunk.choices else "")

    with pytest.raises(openai.APIError):
        read()
    assert "".join(received) == "one two"

    fake(gem).script(Malformed())
    with (
        pytest.raises(anthropic.APIError),
        gem.anthropic().messages.stream(
            model="gemini-fake",
            max_tokens=20,
            messages=USER,  # type: ignore[arg-type]
        ) as events,
    ):
        list(events)
    records = gem.wait_records(2)
    assert [r.status for r in records] == ["error", "error"]


def test_an_error_inside_the_stream_is_reported(gem: Gateway) -> None:
    fake(gem).script(
        GeminiReply(
            text="partial answer",
            stream_error={"code": 500, "message": "boom", "status": "INTERNAL"},
        )
    )
    stream = gem.openai().chat.completions.create(
        model="gemini-fake",
        messages=USER,  # type: ignore[arg-type]
        stream=True,
    )
    with pytest.raises(openai.APIError) as caught:
        list(stream)
    assert "INTERNAL: boom" in str(caught.value)


def test_a_non_stream_answer_that_is_not_json_is_a_502(gem: Gateway) -> None:
    fake(gem).script(Malformed(), Malformed(), Malformed())
    with pytest.raises(openai.APIStatusError) as caught:
        gem.openai().chat.completions.create(model="gemini-fake", messages=USER)  # type: ignore[arg-type]
    assert caught.value.status_code == 502


# --- the catalog: provider rows, model lists ---


def test_a_gemini_base_url_stops_before_the_api_version(gem: Gateway) -> None:
    provider = Provider(
        name="g2", type="gemini", base_url="https://generativelanguage.googleapis.com/v1beta"
    )
    for language, words in (("en", "stop before /v1beta"), ("zh-hans", "不含 /v1beta")):
        with translation.override(language), pytest.raises(ValidationError) as caught:
            provider.full_clean()
        assert words in caught.value.message_dict["base_url"][0]
    provider.base_url = "https://generativelanguage.googleapis.com/"
    provider.full_clean()
    assert provider.base_url == gemini.DEFAULT_BASE_URL


def test_the_model_list_is_read_page_by_page(gem: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gemini, "MODELS_PAGE", 1)
    provider = Provider.objects.get(name="fake-gemini")
    models = asyncio.run(alist_models(provider=provider))
    # chat models only: the embedding model cannot generateContent
    assert models == [name for name, methods in GEMINI_MODELS if "generateContent" in methods]
    listed = [r for r in fake(gem).requests if r.method == "GET"]
    assert [r.query.get("pageToken") for r in listed] == [None, "1", "2", "3"]
    assert all(r.headers["x-goog-api-key"] == GEMINI_KEY for r in listed)


# --- the browser chat ---


@pytest.mark.django_db(transaction=True)
def test_the_browser_chat_streams_a_gemini_reply(gem: Gateway, settings: Any) -> None:
    from chatapp.chat.consumers import ChatConsumer

    settings.SWITCHBOARD_CHAT_TITLES = False
    default = CatalogModel.objects.get(name="gemini-fake")
    default.is_chat_default = True
    default.save()
    fake(gem).script(Reply(text="Hello from Gemini, Bob.", input_tokens=8, output_tokens=5))
    bob = make_user("bob@example.com")

    async def chat() -> list[dict[str, Any]]:
        communicator = WebsocketCommunicator(ChatConsumer.as_asgi(), "/ws/chat/")
        communicator.scope["user"] = bob
        connected, _ = await communicator.connect()
        assert connected
        await communicator.send_json_to(
            {
                "action": "send",
                "conversation": None,
                "text": "Hi!",
                "attachments": [],
                "client_id": "c1",
            }
        )
        events: list[dict[str, Any]] = []
        while not events or events[-1]["type"] != "done":
            events.append(await communicator.receive_json_from(timeout=10))
        await communicator.disconnect()
        return events

    events = asyncio.run(chat())
    deltas = "".join(event["text"] for event in events if event["type"] == "delta")
    assert deltas == "Hello from Gemini, Bob."
    assert events[-1]["status"] == "complete"
    assert text_of(last(gem)) == [("user", "Hi!")]
    conversation = Conversation.objects.get(owner=bob)
    reply = conversation.messages.get(role="assistant")
    assert (reply.content, reply.input_tokens, reply.output_tokens) == (
        "Hello from Gemini, Bob.",
        8,
        5,
    )
    ledger.flush(10)
    record = UsageRecord.objects.get(request_id=reply.request_id)
    assert (record.provider, record.dialect) == ("fake-gemini", "browser")


# --- checked against the google-genai SDK, where it is installed ---

# (find_spec of "google.genai" raises when no "google" package is installed at all)
genai_installed = (
    importlib.util.find_spec("google") is not None
    and importlib.util.find_spec("google.genai") is not None
)
needs_genai = pytest.mark.skipif(not genai_installed, reason="google-genai is not installed")


def genai_client(server: FakeGemini, key: str = GEMINI_KEY) -> Any:
    from google import genai

    return genai.Client(
        api_key=key,
        http_options={
            "base_url": server.url,
            "api_version": "v1beta",
            "retry_options": {"attempts": 1},
        },
    )


@needs_genai
def test_the_fake_answers_the_google_genai_sdk(fake_gemini: FakeGemini) -> None:  # noqa: F811
    from google.genai import errors, types

    fake_gemini.api_key = GEMINI_KEY
    fake_gemini.script(
        GeminiReply(
            text="Hello there.", thoughts="hmm", input_tokens=4, cached_tokens=2, output_tokens=2
        ),
        Reply(text="one two", tool_calls=[{"name": "get_weather", "arguments": {"city": "Oslo"}}]),
    )
    client = genai_client(fake_gemini)
    response = client.models.generate_content(model="gemini-2.5-flash", contents="Hi")
    assert response.text == "Hello there."
    assert response.usage_metadata is not None
    assert response.usage_metadata.cached_content_token_count == 2
    assert response.candidates[0].finish_reason == types.FinishReason.STOP  # type: ignore[index]

    chunks = list(client.models.generate_content_stream(model="gemini-2.5-flash", contents="Hi"))
    assert "".join(chunk.text or "" for chunk in chunks) == "one two"
    [call] = chunks[-1].function_calls or []
    assert (call.name, call.args) == ("get_weather", {"city": "Oslo"})
    assert chunks[-1].candidates[0].content.parts[-1].thought_signature  # type: ignore[index, union-attr]

    refusing = genai_client(fake_gemini, key="nope")
    with pytest.raises(errors.ClientError) as refused:
        refusing.models.generate_content(model="gemini-2.5-flash", contents="Hi")
    assert (refused.value.code, refused.value.status) == (400, "INVALID_ARGUMENT")
    listed = list(client.models.list(config={"page_size": 2}))
    assert [model.name for model in listed] == [f"models/{name}" for name, _m in GEMINI_MODELS]


def camel_keys(value: Any) -> Any:
    """``value`` with every object key in camelCase, as proto JSON names fields."""
    if isinstance(value, dict):
        return {
            re.sub(r"_([a-z])", lambda match: match.group(1).upper(), key): camel_keys(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [camel_keys(item) for item in value]
    return value


@needs_genai
def test_our_request_bodies_are_what_the_google_genai_sdk_sends(gem: Gateway) -> None:
    from google.genai import types

    # Given: the same conversation, once through the gateway and once from Google's SDK
    conversation = [
        *USER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "And this?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL}"}},
            ],
        },
    ]
    gem.openai().chat.completions.create(
        model="gemini-fake",
        messages=[{"role": "system", "content": "Be brief."}, *conversation],  # type: ignore[list-item]
        tools=[OPENAI_TOOL],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=64,
        temperature=0.5,
        top_p=0.8,
        stop=["END"],
        seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER}},
    )
    ours = body(gem)

    client = genai_client(fake(gem))  # kept: a client closes its connections when collected
    client.models.generate_content(
        model="gemini-2.5-flash",
        contents=[
            types.Content(role="user", parts=[types.Part(text="Say hello")]),
            types.Content(
                role="model",
                parts=[
                    types.Part(
                        function_call=types.FunctionCall(
                            id="call_1", name="get_weather", args={"city": "Oslo"}
                        ),
                        thought_signature=b"skip_thought_signature_validator",
                    )
                ],
            ),
            types.Content(
                role="user",
                parts=[
                    types.Part(
                        function_response=types.FunctionResponse(
                            id="call_1", name="get_weather", response={"output": "-3 C"}
                        )
                    ),
                    types.Part(text="And this?"),
                    types.Part(
                        inline_data=types.Blob(mime_type="image/png", data=base64.b64decode(PIXEL))
                    ),
                ],
            ),
        ],
        config=types.GenerateContentConfig(
            system_instruction=types.Content(parts=[types.Part(text="Be brief.")]),
            tools=[
                types.Tool(
                    function_declarations=[
                        types.FunctionDeclaration(
                            name="get_weather",
                            description="Weather for a city",
                            parameters_json_schema=WEATHER,
                        )
                    ]
                )
            ],
            tool_config=types.ToolConfig(
                function_calling_config=types.FunctionCallingConfig(
                    mode=types.FunctionCallingConfigMode.ANY, allowed_function_names=["get_weather"]
                )
            ),
            max_output_tokens=64,
            temperature=0.5,
            top_p=0.8,
            stop_sequences=["END"],
            seed=3,
            response_mime_type="application/json",
            response_json_schema=WEATHER,
        ),
    )
    sdk = body(gem)
    # Then: the bodies agree, but for the thought signature: the SDK base64-codes the bytes it
    # is given, while Google documents the skip value as the JSON string itself
    sdk_call = sdk["contents"][1]["parts"][0]
    assert base64.b64decode(sdk_call.pop("thoughtSignature")) == b"skip_thought_signature_validator"
    assert ours["contents"][1]["parts"][0].pop("thoughtSignature") == gemini.SKIP_SIGNATURE
    # (the SDK leaves some nested names in snake_case, which the API reads as well)
    assert ours == camel_keys(sdk)
    # and every piece of ours is valid for the SDK's own types (which forbid unknown fields)
    for content in ours["contents"]:
        types.Content.model_validate_json(json.dumps(content))
    types.Content.model_validate_json(json.dumps(ours["systemInstruction"]))
    types.Tool.model_validate_json(json.dumps(ours["tools"][0]))
    types.ToolConfig.model_validate_json(json.dumps(ours["toolConfig"]))
    types.GenerationConfig.model_validate_json(json.dumps(ours["generationConfig"]))


def test_raw_http_shows_no_gemini_field_names_to_an_openai_client(gem: Gateway) -> None:
    fake(gem).script(GeminiReply(text="plain", thoughts="secret thinking"))
    response = httpx.post(
        gem.base_url + "/chat/completions",
        headers={"authorization": f"Bearer {gem.key}"},
        json={"model": "gemini-fake", "messages": USER},
    )
    assert response.status_code == 200
    assert "candidates" not in response.text
    assert "thought" not in response.text
    assert response.json()["object"] == "chat.completion"
    # The thought summary is the reasoning, apart from the answer, as DeepSeek sends it.
    message = response.json()["choices"][0]["message"]
    assert (message["content"], message["reasoning_content"]) == ("plain", "secret thinking")


def test_route_failover_from_a_failing_gemini_route_to_an_openai_route(gem: Gateway) -> None:
    routing.reset()
    model = CatalogModel.objects.get(name="gemini-fake")
    Route.objects.create(
        model=model, provider=gem.openai_provider, upstream_model="gpt-backup", priority=1
    )
    fake(gem).script(Fail(503, "overloaded"), Fail(503, "overloaded"), Fail(503, "overloaded"))
    gem.fake.script(Reply(text="from the backup"))
    completion = gem.openai().chat.completions.create(model="gemini-fake", messages=USER)  # type: ignore[arg-type]
    assert completion.choices[0].message.content == "from the backup"
