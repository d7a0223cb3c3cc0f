"""Bodies no client means to send: each a precise 400 (or 413), never a 500 or a hang."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from asgiref.testing import ApplicationCommunicator

from chatapp.relay import bodies
from chatapp.relay.asgi import api_app
from chatapp.relay.bodies import check_text, load_json
from chatapp.relay.errors import RelayError


def refusal(raw: bytes) -> RelayError:
    with pytest.raises(RelayError) as caught:
        load_json(raw)
    assert caught.value.status == 400
    return caught.value


# --- load_json ---


def test_it_reads_an_ordinary_body() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "héllo 😀"}], "n": 1}
    assert load_json(json.dumps(body).encode()) == body
    assert load_json(json.dumps(body, ensure_ascii=False).encode()) == body
    # A UTF-8 byte order mark was always tolerated (json.loads on bytes skips it).
    assert load_json(b"\xef\xbb\xbf" + json.dumps(body).encode()) == body


def test_it_says_where_the_json_is_broken() -> None:
    error = refusal(b'{"model": "m",\n "messages" []}')
    assert error.message == (
        "The request body is not valid JSON: Expecting ':' delimiter: line 2 column 13 (char 27)"
    )
    assert error.code == "invalid_json"


def test_it_refuses_invalid_utf8_naming_the_byte() -> None:
    error = refusal(b'{"model": "m\xff"}')
    assert error.message == (
        "The request body is not valid UTF-8: invalid start byte (byte 0xff at byte 12)."
    )
    # A surrogate encoded straight into UTF-8 (CESU-8) is invalid UTF-8 too.
    assert "not valid UTF-8" in refusal(b'{"a": "\xed\xa0\x80"}').message


def test_it_refuses_an_empty_body_and_one_that_is_not_an_object() -> None:
    assert refusal(b"  ").message == "The request body is empty: expected a JSON object."
    assert refusal(b"[1]").message == "The request body must be a JSON object, not an array."
    assert refusal(b'"x"').message == "The request body must be a JSON object, not a string."
    assert refusal(b"null").message == "The request body must be a JSON object, not null."


def test_100000_nested_brackets_are_a_400_not_a_recursion_error() -> None:
    for raw in (b"[" * 100_000, b'{"a":' * 100_000, b"[" * 100_000 + b"]" * 100_000):
        error = refusal(raw)
        assert error.message == (
            "The request body nests arrays and objects more than 64 levels deep."
        )


def test_nesting_is_allowed_to_64_levels_and_no_deeper() -> None:
    # The body object is level 1.
    assert load_json(b'{"a":' + b"[" * 63 + b"]" * 63 + b"}")
    assert "64 levels" in refusal(b'{"a":' + b"[" * 64 + b"]" * 64 + b"}").message
    deep_objects = b'{"a":' * 65 + b"1" + b"}" * 65
    assert "64 levels" in refusal(deep_objects).message
    # Brackets inside strings do not count.
    assert load_json(json.dumps({"a": "[" * 1000}).encode()) == {"a": "[" * 1000}


def test_an_integer_of_5000_digits_is_a_400_naming_where_it_is() -> None:
    error = refusal(b'{"model": "m",\n "seed": ' + b"7" * 5000 + b"}")
    assert error.message == (
        "The request body is not valid JSON: integer too long (5000 digits; the limit is 100)"
        " at line 2 column 10 (char 24)."
    )
    assert error.code == "invalid_json"


def test_integers_are_capped_at_100_digits() -> None:
    assert load_json(b'{"a": -' + b"9" * 100 + b"}") == {"a": -int("9" * 100)}
    assert "integer too long (101 digits" in refusal(b'{"a": [1, ' + b"9" * 101 + b"]}").message
    # The same digits inside a string are not a number.
    assert load_json(b'{"a": "' + b"9" * 200 + b'"}') == {"a": "9" * 200}


def test_the_position_names_the_number_not_a_copy_of_it_in_a_string() -> None:
    digits = b"1" * 120
    error = refusal(b'{"a": "' + digits + b'", "b": ' + digits + b"}")
    assert error.message.endswith(f"at line 1 column {1 + 135} (char 135).")


def test_nan_infinity_and_overflowing_floats_are_refused() -> None:
    assert refusal(b'{"t": NaN}').message == (
        "The request body is not valid JSON: NaN is not a JSON number at line 1 column 7 (char 6)."
    )
    assert "-Infinity is not a JSON number" in refusal(b'{"t": -Infinity}').message
    for raw in (b'{"t": 1e999}', b'{"t": -1E+400}', b'{"t": ' + b"9" * 400 + b".5}"):
        assert "number too large for a double" in refusal(raw).message
    assert load_json(b'{"t": 1e308, "u": 1e-999}') == {"t": 1e308, "u": 0.0}


def test_a_lone_surrogate_is_refused_naming_the_field() -> None:
    raw = b'{"model": "m", "messages": [{"role": "user", "content": "hi \\ud800 there"}]}'
    error = refusal(raw)
    assert error.message == "messages[0].content: contains a lone UTF-16 surrogate (\\ud800)"
    assert error.param == "messages[0].content"
    assert error.code == "invalid_string"
    # A low surrogate alone, deeper down.
    raw = b'{"messages": [{"content": [{"type": "text", "text": "\\uDC00"}]}]}'
    error = refusal(raw)
    assert error.param == "messages[0].content[0].text"
    assert error.message.endswith("(\\udc00)")


def test_a_paired_surrogate_escape_is_an_ordinary_character() -> None:
    assert load_json(b'{"a": "\\ud83d\\ude00"}') == {"a": "😀"}


def test_a_nul_is_refused_in_values_and_keys() -> None:
    error = refusal(b'{"messages": [{"content": "a\\u0000b"}]}')
    assert error.message == "messages[0].content: contains a NUL character (\\u0000)"
    assert error.param == "messages[0].content"

    error = refusal(b'{"metadata": {"us\\u0000er": "x"}}')
    assert error.message == 'metadata: the key "us\\u0000er" contains a NUL character (\\u0000)'
    assert error.param == "metadata"

    error = refusal(b'{"\\ud800": 1}')
    assert error.message == (
        'the body: the key "\\ud800" contains a lone UTF-16 surrogate (\\ud800)'
    )
    assert error.param is None


def test_a_bad_key_in_a_path_is_shown_escaped() -> None:
    error = refusal(b'{"tools": {"a\\u0000": ["\\ud800"]}}')
    # Keys of one object are checked before what they hold.
    assert error.param == "tools"
    error = refusal(b'{"x": [{"k": 1}, {"k": ["ok", "\\udfff"]}]}')
    assert error.param == "x[1].k[1]"


def test_the_messages_are_json_safe() -> None:
    # What the client gets back must itself encode as UTF-8.
    for raw in (b'{"\\ud800\\u0000": 1}', b'{"a": {"\\udbff": 1}}', b'{"a": "\\ud800"}'):
        error = refusal(raw)
        error.message.encode("utf-8")
        (error.param or "").encode("utf-8")


def test_check_text_passes_ordinary_text_and_names_the_field() -> None:
    assert check_text("héllo 😀", "text") == "héllo 😀"
    with pytest.raises(RelayError) as caught:
        check_text("a\ud800", "text")
    assert caught.value.message == "text: contains a lone UTF-16 surrogate (\\ud800)"
    assert caught.value.param == "text"
    with pytest.raises(RelayError, match=r"text: contains a NUL character"):
        check_text("a\x00", "text")


def test_find_path_names_the_first_field_holding_a_string() -> None:
    body = {"messages": [{"content": [{"text": "x"}, {"image_url": {"url": "U"}}]}]}
    assert bodies.find_path(body, "U") == "messages[0].content[1].image_url.url"
    assert bodies.find_path(body, "nowhere") is None


def test_an_ordinary_body_is_not_walked(monkeypatch: pytest.MonkeyPatch) -> None:
    # Under 64 "[" and "{" and no escape that could be NUL or a surrogate: nothing the
    # walk could find, so it is skipped.
    calls: list[object] = []
    monkeypatch.setattr(bodies, "_walk", lambda body, **kwargs: calls.append(body))
    body = {"model": "m", "messages": [{"role": "user", "content": "héllo 😀 \u00e9"}]}
    assert load_json(json.dumps(body, ensure_ascii=False).encode()) == body
    assert load_json(b'{"a": "\\u0041\\n"}') == {"a": "A\n"}
    assert calls == []
    # A surrogate pair escape could have been a lone one: walked.
    assert load_json(b'{"a": "\\ud83d\\ude00"}') == {"a": "😀"}
    assert len(calls) == 1


def test_a_megabyte_of_ordinary_chat_reads_back_unchanged() -> None:
    # Over 64 brackets: walked for depth, each message passed over in C.
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "Lorem ipsum dolor 中文 " * 20} for _ in range(2000)
        ],
    }
    raw = json.dumps(body, ensure_ascii=False).encode()
    assert len(raw) > 900_000
    assert load_json(raw) == body


# --- The body size limit in the /v1 ASGI app ---


def http_scope(path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"testserver"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }


async def response_of(communicator: ApplicationCommunicator) -> tuple[int, dict[bytes, bytes], Any]:
    start = await communicator.receive_output(timeout=2)
    body = await communicator.receive_output(timeout=2)
    headers = {name.lower(): value for name, value in start["headers"]}
    return start["status"], headers, json.loads(body["body"])


async def test_a_declared_length_over_the_limit_is_413_before_the_body_is_read(settings) -> None:  # type: ignore[no-untyped-def]
    settings.SWITCHBOARD_MAX_BODY_BYTES = 2048
    scope = http_scope(
        "/v1/chat/completions",
        [(b"content-type", b"application/json"), (b"content-length", b"2049")],
    )
    communicator = ApplicationCommunicator(api_app, scope)
    # One small chunk of a body said to be 2049 bytes: the rest never comes.
    await communicator.send_input({"type": "http.request", "body": b"{", "more_body": True})
    status, headers, body = await response_of(communicator)
    assert status == 413
    assert headers[b"connection"] == b"close"
    assert body["error"]["type"] == "request_too_large"
    assert body["error"]["message"] == (
        "The request body (2049 bytes) is over the limit of 2048 bytes (SWITCHBOARD_MAX_BODY_BYTES)."
    )
    await communicator.wait(timeout=1)


async def test_a_413_on_messages_is_in_anthropics_shape(settings) -> None:  # type: ignore[no-untyped-def]
    settings.SWITCHBOARD_MAX_BODY_BYTES = 2048
    scope = http_scope("/v1/messages", [(b"content-length", b"999999999")])
    communicator = ApplicationCommunicator(api_app, scope)
    status, _headers, body = await response_of(communicator)
    assert status == 413
    assert body["type"] == "error"
    assert body["error"]["type"] == "request_too_large"
    await communicator.wait(timeout=1)


async def test_a_chunked_body_is_413_as_soon_as_it_passes_the_limit(settings) -> None:  # type: ignore[no-untyped-def]
    settings.SWITCHBOARD_MAX_BODY_BYTES = 2048
    scope = http_scope("/v1/chat/completions", [(b"transfer-encoding", b"chunked")])
    communicator = ApplicationCommunicator(api_app, scope)
    for _ in range(3):  # 3 KB of an endless body
        await communicator.send_input(
            {"type": "http.request", "body": b" " * 1024, "more_body": True}
        )
    status, headers, body = await response_of(communicator)
    assert status == 413
    assert headers[b"connection"] == b"close"
    assert body["error"]["message"] == (
        "The request body is over the limit of 2048 bytes (SWITCHBOARD_MAX_BODY_BYTES)."
    )
    await communicator.wait(timeout=1)


async def test_a_body_at_the_limit_reaches_the_view(settings) -> None:  # type: ignore[no-untyped-def]
    settings.SWITCHBOARD_MAX_BODY_BYTES = 2048
    raw = b"[" * 2048
    scope = http_scope("/v1/chat/completions", [(b"content-length", b"2048")])
    communicator = ApplicationCommunicator(api_app, scope)
    await communicator.send_input({"type": "http.request", "body": raw[:1000], "more_body": True})
    await asyncio.sleep(0.05)
    await communicator.send_input({"type": "http.request", "body": raw[1000:]})
    # Not a 413: the view answers (no key here, so 401).
    status, _headers, _body = await response_of(communicator)
    assert status == 401
    await communicator.wait(timeout=1)
