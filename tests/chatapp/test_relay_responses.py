"""POST /v1/responses through the official openai SDK, against both upstream types.

``client.responses.create`` and ``client.responses.stream`` talk to the live gateway;
the fake upstream behind it speaks Chat Completions (``gpt-fake``) or Messages
(``claude-fake``).

The golden cases (``golden/responses/*.json``, the same keys as the cases of
``test_golden_translation``) pin the exact upstream bodies, response objects and
event sequences, run in-process through the functions the view and the pipeline
use: the dialect's parser, the upstream type's ``build_chat``, its
``parse_completion`` or stream decoder, and the views' ``render_stream``.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate

from chatapp.relay import pipeline
from chatapp.relay.dialects import responses as responses_dialect
from chatapp.relay.errors import RelayError
from chatapp.relay.openapi import document
from chatapp.relay.upstreams import Target
from chatapp.relay.views import render_stream
from keys import ledger
from keys.models import ApiKey
from tests.chatapp.test_fuzz import _check as _check_no_500
from tests.chatapp.test_fuzz import _post as _post_raw
from tests.chatapp.test_fuzz import hostile_text, json_values
from tests.chatapp.test_golden_translation import (
    CASE_KEYS,
    UPSTREAM_MODEL,
    UPSTREAM_URLS,
    _sse_events,
    _Stream,
    _wire,
    target_for,
)
from tests.chatapp.test_openapi import FUZZ, MODELS, _auth, _check, from_schema, spec  # noqa: F401
from tests.conftest import early_in_a_minute
from tests.fake_upstream import DropMidStream, Fail, Reply
from tests.gateway import Gateway
from tests.sse import parse_sse

GOLDEN = Path(__file__).parent / "golden" / "responses"

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
TEXT_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
]
TEXT_END = [
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]


def _post(gateway: Gateway, body: dict[str, Any], key: str | None = None) -> httpx.Response:
    return httpx.post(
        gateway.base_url + "/responses",
        headers={"authorization": f"Bearer {key or gateway.key}"},
        json=body,
        timeout=30,
    )


def test_a_response_is_relayed_to_an_openai_upstream_and_recorded(gateway: Gateway) -> None:
    gateway.fake.script(Reply(text="Hello there, friend.", input_tokens=11, output_tokens=4))

    raw = gateway.openai().responses.with_raw_response.create(
        model="gpt-fake",
        instructions="Answer briefly.",
        input="Say hello",
        temperature=0.3,
        top_p=0.9,
        max_output_tokens=50,
        user="u-42",
    )
    response = raw.parse()

    assert response.output_text == "Hello there, friend."
    assert response.status == "completed"
    assert response.id.startswith("resp_")
    assert response.model == "gpt-fake"
    assert (response.instructions, response.max_output_tokens) == ("Answer briefly.", 50)
    [message] = response.output
    assert (message.type, message.role, message.status) == ("message", "assistant", "completed")  # type: ignore[union-attr]
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (11, 4)
    assert response.usage.total_tokens == 15
    assert response.usage.input_tokens_details.cached_tokens == 0
    assert response.usage.output_tokens_details.reasoning_tokens == 0
    # Nothing is stored, and the response says so: no follow-up by id.
    assert raw.http_response.json()["store"] is False

    # The upstream got a chat completion: instructions as the system message.
    sent = gateway.fake.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.json["model"] == "gpt-upstream"
    assert sent.json["messages"] == [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Say hello"},
    ]
    assert (sent.json["max_tokens"], sent.json["temperature"], sent.json["top_p"]) == (50, 0.3, 0.9)
    assert sent.json["user"] == "u-42"
    assert "input" not in sent.json
    assert "instructions" not in sent.json

    [record] = gateway.wait_records(1)
    assert record.request_id == raw.headers["x-request-id"]
    assert response.id == "resp_" + record.request_id.removeprefix("req_")
    assert (record.endpoint, record.dialect, record.stream, record.status) == (
        "responses",
        "responses",
        False,
        "ok",
    )
    assert (record.model, record.provider, record.input_tokens, record.output_tokens) == (
        "gpt-fake",
        "fake-openai",
        11,
        4,
    )
    assert record.estimated is False


def test_store_true_is_answered_like_store_false(gateway: Gateway) -> None:
    for store in (True, False):
        body = _post(gateway, {"model": "gpt-fake", "input": "Hi", "store": store}).json()
        assert body["status"] == "completed"
        assert body["store"] is False
    assert [record.status for record in gateway.wait_records(2)] == ["ok", "ok"]


def test_input_items_with_an_image_reach_an_anthropic_upstream(gateway: Gateway) -> None:
    gateway.fake.script(
        Reply(
            text="A cat.", input_tokens=40, output_tokens=3, cached_tokens=30, cache_write_tokens=5
        )
    )
    pixel = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 32).decode()

    response = gateway.openai().responses.create(
        model="claude-fake",
        input=[
            {"role": "developer", "content": "You describe pictures."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi! Send a picture."},
            {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is in these?"},
                    {
                        "type": "input_image",
                        "image_url": "https://example.com/cat.png",
                        "detail": "low",
                    },
                    {"type": "input_image", "image_url": f"data:image/png;base64,{pixel}"},
                ],
            },
        ],
    )

    assert response.output_text == "A cat."
    sent = gateway.fake.requests[-1]
    assert sent.path == "/v1/messages"
    assert sent.json["system"] == "You describe pictures."
    assert [message["role"] for message in sent.json["messages"]] == ["user", "assistant", "user"]
    assert sent.json["messages"][2]["content"] == [
        {"type": "text", "text": "What is in these?"},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": pixel}},
    ]
    # Anthropic counts cache reads and writes apart; the Responses usage counts them in.
    assert response.usage is not None
    assert response.usage.input_tokens == 75
    assert response.usage.input_tokens_details.cached_tokens == 30
    [record] = gateway.wait_records(1)
    assert (record.provider, record.input_tokens, record.cached_tokens) == (
        "fake-anthropic",
        75,
        30,
    )


def test_a_stream_is_the_real_typed_event_sequence(gateway: Gateway) -> None:
    gateway.fake.script(Reply(text="one two three", input_tokens=9, output_tokens=3))

    events = list(gateway.openai().responses.create(model="gpt-fake", input="Count", stream=True))

    types = [event.type for event in events]
    assert types == [
        *TEXT_EVENTS,
        *["response.output_text.delta"] * 3,
        *TEXT_END,
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert deltas == ["one", " two", " three"]
    created, completed = events[0], events[-1]
    assert created.response.status == "in_progress"  # type: ignore[union-attr]
    assert created.response.id == completed.response.id  # type: ignore[union-attr]
    assert completed.response.output_text == "one two three"  # type: ignore[union-attr]
    usage = completed.response.usage  # type: ignore[union-attr]
    assert (usage.input_tokens, usage.output_tokens) == (9, 3)

    [record] = gateway.wait_records(1)
    assert (record.endpoint, record.stream, record.input_tokens, record.output_tokens) == (
        "responses",
        True,
        9,
        3,
    )


def test_the_raw_stream_names_every_event_and_sends_no_done_marker(gateway: Gateway) -> None:
    with httpx.stream(
        "POST",
        gateway.base_url + "/responses",
        headers={"authorization": f"Bearer {gateway.key}"},
        json={"model": "claude-fake", "input": "Hi", "stream": True},
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        body = response.read()
    events = parse_sse(body, strict=True)
    assert all(name == data["type"] for name, data in events)
    assert events[-1][0] == "response.completed"
    assert "[DONE]" not in body.decode()


def test_a_tool_call_round_trip_through_the_stream_helper_and_an_anthropic_upstream(
    gateway: Gateway,
) -> None:
    gateway.fake.script(
        Reply(
            text="Let me look.",
            tool_calls=[{"id": "toolu_1", "name": "get_weather", "arguments": {"city": "Paris"}}],
        ),
        Reply(text="It is 18°C in Paris."),
    )
    client = gateway.openai()
    question = [{"role": "user", "content": "Weather in Paris?"}]

    # Given a streamed answer that calls the tool
    with client.responses.stream(
        model="claude-fake", input=question, tools=[WEATHER], tool_choice="auto"
    ) as stream:
        events = list(stream)
        first = stream.get_final_response()
    types = [event.type for event in events]
    assert "response.function_call_arguments.delta" in types
    assert types.index("response.output_text.done") < types.index("response.output_item.added", 3)
    arguments = "".join(
        event.delta for event in events if event.type == "response.function_call_arguments.delta"
    )
    assert json.loads(arguments) == {"city": "Paris"}
    [done] = [event for event in events if event.type == "response.function_call_arguments.done"]
    assert json.loads(done.arguments) == {"city": "Paris"}
    message, call = first.output
    assert message.type == "message"
    assert first.output_text == "Let me look."
    assert call.type == "function_call"
    assert (call.call_id, call.name, call.status) == ("toolu_1", "get_weather", "completed")
    assert json.loads(call.arguments) == {"city": "Paris"}
    # The tool was named to the upstream as an Anthropic tool.
    sent = gateway.fake.requests[-1].json
    assert sent["tools"][0]["name"] == "get_weather"
    assert sent["tool_choice"] == {"type": "auto"}

    # When the client sends the output back with the tool's result, as SDK users do
    follow_up = client.responses.create(
        model="claude-fake",
        input=[
            *question,
            *first.output,  # type: ignore[list-item]
            {"type": "function_call_output", "call_id": call.call_id, "output": "18°C"},
        ],
        tools=[WEATHER],  # type: ignore[list-item]
    )

    # Then the upstream gets one assistant turn (text and tool_use) and the tool_result
    assert follow_up.output_text == "It is 18°C in Paris."
    messages = gateway.fake.requests[-1].json["messages"]
    assert messages[1] == {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Let me look."},
            {
                "type": "tool_use",
                "id": "toolu_1",
                "name": "get_weather",
                "input": {"city": "Paris"},
            },
        ],
    }
    assert messages[2] == {
        "role": "user",
        "content": [
            {
                "type": "tool_result",
                "tool_use_id": "toolu_1",
                "content": [{"type": "text", "text": "18°C"}],
            }
        ],
    }
    records = gateway.wait_records(2)
    assert [(record.endpoint, record.stream) for record in records] == [
        ("responses", True),
        ("responses", False),
    ]


def test_a_tool_call_round_trip_with_an_openai_upstream(gateway: Gateway) -> None:
    gateway.fake.script(
        Reply(
            text="",
            tool_calls=[{"id": "call_1", "name": "get_weather", "arguments": {"city": "Rome"}}],
        ),
        Reply(text="Sunny in Rome."),
    )
    client = gateway.openai()
    first = client.responses.create(
        model="gpt-fake",
        input="Weather in Rome?",
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "name": "get_weather"},
        parallel_tool_calls=False,
    )
    [call] = first.output
    assert call.type == "function_call"
    assert (call.call_id, call.name) == ("call_1", "get_weather")
    assert json.loads(call.arguments) == {"city": "Rome"}
    sent = gateway.fake.requests[-1].json
    assert sent["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": WEATHER["parameters"],
            },
        }
    ]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert sent["parallel_tool_calls"] is False

    client.responses.create(
        model="gpt-fake",
        input=[
            {"role": "user", "content": "Weather in Rome?"},
            {
                "type": "function_call",
                "call_id": "call_1",
                "name": "get_weather",
                "arguments": '{"city":"Rome"}',
            },
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        ],
        tools=[WEATHER],  # type: ignore[list-item]
    )
    assert gateway.fake.requests[-1].json["messages"][1:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]


def test_a_function_call_output_may_carry_text_and_images(gateway: Gateway) -> None:
    _post(
        gateway,
        {
            "model": "claude-fake",
            "input": [
                {"role": "user", "content": "Take a screenshot"},
                {"type": "function_call", "call_id": "call_9", "name": "shot", "arguments": "{}"},
                {
                    "type": "function_call_output",
                    "call_id": "call_9",
                    "output": [
                        {"type": "input_text", "text": "Here it is"},
                        {"type": "input_image", "image_url": "https://example.com/shot.png"},
                    ],
                },
            ],
        },
    ).raise_for_status()
    assert gateway.fake.requests[-1].json["messages"][2]["content"] == [
        {
            "type": "tool_result",
            "tool_use_id": "call_9",
            "content": [
                {"type": "text", "text": "Here it is"},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/shot.png"}},
            ],
        }
    ]


def test_a_reply_cut_by_max_output_tokens_is_incomplete(gateway: Gateway) -> None:
    gateway.fake.script(Reply(text="a b c", finish="length"), Reply(text="a b c", finish="length"))
    response = gateway.openai().responses.create(
        model="claude-fake", input="Go on", max_output_tokens=3
    )
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete"  # type: ignore[union-attr]

    events = list(
        gateway.openai().responses.create(
            model="gpt-fake", input="Go on", max_output_tokens=3, stream=True
        )
    )
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [
        ("previous_response_id", "resp_123", "previous_response_id"),
        ("conversation", "conv_123", "conversation"),
        ("background", True, "background"),
        ("tools", [{"type": "web_search"}], "tools[0].type"),
        (
            "input",
            [{"role": "user", "content": [{"type": "input_file", "file_id": "file_1"}]}],
            "input[0].content[0].type",
        ),
        ("input", [{"type": "item_reference", "id": "msg_1"}], "input[0].type"),
        ("input", [], "input"),
        ("input", None, "input"),
    ],
)
def test_what_needs_stored_state_or_cannot_be_translated_is_refused_naming_it(
    gateway: Gateway, field: str, value: Any, param: str
) -> None:
    body = {"model": "gpt-fake", "input": "Hi", field: value}
    with pytest.raises(openai.BadRequestError) as refused:
        gateway.openai().responses.create(**body)
    error = refused.value.body
    assert isinstance(error, dict)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith(f"{param}:")
    assert gateway.fake.requests == []  # nothing reached the upstream
    [record] = gateway.records()
    assert (record.endpoint, record.status, record.http_status) == ("responses", "error", 400)


def test_previous_response_id_says_why_it_is_refused(gateway: Gateway) -> None:
    response = _post(
        gateway, {"model": "gpt-fake", "input": "Hi", "previous_response_id": "resp_1"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_value"
    assert "keeps no responses" in error["message"]
    assert "send the whole conversation in input" in error["message"]


def test_reasoning_items_a_client_replays_are_dropped(gateway: Gateway) -> None:
    _post(
        gateway,
        {
            "model": "gpt-fake",
            "safety_identifier": "sid-1",
            "input": [
                {"role": "user", "content": "Hi"},
                {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "xyz"},
                {"role": "assistant", "content": [{"type": "output_text", "text": "Hello"}]},
                {"role": "user", "content": "Again"},
            ],
        },
    ).raise_for_status()
    assert gateway.fake.requests[-1].json["messages"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Again"},
    ]
    assert gateway.fake.requests[-1].json["user"] == "sid-1"


def test_an_empty_streamed_answer_is_still_one_empty_message(gateway: Gateway) -> None:
    gateway.fake.script(Reply(text=""))
    with gateway.openai().responses.stream(model="gpt-fake", input="Say nothing") as stream:
        types = [event.type for event in stream]
        final = stream.get_final_response()
    assert types == [*TEXT_EVENTS, *TEXT_END, "response.completed"]
    [message] = final.output
    assert message.type == "message"
    assert final.output_text == ""


def test_structured_output_asks_the_upstream_for_a_json_schema(gateway: Gateway) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    _post(
        gateway,
        {
            "model": "gpt-fake",
            "input": "A number",
            "text": {
                "format": {"type": "json_schema", "name": "num", "schema": schema, "strict": True}
            },
        },
    ).raise_for_status()
    assert gateway.fake.requests[-1].json["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "num", "schema": schema, "strict": True},
    }


def test_the_keys_model_list_and_limits_apply(gateway: Gateway) -> None:
    _key, limited = ApiKey.issue(user=gateway.user, allowed_models=["claude-fake"])
    with pytest.raises(openai.PermissionDeniedError, match="may not use the model 'gpt-fake'"):
        gateway.openai(limited).responses.create(model="gpt-fake", input="Hi")

    _key, one_a_minute = ApiKey.issue(user=gateway.user, rpm=1)
    client = gateway.openai(one_a_minute)
    early_in_a_minute(10)  # both requests in one fixed minute
    first = client.responses.with_raw_response.create(model="gpt-fake", input="Hi")
    assert first.headers["x-ratelimit-limit-requests"] == "1"
    assert first.headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(openai.RateLimitError) as limited_error:
        client.responses.create(model="gpt-fake", input="Hi", stream=True)
    assert limited_error.value.response.headers["retry-after"]
    with pytest.raises(openai.AuthenticationError):
        gateway.openai("sk-not-a-key").responses.create(model="gpt-fake", input="Hi")


def test_an_upstream_failure_before_the_answer_is_an_error_status(gateway: Gateway) -> None:
    gateway.fake.script(Fail(400, "bad things"))
    with pytest.raises(openai.BadRequestError, match="bad things"):
        gateway.openai().responses.create(model="claude-fake", input="Hi", stream=True)
    [record] = gateway.wait_records(1)
    assert (record.endpoint, record.status, record.http_status) == ("responses", "error", 400)


def test_an_upstream_failure_mid_stream_ends_with_response_failed(gateway: Gateway) -> None:
    gateway.fake.script(DropMidStream(after_chunks=2, text="one two three four"))
    events = list(gateway.openai().responses.create(model="gpt-fake", input="Hi", stream=True))
    types = [event.type for event in events]
    assert types[: len(TEXT_EVENTS)] == TEXT_EVENTS
    assert types[-1] == "response.failed"
    failed = events[-1].response  # type: ignore[union-attr]
    assert failed.status == "failed"
    assert failed.error is not None
    assert failed.error.code == "server_error"
    assert "mid-stream" in failed.error.message
    assert failed.output[0].content[0].text == "one two"  # type: ignore[union-attr]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    [record] = gateway.wait_records(1)
    assert (record.endpoint, record.status, record.stream) == ("responses", "error", True)
    assert record.output_tokens > 0  # what was produced is billed


def test_other_methods_and_stored_response_paths_are_refused(gateway: Gateway) -> None:
    headers = {"authorization": f"Bearer {gateway.key}"}
    response = httpx.get(gateway.base_url + "/responses", headers=headers)
    assert response.status_code == 405
    response = httpx.get(gateway.base_url + "/responses/resp_1", headers=headers)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "unknown_url"


# --- Golden cases ---


def relay_case(case: dict[str, Any]) -> dict[str, Any]:
    """What one case produces: the upstream's URL and body and the client's answer, or the error."""
    target = target_for(case["upstream_type"])
    body = copy.deepcopy(case["client_request"])
    call = pipeline.Call(
        principal=None,
        endpoint="responses",
        dialect="responses",
        model=str(body.get("model") or ""),
        request_id="req_golden",
    )
    try:
        call.request = responses_dialect.parse_responses_request(body)
        http_call = target.upstream.build_chat(target, call.request)
    except RelayError as error:
        return {
            "error": {
                "status": error.status,
                "param": error.param,
                "type": error.type,
                "code": error.code,
                "message": error.message,
            }
        }
    dialect = responses_dialect.DIALECT.bind(call.request, call.request_id)
    outcome: dict[str, Any] = {"url": http_call.url, "upstream_request": _wire(http_call.body)}
    if call.request.stream:
        outcome["client_stream"] = asyncio.run(_stream_case(case, call, target, dialect))
    else:
        upstream_body = copy.deepcopy(case["upstream_response"])
        completion = target.upstream.parse_completion(upstream_body)
        outcome["client_response"] = _wire(
            dialect.render_reply(upstream_body, completion, model=call.model, passthrough=False)
        )
    return outcome


async def _stream_case(
    case: dict[str, Any],
    call: pipeline.Call,
    target: Target,
    dialect: responses_dialect.ResponsesDialect,
) -> list[Any]:
    decoder = target.upstream.stream_decoder(target)
    items = []
    for name, data in _sse_events(case):
        item = decoder.feed(name, data)
        if item is not None:
            items.append(item)
        if decoder.finished:
            break
    assert decoder.finished, "the golden upstream stream must end ([DONE] or message_stop)"
    stream: Any = _Stream(call, target, items)
    data = b"".join([piece async for piece in render_stream(call, dialect, stream)])
    events = parse_sse(data, strict=True)
    assert all(name == payload["type"] for name, payload in events), "events named by type"
    return [[name, payload] for name, payload in events]


def normalize(value: Any) -> Any:
    """Times masked (ids are fixed by the case's request id)."""
    if isinstance(value, list):
        return [normalize(item) for item in value]
    if not isinstance(value, dict):
        return value
    out = {key: normalize(item) for key, item in value.items()}
    for key in ("created_at", "completed_at"):
        if isinstance(out.get(key), int):
            out[key] = "<time>"
    return out


def _cases() -> list[Any]:
    return [pytest.param(path, id=path.name) for path in sorted(GOLDEN.glob("*.json"))]


@pytest.mark.parametrize("path", _cases())
def test_golden_case(path: Path) -> None:
    case = json.loads(path.read_text())
    assert set(case) <= CASE_KEYS, f"unknown keys {set(case) - CASE_KEYS}"
    assert case["client_dialect"] == "responses"
    assert path.name.startswith(f"responses_to_{case['upstream_type']}__")
    outcome = relay_case(case)
    if "expected_error" in case:
        assert "error" in outcome, "expected the request to be refused"
        expected = case["expected_error"]
        assert {key: outcome["error"][key] for key in expected} == expected
        return
    assert "error" not in outcome, outcome.get("error")
    assert outcome["url"] == UPSTREAM_URLS[case["upstream_type"]]
    assert case["expected_upstream_request"]["model"] == UPSTREAM_MODEL
    assert outcome["upstream_request"] == case["expected_upstream_request"]
    if case["client_request"].get("stream"):
        stream = outcome["client_stream"]
        assert normalize(stream) == normalize(case["expected_client_stream"])
        numbers = [payload["sequence_number"] for _name, payload in stream]
        assert numbers == list(range(len(stream)))
    else:
        assert normalize(outcome["client_response"]) == normalize(case["expected_client_response"])


def test_the_golden_cases_cover_both_upstream_types_streamed_and_not() -> None:
    covered = set()
    for path in GOLDEN.glob("*.json"):
        case = json.loads(path.read_text())
        if "expected_error" not in case:
            covered.add((case["upstream_type"], bool(case["client_request"].get("stream"))))
    assert covered == {
        (kind, stream) for kind in ("openai", "anthropic") for stream in (True, False)
    }


# --- The OpenAPI document ---


def test_the_openapi_document_describes_the_endpoint() -> None:
    document_ = document("https://llm.example.com")
    validate(document_)
    operation = document_["paths"]["/v1/responses"]["post"]
    assert operation["operationId"] == "createResponse"
    assert set(operation["responses"]["200"]["content"]) == {
        "application/json",
        "text/event-stream",
    }
    assert (
        "previous_response_id"
        in document_["components"]["schemas"]["ResponsesRequest"]["description"]
    )


def test_a_fuzz_of_the_endpoint_finds_no_500_and_nothing_undocumented(
    spec: dict[str, Any],  # noqa: F811 - the fixture
    gateway: Gateway,
) -> None:
    path = "/v1/responses"
    schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    conforming = st.tuples(from_schema(schema, spec), st.sampled_from(MODELS)).map(
        lambda pair: {**pair[0], "model": pair[1]}
    )
    junk = st.dictionaries(
        st.sampled_from(["model", "input", "tools", "stream", "previous_response_id", "x"]),
        st.one_of(
            st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=2)
        ),
        max_size=3,
    )
    seen: set[int] = set()
    with httpx.Client(base_url=gateway.url, timeout=60) as client:

        def fuzz(body: Any, headers: dict[str, str]) -> None:
            response = client.post(path, json=body, headers=headers)
            _check(spec, path, "post", response)
            seen.add(response.status_code)

        run = given(body=st.one_of(conforming, conforming, junk), headers=_auth(gateway))(fuzz)
        for body in (
            {"model": "gpt-fake", "input": "Hello"},
            {"model": "claude-fake", "input": [{"role": "user", "content": "Hi"}], "stream": True},
        ):
            run = example(body=body, headers={"Authorization": f"Bearer {gateway.key}"})(run)
            run = example(body=body, headers={})(run)
        FUZZ(run)()
    assert {200, 400, 401} <= seen, seen


