"""Golden translation cases, one JSON file each in ``golden/``.

A case holds what a client sent, the exact body the upstream must receive, what the
upstream answered (a JSON body or its stream), and what the client must get back.  The
expected values follow the OpenAI Chat Completions and Anthropic Messages wire formats.

``relay`` runs a case through the very functions the ``/v1`` views and the pipeline
use, in-process: the client dialect's parser, the upstream type's ``build_chat`` (from
the registry), its ``parse_completion`` or its stream decoder fed the case's SSE
events, ``pipeline.passthrough`` to choose between relaying the upstream's own body
and rendering the events, and the dialect's ``render_reply`` or the views'
``render_stream``.  Only the HTTP transport is left out: no database, no sockets.

A case may carry ``"xfail": "<reason>"`` for a known translation bug: it then runs as
``xfail(strict=True)``, so fixing the bug turns the suite red until the marker goes.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from chatapp.relay import pipeline
from chatapp.relay.dialects import HTTP_DIALECTS
from chatapp.relay.dialects import anthropic as anthropic_dialect
from chatapp.relay.dialects import openai as openai_dialect
from chatapp.relay.errors import RelayError
from chatapp.relay.upstreams import Target, UpstreamItem
from chatapp.relay.views import render_stream
from tests.sse import has_event_names, parse_sse

GOLDEN = Path(__file__).parent / "golden"
DIALECTS = ("openai", "anthropic")
UPSTREAM_MODEL = "upstream-model"
REQUEST_ID = "golden"
OPENAI_DONE = "[DONE]"
CASE_KEYS = {
    "description",
    "xfail",
    "client_dialect",
    "upstream_type",
    "client_request",
    "expected_upstream_request",
    "upstream_response",
    "upstream_stream",
    "expected_client_response",
    "expected_client_stream",
    "expected_error",
}
PARSERS = {
    "openai": openai_dialect.parse_chat_request,
    "anthropic": anthropic_dialect.parse_messages_request,
}


def target_for(upstream_type: str) -> Target:
    return Target(
        route_id=1,
        provider="p",
        provider_type=upstream_type,
        base_url="http://upstream.test/v1" if upstream_type == "openai" else "http://upstream.test",
        api_key="k",
        upstream_model=UPSTREAM_MODEL,
        timeout=30,
        max_output_tokens=4096,
    )


UPSTREAM_URLS = {
    "openai": "http://upstream.test/v1/chat/completions",
    "anthropic": "http://upstream.test/v1/messages",
}


# --- The relay, through the functions the views and the pipeline run ---


@dataclass
class Outcome:
    """What one case produced: the upstream's request body and the client's answer."""

    url: str | None = None
    upstream_request: dict[str, Any] | None = None
    client_response: dict[str, Any] | None = None
    client_stream: list[Any] = field(default_factory=list)
    error: RelayError | None = None


def _wire(body: Any) -> Any:
    """A body as the other side receives it: serialised the way the gateway sends JSON."""
    return json.loads(json.dumps(body, ensure_ascii=False))


def relay(case: dict[str, Any]) -> Outcome:
    client: str = case["client_dialect"]
    target = target_for(case["upstream_type"])
    body = copy.deepcopy(case["client_request"])
    call = pipeline.Call(
        principal=None,
        endpoint="golden",
        dialect=client,
        model=str(body.get("model") or ""),
        request_id=f"req_{REQUEST_ID}",
    )
    try:
        call.request = PARSERS[client](body)
        http_call = target.upstream.build_chat(target, call.request)
    except RelayError as error:
        return Outcome(error=error)
    outcome = Outcome(url=http_call.url, upstream_request=_wire(http_call.body))
    if call.request.stream:
        outcome.client_stream = asyncio.run(_relay_stream(case, call, target))
    else:
        outcome.client_response = _wire(_relay_body(case, call, target))
    return outcome


def _relay_body(case: dict[str, Any], call: pipeline.Call, target: Target) -> dict[str, Any]:
    body: dict[str, Any] = copy.deepcopy(case["upstream_response"])
    completion = target.upstream.parse_completion(body)
    return HTTP_DIALECTS[call.dialect].render_reply(
        body, completion, model=call.model, passthrough=pipeline.passthrough(call, target)
    )


class _Stream:
    """The upstream's side of a ``pipeline.ChatStream``: items from the real decoder."""

    def __init__(self, call: pipeline.Call, target: Target, items: list[UpstreamItem]) -> None:
        self.passthrough = pipeline.passthrough(call, target)
        self.items = items

    async def __aiter__(self) -> AsyncIterator[UpstreamItem]:
        for item in self.items:
            yield item


def _sse_events(case: dict[str, Any]) -> list[tuple[str, str]]:
    """The case's upstream stream as (event name, data text), as SSE carries it."""
    events = []
    for element in copy.deepcopy(case["upstream_stream"]):
        if case["upstream_type"] == "openai":
            data = element if element == OPENAI_DONE else json.dumps(element)
            events.append(("message", data))
        else:
            name, raw = element
            events.append((name, json.dumps(raw)))
    return events


async def _relay_stream(case: dict[str, Any], call: pipeline.Call, target: Target) -> list[Any]:
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
    out = [piece async for piece in render_stream(call, HTTP_DIALECTS[call.dialect], stream)]
    return client_elements(b"".join(out), call.dialect)


