"""The fake LLM upstream speaks both wire formats well enough for the official SDKs."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from anthropic.types import MessageParam
from openai.types.chat import ChatCompletionMessageParam

from tests.fake_upstream import (
    DropMidStream,
    Fail,
    FakeUpstream,
    Hang,
    Malformed,
    Reply,
    embedding_for,
    estimate_input_tokens,
)
from tests.fake_upstream import fake_upstream as fake_upstream  # the fixture, used at the end
from tests.sse import has_event_names, parse_sse

WEATHER_CALL = {"id": "call_1", "name": "get_weather", "arguments": {"city": "Paris"}}
PROMPT = "Say hello to the whole wide world"
USER = [{"role": "user", "content": PROMPT}]  # for raw HTTP requests
OAI_USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": PROMPT}]
CLAUDE_USER: list[MessageParam] = [{"role": "user", "content": PROMPT}]


@pytest.fixture(scope="module")
def shared_fake() -> Iterator[FakeUpstream]:
    # One server for the module keeps it fast; the ``fake_upstream`` fixture (a server per
    # test) is exercised by the last test.
    fake = FakeUpstream().start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def fake(shared_fake: FakeUpstream) -> FakeUpstream:
    shared_fake.reset()
    return shared_fake


@pytest.fixture
def oai(fake: FakeUpstream) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=fake.openai_base_url, api_key="sk-test", max_retries=0) as client:
        yield client


@pytest.fixture
def claude(fake: FakeUpstream) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(
        base_url=fake.anthropic_base_url, api_key="sk-ant-test", max_retries=0
    ) as client:
        yield client


def collect(pieces: Iterable[str], into: list[str]) -> None:
    """Append pieces as they come, so that what arrived before an error can be checked."""
    for piece in pieces:
        into.append(piece)


# -- OpenAI chat completions ----------------------------------------------------------------


def test_openai_non_stream_answer_and_usage(fake: FakeUpstream, oai: openai.OpenAI) -> None:
    fake.script(Reply(text="Hi there", input_tokens=11, output_tokens=3, cached_tokens=4))
    completion = oai.chat.completions.create(model="gpt-4o-mini", messages=OAI_USER)

    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "gpt-4o-mini"
    assert completion.system_fingerprint == "fp_fake"
    [choice] = completion.choices
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content == "Hi there"
    assert choice.message.tool_calls is None
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 11
    assert completion.usage.completion_tokens == 3
    assert completion.usage.total_tokens == 14
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 4


def test_openai_default_usage_is_estimated_and_n_gives_choices(
    fake: FakeUpstream, oai: openai.OpenAI
) -> None:
    completion = oai.chat.completions.create(model="gpt-4o", messages=OAI_USER, n=3)

    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert {c.message.content for c in completion.choices} == {"Hello from the fake upstream."}
    assert completion.usage is not None
    # len("Say hello to the whole wide world") == 33 -> 33 // 4 + 1
    assert completion.usage.prompt_tokens == estimate_input_tokens({"messages": USER}) == 9
    assert completion.usage.completion_tokens == 5 * 3  # five words in each of three choices


def test_openai_stream_with_usage(fake: FakeUpstream, oai: openai.OpenAI) -> None:
    fake.script(Reply(text="One two three four", input_tokens=7))
    stream = oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=OAI_USER,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)

    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "One two three four"
    assert [c.choices[0].delta.content for c in chunks[1:5]] == ["One", " two", " three", " four"]
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (7, 4)


def test_openai_stream_wire_format_and_chunking(fake: FakeUpstream) -> None:
    fake.script(Reply(text="a b c d", chunk_delay=0.05))
    body = {"model": "m", "messages": USER, "stream": True}
    arrivals: list[float] = []
    raw = ""
    with httpx.stream("POST", fake.openai_base_url + "/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers.get("transfer-encoding") == "chunked"
        for piece in response.iter_text():
            arrivals.append(time.monotonic())
            raw += piece

    events = parse_sse(raw, strict=True)
    assert events[-1] == ("message", "[DONE]")
    assert len(arrivals) > 3  # chunks arrive one by one, spread over time
    assert arrivals[-1] - arrivals[0] >= 0.2
    assert not has_event_names(raw)
    chunks = [chunk for _, chunk in events[:-1]]
    assert all("usage" not in c for c in chunks)  # only sent when stream_options asks for it
    assert chunks[0]["choices"][0] == {
        "index": 0,
        "delta": {"role": "assistant", "content": "", "refusal": None},
        "logprobs": None,
        "finish_reason": None,
    }
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_openai_tool_calls(fake: FakeUpstream, oai: openai.OpenAI) -> None:
    fake.script(Reply(text="", tool_calls=[WEATHER_CALL]))
    completion = oai.chat.completions.create(model="gpt-4o-mini", messages=OAI_USER)

    [choice] = completion.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None
    [call] = choice.message.tool_calls
    assert call.id == "call_1"
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_openai_streamed_tool_calls(fake: FakeUpstream, oai: openai.OpenAI) -> None:
    second = {"id": "call_2", "name": "get_time", "arguments": {"zone": "Europe/Paris"}}
    fake.script(Reply(text="Let me look.", tool_calls=[WEATHER_CALL, second]))
    with oai.chat.completions.stream(
        model="gpt-4o-mini",
        messages=OAI_USER,
        stream_options={"include_usage": True},
    ) as stream:
        chunks = [event.chunk for event in stream if event.type == "chunk"]
        final = stream.get_final_completion()

    headers, pieces = [], []
    for chunk in chunks:
        if not (chunk.choices and chunk.choices[0].delta.tool_calls):
            continue
        [delta] = chunk.choices[0].delta.tool_calls
        assert delta.function is not None
        if delta.id:  # the first chunk of a call names it, with empty arguments
            headers.append((delta.index, delta.id, delta.function.name, delta.function.arguments))
        else:
            assert delta.function.name is None
            pieces.append(delta.function.arguments or "")
    assert headers == [(0, "call_1", "get_weather", ""), (1, "call_2", "get_time", "")]
    assert len(pieces) > 4  # arguments come in several pieces

    message = final.choices[0].message
    assert message.content == "Let me look."
    assert final.choices[0].finish_reason == "tool_calls"
    assert message.tool_calls is not None
    calls = [call for call in message.tool_calls if call.type == "function"]
    assert [(c.id, c.function.name) for c in calls] == [
        ("call_1", "get_weather"),
        ("call_2", "get_time"),
    ]
    arguments = [json.loads(c.function.arguments) for c in calls]
    assert arguments == [{"city": "Paris"}, {"zone": "Europe/Paris"}]
    assert final.usage is not None
    assert final.usage.completion_tokens == 3 + len(pieces)  # words + argument pieces


@pytest.mark.parametrize(
    ("finish", "expected"),
    [("length", "length"), ("content_filter", "content_filter"), ("stop_sequence", "stop")],
)
def test_openai_finish_reasons(
    fake: FakeUpstream, oai: openai.OpenAI, finish: str, expected: str
) -> None:
    fake.script(Reply(finish=finish))
    completion = oai.chat.completions.create(model="m", messages=OAI_USER)
    assert completion.choices[0].finish_reason == expected


def test_openai_reply_without_usage(fake: FakeUpstream, oai: openai.OpenAI) -> None:
    fake.script(Reply(include_usage=False), Reply(include_usage=False))
    completion = oai.chat.completions.create(model="m", messages=OAI_USER)
    assert completion.usage is None

    stream = oai.chat.completions.create(
        model="m",
        messages=OAI_USER,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.usage is None and c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == Reply().text


# -- Anthropic messages ---------------------------------------------------------------------


def test_anthropic_non_stream(fake: FakeUpstream, claude: anthropic.Anthropic) -> None:
    fake.script(Reply(text="Bonjour", tool_calls=[WEATHER_CALL], cached_tokens=5))
    message = claude.messages.create(
        model="claude-sonnet-4-6",
        max_tokens=100,
        system="Be brief.",
        messages=CLAUDE_USER,
    )

    assert message.id.startswith("msg_")
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.model == "claude-sonnet-4-6"
    text, tool = message.content
    assert text.type == "text"
    assert text.text == "Bonjour"
    assert tool.type == "tool_use"
    assert (tool.id, tool.name, tool.input) == ("call_1", "get_weather", {"city": "Paris"})
    assert message.stop_reason == "tool_use"
    assert message.stop_sequence is None
    # (len("Be brief.") + 33) // 4 + 1; one word plus the fragments of '{"city":"Paris"}'
    assert message.usage.input_tokens == 11
    assert message.usage.output_tokens == 1 + 3
    assert message.usage.cache_read_input_tokens == 5
    assert message.usage.cache_creation_input_tokens == 0


@pytest.mark.parametrize(
    ("finish", "stop_reason", "stop_sequence"),
    [
        ("stop", "end_turn", None),
        ("length", "max_tokens", None),
        ("content_filter", "refusal", None),
        ("stop_sequence", "stop_sequence", "END"),
    ],
)
def test_anthropic_stop_reasons(
    fake: FakeUpstream,
    claude: anthropic.Anthropic,
    finish: str,
    stop_reason: str,
    stop_sequence: str | None,
) -> None:
    fake.script(Reply(finish=finish))
    message = claude.messages.create(
        model="m",
        max_tokens=10,
        messages=CLAUDE_USER,
        stop_sequences=["END", "STOP"],
    )
    assert (message.stop_reason, message.stop_sequence) == (stop_reason, stop_sequence)


def test_anthropic_stream_helper(fake: FakeUpstream, claude: anthropic.Anthropic) -> None:
    fake.script(
        Reply(
            text="It is sunny in Paris.",
            tool_calls=[WEATHER_CALL],
            input_tokens=30,
            output_tokens=12,
            cached_tokens=2,
        )
    )
    with claude.messages.stream(
        model="claude-sonnet-4-6",
        max_tokens=100,
        messages=CLAUDE_USER,
    ) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()

    assert pieces == ["It", " is", " sunny", " in", " Paris."]
    text, tool = final.content
    assert text.type == "text"
    assert text.text == "It is sunny in Paris."
    assert tool.type == "tool_use"
    assert (tool.id, tool.name, tool.input) == ("call_1", "get_weather", {"city": "Paris"})
    assert final.stop_reason == "tool_use"
    assert final.usage.input_tokens == 30
    assert final.usage.output_tokens == 12
    assert final.usage.cache_read_input_tokens == 2


def test_anthropic_stream_wire_format(fake: FakeUpstream) -> None:
    fake.script(Reply(text="Hi you", tool_calls=[WEATHER_CALL]))
    body = {"model": "m", "max_tokens": 5, "messages": USER, "stream": True}
    headers = {"anthropic-version": "2023-06-01"}
    with httpx.stream("POST", fake.url + "/v1/messages", json=body, headers=headers) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()

    events = parse_sse(raw, strict=True)
    for name, data in events:
        assert data["type"] == name
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    payloads = [data for _, data in events]
    start = payloads[0]["message"]
    assert start["content"] == []
    assert start["stop_reason"] is None
    assert start["usage"]["output_tokens"] == 1
    assert payloads[1]["content_block"] == {"type": "text", "text": ""}
    assert payloads[3]["delta"] == {"type": "text_delta", "text": "Hi"}
    assert payloads[6] == {
        "type": "content_block_start",
        "index": 1,
        "content_block": {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {}},
    }
    partial = "".join(p["delta"]["partial_json"] for p in payloads[7:10])
    assert json.loads(partial) == {"city": "Paris"}
    assert payloads[11] == {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"output_tokens": 2 + 3},
    }


def test_anthropic_reply_without_usage(fake: FakeUpstream) -> None:
    fake.script(Reply(include_usage=False), Reply(include_usage=False))
    body: dict[str, Any] = {"model": "m", "max_tokens": 5, "messages": USER}
    headers = {"anthropic-version": "2023-06-01"}
    response = httpx.post(fake.url + "/v1/messages", json=body, headers=headers)
    assert "usage" not in response.json()

    response = httpx.post(fake.url + "/v1/messages", json={**body, "stream": True}, headers=headers)
    assert "usage" not in response.text


def test_anthropic_count_tokens_and_request_checks(
    fake: FakeUpstream, claude: anthropic.Anthropic
) -> None:
    counted = claude.messages.count_tokens(model="m", messages=CLAUDE_USER)
    assert counted.input_tokens == 9

    fake.script(Fail(500))  # a rejected request does not consume the queue
    url = fake.url + "/v1/messages"
    headers = {"anthropic-version": "2023-06-01"}
    response = httpx.post(url, json={"model": "m", "messages": USER}, headers=headers)
    assert response.status_code == 400
    assert response.json()["error"] == {
        "type": "invalid_request_error",
        "message": "max_tokens: Field required",
    }
    response = httpx.post(url, json={"model": "m", "max_tokens": 5, "messages": USER})
    assert response.status_code == 400
    assert response.json()["error"] == {
        "type": "invalid_request_error",
        "message": "anthropic-version: header is required",
    }
    assert fake.pending == 1


# -- embeddings and models ------------------------------------------------------------------


def test_embeddings_float_and_base64(fake: FakeUpstream, oai: openai.OpenAI) -> None:
    floats = oai.embeddings.create(
        model="text-embedding-3-small", input=["alpha", "beta"], encoding_format="float"
    )
    decoded = oai.embeddings.create(model="text-embedding-3-small", input=["alpha", "beta"])

    assert fake.requests[0].json["encoding_format"] == "float"
    assert fake.requests[1].json["encoding_format"] == "base64"  # the SDK's default
    assert floats.object == "list"
    assert floats.model == "text-embedding-3-small"
    assert [d.index for d in floats.data] == [0, 1]
    assert [len(d.embedding) for d in floats.data] == [8, 8]
    assert floats.data[0].embedding == embedding_for("alpha")
    assert floats.data[0].embedding != floats.data[1].embedding
    assert [d.embedding for d in decoded.data] == [d.embedding for d in floats.data]
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == 2 * (5 // 4 + 1)


def test_embeddings_single_input_tokens_and_dimensions(
    fake: FakeUpstream, oai: openai.OpenAI
) -> None:
    single = oai.embeddings.create(model="e", input="alpha", encoding_format="float")
    tokens = oai.embeddings.create(model="e", input=[[1, 2, 3], [4, 5]], dimensions=4)

    assert single.data[0].embedding == embedding_for("alpha")
    assert [d.embedding for d in tokens.data] == [
        embedding_for([1, 2, 3], 4),
        embedding_for([4, 5], 4),
    ]
    assert tokens.usage.prompt_tokens == 5


def test_models_in_both_dialects(
    fake: FakeUpstream, oai: openai.OpenAI, claude: anthropic.Anthropic
) -> None:
    assert "gpt-4o-mini" in [m.id for m in oai.models.list()]
    assert [m.id for m in claude.models.list()] == ["claude-sonnet-4-6", "claude-haiku-4-5"]


def test_unknown_path_is_404_in_openai_shape(fake: FakeUpstream) -> None:
    response = httpx.post(fake.url + "/v1/completions", json={})
    assert response.status_code == 404
    assert response.json() == {
        "error": {
            "message": "Invalid URL (POST /v1/completions)",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }


# -- failures -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, openai.BadRequestError),
        (401, openai.AuthenticationError),
        (403, openai.PermissionDeniedError),
        (404, openai.NotFoundError),
        (429, openai.RateLimitError),
        (500, openai.InternalServerError),
        (503, openai.InternalServerError),
    ],
)
def test_openai_failures(
    fake: FakeUpstream, oai: openai.OpenAI, status: int, error: type[Exception]
) -> None:
    fake.script(Fail(status, "nope", headers={"retry-after": "1"}))
    with pytest.raises(error) as caught:
        oai.chat.completions.create(model="m", messages=OAI_USER)
    assert isinstance(caught.value, openai.APIStatusError)
    assert caught.value.status_code == status
    assert caught.value.response.headers["retry-after"] == "1"
    assert isinstance(caught.value.body, dict)  # the SDK hands over the inner "error" object
    assert caught.value.body["message"] == "nope"
    assert set(caught.value.body) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("status", "error", "kind"),
    [
        (400, anthropic.BadRequestError, "invalid_request_error"),
        (401, anthropic.AuthenticationError, "authentication_error"),
        (403, anthropic.PermissionDeniedError, "permission_error"),
        (404, anthropic.NotFoundError, "not_found_error"),
        (429, anthropic.RateLimitError, "rate_limit_error"),
        (500, anthropic.InternalServerError, "api_error"),
        (529, anthropic.OverloadedError, "overloaded_error"),
    ],
)
def test_anthropic_failures(
    fake: FakeUpstream,
    claude: anthropic.Anthropic,
    status: int,
    error: type[Exception],
    kind: str,
) -> None:
    fake.script(Fail(status, "nope"))
    with pytest.raises(error) as caught:
        claude.messages.create(model="m", max_tokens=5, messages=CLAUDE_USER)
    assert isinstance(caught.value, anthropic.APIStatusError)
    assert caught.value.status_code == status
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["type"] == "error"
    assert body["error"] == {"type": kind, "message": "nope"}


def test_fail_delay_then_queue_order_then_default(fake: FakeUpstream, oai: openai.OpenAI) -> None:
    fake.script(Fail(429, delay=0.2), Reply(text="second", delay=0.1))
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError):
        oai.chat.completions.create(model="m", messages=OAI_USER)
    assert time.monotonic() - started >= 0.2
    second = oai.chat.completions.create(model="m", messages=OAI_USER)
    assert time.monotonic() - started >= 0.3
    assert second.choices[0].message.content == "second"
    third = oai.chat.completions.create(model="m", messages=OAI_USER)
    assert third.choices[0].message.content == Reply().text


def test_drop_mid_stream_with_httpx(fake: FakeUpstream) -> None:
    fake.script(DropMidStream(after_chunks=2, text="one two three four"))
    body = {"model": "m", "messages": USER, "stream": True}
    received: list[str] = []
    with httpx.stream("POST", fake.openai_base_url + "/chat/completions", json=body) as response:
        assert response.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
            collect(response.iter_text(), received)
    events = parse_sse("".join(received))
    contents = [chunk["choices"][0]["delta"]["content"] for _, chunk in events]
    assert contents == ["", "one", " two"]


def test_drop_mid_stream_with_sdks(
    fake: FakeUpstream, oai: openai.OpenAI, claude: anthropic.Anthropic
) -> None:
    fake.script(DropMidStream(after_chunks=1), DropMidStream(after_chunks=3), DropMidStream())
    pieces: list[str] = []
    stream = oai.chat.completions.create(model="m", messages=OAI_USER, stream=True)
    with pytest.raises(openai.APIConnectionError):
        collect((chunk.choices[0].delta.content or "" for chunk in stream), pieces)
    assert "".join(pieces) == "Hello"

    texts: list[str] = []
    with claude.messages.stream(model="m", max_tokens=5, messages=CLAUDE_USER) as claude_stream:
        assert claude_stream.response.status_code == 200
        # the anthropic SDK lets its HTTP client's RemoteProtocolError through
        with pytest.raises(Exception, match="incomplete chunked read"):
            collect(claude_stream.text_stream, texts)
    assert "".join(texts) == "Hello from the"

    with pytest.raises(openai.APIConnectionError):  # a non-stream body cut in the middle
        oai.chat.completions.create(model="m", messages=OAI_USER)


def test_malformed(fake: FakeUpstream, oai: openai.OpenAI, claude: anthropic.Anthropic) -> None:
    fake.script(Malformed(), Malformed(), Malformed())
    response = httpx.post(
        fake.openai_base_url + "/chat/completions", json={"model": "m", "messages": USER}
    )
    assert (response.status_code, response.text) == (200, "not json{")

    stream = oai.chat.completions.create(model="m", messages=OAI_USER, stream=True)
    with pytest.raises(json.JSONDecodeError):
        list(stream)

    with (
        pytest.raises(json.JSONDecodeError),
        claude.messages.stream(model="m", max_tokens=5, messages=CLAUDE_USER) as claude_stream,
    ):
        claude_stream.get_final_message()


def test_hang_until_the_client_times_out(fake: FakeUpstream, oai: openai.OpenAI) -> None:
    fake.script(Hang())
    with pytest.raises(openai.APITimeoutError):
        oai.with_options(timeout=0.3).chat.completions.create(model="m", messages=OAI_USER)
    answer = oai.chat.completions.create(model="m", messages=OAI_USER)
    assert answer.choices[0].message.content == Reply().text


# -- API keys and recorded requests ---------------------------------------------------------


def test_api_key_is_enforced_in_both_dialects() -> None:
    fake = FakeUpstream(api_key="sk-right").start()
    try:
        url = fake.openai_base_url
        with pytest.raises(openai.AuthenticationError) as caught:
            openai.OpenAI(base_url=url, api_key="sk-wrong-key", max_retries=0).models.list()
        assert isinstance(caught.value.body, dict)
        assert caught.value.body["code"] == "invalid_api_key"
        missing = httpx.post(url + "/chat/completions", json={"model": "m", "messages": USER})
        assert missing.status_code == 401
        assert missing.json()["error"]["type"] == "invalid_request_error"
        right = openai.OpenAI(base_url=url, api_key="sk-right", max_retries=0)
        assert right.chat.completions.create(model="m", messages=OAI_USER).choices

        url = fake.anthropic_base_url
        with pytest.raises(anthropic.AuthenticationError) as wrong:
            anthropic.Anthropic(base_url=url, api_key="sk-wrong", max_retries=0).messages.create(
                model="m",
                max_tokens=5,
                messages=CLAUDE_USER,
            )
        assert wrong.value.body == {
            "type": "error",
            "error": {"type": "authentication_error", "message": "invalid x-api-key"},
            "request_id": wrong.value.body["request_id"],  # type: ignore[index]
        }
        right_claude = anthropic.Anthropic(base_url=url, api_key="sk-right", max_retries=0)
        assert right_claude.messages.create(model="m", max_tokens=5, messages=CLAUDE_USER).content

        body = {"model": "m", "max_tokens": 5, "messages": USER}
        for key, status in [(None, 401), ("sk-wrong", 401), ("sk-right", 200)]:
            headers = {"anthropic-version": "2023-06-01"} | ({"x-api-key": key} if key else {})
            response = httpx.post(url + "/v1/messages", json=body, headers=headers)
            assert response.status_code == status
        assert fake.pending == 0  # rejected requests consumed nothing
    finally:
        fake.stop()


def test_recorded_requests_and_reset(
    fake: FakeUpstream, oai: openai.OpenAI, claude: anthropic.Anthropic
) -> None:
    oai.chat.completions.create(model="gpt-4o-mini", messages=OAI_USER, temperature=0.5)
    claude.messages.create(model="claude-haiku-4-5", max_tokens=7, messages=CLAUDE_USER)
    httpx.get(fake.url + "/v1/models?limit=2")

    first, second, third = fake.requests
    assert (first.method, first.path) == ("POST", "/v1/chat/completions")
    assert first.headers["authorization"] == "Bearer sk-test"
    assert first.headers["content-type"] == "application/json"
    assert first.json == {"model": "gpt-4o-mini", "messages": USER, "temperature": 0.5}
    assert second.path == "/v1/messages"
    assert second.headers["authorization"] == "Bearer sk-ant-test"  # anthropic SDK 2.x
    assert "anthropic-version" in second.headers
    assert second.json == {"model": "claude-haiku-4-5", "max_tokens": 7, "messages": USER}
    assert (third.method, third.json, third.query) == ("GET", None, {"limit": "2"})

    fake.script(Fail(500))
    fake.reset()
    assert fake.requests == []
    assert fake.pending == 0


def test_the_fixture_and_stop_ending_a_hang(fake_upstream: FakeUpstream) -> None:
    fake_upstream.script(Reply(text="from the fixture"))
    answer = httpx.post(
        fake_upstream.openai_base_url + "/chat/completions", json={"model": "m", "messages": USER}
    )
    assert answer.json()["choices"][0]["message"]["content"] == "from the fixture"
    assert [r.path for r in fake_upstream.requests] == ["/v1/chat/completions"]

    other = FakeUpstream().start()
    other.script(Hang())
    outcome: list[object] = []

    def call() -> None:
        try:
            body = {"model": "m", "messages": USER}
            outcome.append(httpx.post(other.openai_base_url + "/chat/completions", json=body))
        except httpx.HTTPError as error:
            outcome.append(error)

    caller = threading.Thread(target=call)
    caller.start()
    while not other.requests:
        time.sleep(0.01)
    started = time.monotonic()
    other.stop()
    caller.join(timeout=5)
    assert time.monotonic() - started < 2
    assert outcome  # the hanging request ended (with a 500 or a closed connection)