# --- Hostile bodies ---

content_part = st.one_of(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["input_text", "output_text", "refusal"]), "text": json_values}
    ),
    st.fixed_dictionaries(
        {"type": st.just("input_image")},
        optional={
            "image_url": st.one_of(
                json_values,
                st.sampled_from(
                    ["http://169.254.169.254/x", "data:image/png;base64,!!", "https://e.com/a.png"]
                ),
            ),
            "detail": json_values,
            "file_id": json_values,
        },
    ),
    json_values,
)
input_item = st.one_of(
    st.fixed_dictionaries(
        {
            "role": st.one_of(
                st.sampled_from(["user", "assistant", "system", "developer"]), json_values
            ),
            "content": st.one_of(hostile_text, st.lists(content_part, max_size=3), json_values),
        },
        optional={"type": st.sampled_from(["message", "reasoning", "item_reference"])},
    ),
    st.fixed_dictionaries(
        {"type": st.just("function_call")},
        optional={"call_id": json_values, "name": json_values, "arguments": json_values},
    ),
    st.fixed_dictionaries(
        {"type": st.just("function_call_output")},
        optional={
            "call_id": json_values,
            "output": st.one_of(hostile_text, st.lists(content_part, max_size=2), json_values),
        },
    ),
    json_values,
)
response_bodies = st.one_of(
    st.fixed_dictionaries(
        {
            "model": st.one_of(st.sampled_from(["gpt-fake", "claude-fake"]), json_values),
            "input": st.one_of(hostile_text, st.lists(input_item, max_size=3), json_values),
        },
        optional=dict.fromkeys(
            (
                "instructions",
                "tools",
                "tool_choice",
                "parallel_tool_calls",
                "max_output_tokens",
                "temperature",
                "top_p",
                "text",
                "store",
                "metadata",
                "user",
                "previous_response_id",
                "background",
            ),
            json_values,
        )
        | {"stream": st.booleans()},
    ),
    json_values,
)


def test_no_hostile_body_gets_a_500(gateway: Gateway) -> None:
    @settings(
        max_examples=150,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        database=None,
    )
    @given(body=response_bodies)
    def run(body: Any) -> None:
        raw = json.dumps(body, ensure_ascii=True).encode()
        _check_no_500(_post_raw(gateway, "/v1/responses", raw), "/v1/responses")

    run()
    assert ledger.flush(20)