def client_elements(data: bytes, dialect: str) -> list[Any]:
    """SSE bytes → elements: OpenAI chunk objects (and "[DONE]"), Anthropic [event, data]."""
    events = parse_sse(data, strict=True)
    if dialect == "openai":
        assert not has_event_names(data), "OpenAI streams carry no event names"
        return [payload for _name, payload in events]
    assert has_event_names(data), "Anthropic names every event"
    return [[name, payload] for name, payload in events]


# --- Normalisation of volatile fields ---

ID_PREFIXES = {"chat.completion": "chatcmpl-", "chat.completion.chunk": "chatcmpl-"}


def _mask_id(value: Any, prefix: str) -> Any:
    """A generated id is volatile, its prefix is not: a wrong prefix still shows up."""
    if isinstance(value, str) and value.startswith(prefix):
        return f"{prefix}<id>"
    return value


def normalize(value: Any) -> Any:
    """Mask response ids and created times; compare tool-call arguments as JSON values.

    Arguments are JSON text whose spacing carries no meaning, so a complete JSON object
    compares by value; stream fragments (not valid JSON alone) still compare verbatim.
    Tool-call ids are never masked: they must round-trip.
    """
    if isinstance(value, list):
        return [normalize(item) for item in value]
    if not isinstance(value, dict):
        return value
    out = {key: normalize(item) for key, item in value.items()}
    kind = out.get("object")
    if isinstance(kind, str) and kind in ID_PREFIXES:
        out["id"] = _mask_id(out.get("id"), ID_PREFIXES[kind])
        if "created" in out:
            out["created"] = "<created>"
    if out.get("type") == "message" and out.get("role") == "assistant":
        out["id"] = _mask_id(out.get("id"), "msg_")
    arguments = out.get("arguments")
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError:
            pass
        else:
            if isinstance(parsed, dict):
                out["arguments"] = {"<json>": parsed}
    return out


# --- The cases ---


def load(path: Path) -> dict[str, Any]:
    case: dict[str, Any] = json.loads(path.read_text())
    return case


def _params() -> list[Any]:
    params = []
    for path in sorted(GOLDEN.glob("*.json")):
        reason = load(path).get("xfail")
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        params.append(pytest.param(path, id=path.name, marks=marks))
    return params


@pytest.mark.parametrize("path", _params())
def test_golden_case(path: Path) -> None:
    case = load(path)
    outcome = relay(case)

    if "expected_error" in case:
        assert outcome.error is not None, "expected the request to be refused"
        error = outcome.error
        actual = {"status": error.status, "param": error.param, "type": error.type}
        actual.update(code=error.code, message=error.message)
        expected = case["expected_error"]
        assert {key: actual[key] for key in expected} == expected
        return

    assert outcome.error is None, (
        f"refused with {outcome.error.status} ({outcome.error.param}): {outcome.error.message}"
    )
    assert outcome.url == UPSTREAM_URLS[case["upstream_type"]]
    assert normalize(outcome.upstream_request) == normalize(case["expected_upstream_request"])

    if "expected_client_stream" in case:
        assert normalize(outcome.client_stream) == normalize(case["expected_client_stream"])
        if case["client_dialect"] == "openai":
            # Every chunk of one completion shares its id and created time.
            chunks = [chunk for chunk in outcome.client_stream if chunk != OPENAI_DONE]
            assert len({(chunk["id"], chunk["created"]) for chunk in chunks}) == 1
        else:
            # Anthropic names each SSE event after its data's type.
            assert all(name == data["type"] for name, data in outcome.client_stream)
    else:
        assert normalize(outcome.client_response) == normalize(case["expected_client_response"])


def test_the_golden_cases_are_well_formed_and_cover_every_direction() -> None:
    paths = sorted(GOLDEN.glob("*.json"))
    assert len(paths) >= 14
    covered: set[tuple[str, str, str]] = set()
    for path in paths:
        case = load(path)
        assert set(case) <= CASE_KEYS, f"{path.name}: unknown keys {set(case) - CASE_KEYS}"
        client, upstream = case["client_dialect"], case["upstream_type"]
        assert client in DIALECTS, path.name
        assert upstream in DIALECTS, path.name
        assert path.name.startswith(f"{client}_to_{upstream}__"), path.name
        assert case["description"], path.name
        if "expected_error" in case:
            assert not {"upstream_response", "upstream_stream"} & set(case), path.name
            continue
        stream = bool(case["client_request"].get("stream"))
        if stream:
            assert {"upstream_stream", "expected_client_stream"} <= set(case), path.name
            assert not {"upstream_response", "expected_client_response"} & set(case), path.name
        else:
            assert {"upstream_response", "expected_client_response"} <= set(case), path.name
            assert not {"upstream_stream", "expected_client_stream"} & set(case), path.name
        assert case["expected_upstream_request"]["model"] == UPSTREAM_MODEL, path.name
        if not case.get("xfail"):
            covered.add((client, upstream, "stream" if stream else "body"))
    wanted = {
        (client, upstream, mode)
        for client in DIALECTS
        for upstream in DIALECTS
        for mode in ("stream", "body")
    }
    assert wanted <= covered, f"directions without a passing case: {sorted(wanted - covered)}"
