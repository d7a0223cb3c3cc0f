"""Fuzzing ``/v1``: whatever the body, never a 500, always the dialect's error body.

Hypothesis generates bodies shaped like real requests whose every field may be of
the wrong type, out of range, empty, huge or hostile (NUL, lone surrogates, deep
nesting), plus arbitrary JSON.  Bounded: a few hundred requests per endpoint.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keys import ledger
from tests.gateway import Gateway

ENDPOINTS = ["/v1/chat/completions", "/v1/messages", "/v1/messages/count_tokens", "/v1/embeddings"]

hostile_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "\x00", "\ud800", "a\udfffb", "gpt-fake", "claude-fake", "embed-fake"]),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    hostile_text,
)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(hostile_text, children, max_size=4)
    ),
    max_leaves=12,
)


content_part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": json_values}),
    st.fixed_dictionaries(
        {
            "type": st.just("image_url"),
            "image_url": st.one_of(
                json_values,
                st.fixed_dictionaries(
                    {
                        "url": st.sampled_from(
                            [
                                "http://169.254.169.254/latest",
                                "http://[::1]/x.png",
                                "http://0x7f.1/a.png",
                                "data:image/png;base64,!!!",
                                "data:text/html;base64,PGI+",
                                "https://example.com/cat.png",
                                "ftp://x",
                            ]
                        )
                    }
                ),
            ),
        }
    ),
    st.fixed_dictionaries({"type": st.just("image"), "source": json_values}),
    st.fixed_dictionaries(
        {"type": st.just("tool_result"), "tool_use_id": json_values, "content": json_values}
    ),
    json_values,
)
message = st.fixed_dictionaries(
    {
        "role": st.one_of(st.sampled_from(["user", "assistant", "system", "tool"]), json_values),
        "content": st.one_of(hostile_text, st.lists(content_part, max_size=3), json_values),
    }
)
bodies = st.one_of(
    st.fixed_dictionaries(
        {
            "model": st.one_of(
                st.sampled_from(["gpt-fake", "claude-fake", "embed-fake"]), json_values
            ),
            "messages": st.one_of(st.lists(message, max_size=3), json_values),
        },
        optional={
            "max_tokens": json_values,
            "temperature": json_values,
            "stream": st.one_of(st.booleans(), json_values),
            "tools": json_values,
            "tool_choice": json_values,
            "stop": json_values,
            "system": json_values,
            "n": json_values,
            "input": json_values,
            "encoding_format": json_values,
            "metadata": json_values,
        },
    ),
    json_values,
)


def _post(gateway: Gateway, endpoint: str, raw: bytes) -> httpx.Response:
    return httpx.post(
        gateway.url + endpoint,
        headers={
            "authorization": f"Bearer {gateway.key}",
            "anthropic-version": "2023-06-01",
            "content-type": "application/json",
        },
        content=raw,
        timeout=30,
    )


def _check(response: httpx.Response, endpoint: str) -> None:
    assert response.status_code < 500 or response.status_code in (502, 503, 504), (
        f"{endpoint} answered {response.status_code}: {response.text[:300]}"
    )
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str)
        assert error["message"]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_no_body_gets_a_500(gateway: Gateway, endpoint: str) -> None:
    @settings(
        max_examples=120,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        database=None,
    )
    @given(body=bodies)
    def run(body: Any) -> None:
        raw = json.dumps(body, ensure_ascii=True).encode()
        _check(_post(gateway, endpoint, raw), endpoint)

    run()
    # Every request was recorded, and the ledger was never blocked.
    assert ledger.flush(20)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_no_bytes_get_a_500(gateway: Gateway, endpoint: str) -> None:
    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        database=None,
    )
    @given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
    def run(raw: bytes) -> None:
        _check(_post(gateway, endpoint, raw), endpoint)

    run()
