"""Golden translation cases, one JSON file each in ``golden/``.

A case holds what a client sent, the exact body the upstream must receive, what the
upstream answered (a JSON body or its stream), and what the client must get back.  The
expected values follow the OpenAI Chat Completions and Anthropic Messages wire formats.

``relay`` runs a case through the same pure steps as the ``/v1`` views, in-process:
parse in the client's dialect, build the upstream call, parse the upstream's reply into
canonical events, then relay it as it is (same dialect: ``_relay_chat`` swaps the model
of a body; ``_stream_response`` passes chunks and events through) or render it in the
client's dialect (cross dialect).  No database, no HTTP.

A case may carry ``"xfail": "<reason>"`` for a known translation bug: it then runs as
``xfail(strict=True)``, so fixing the bug turns the suite red until the marker goes.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from chatapp.relay.canonical import ChatRequest, Completion
from chatapp.relay.dialects import anthropic as anthropic_dialect
from chatapp.relay.dialects import openai as openai_dialect
from chatapp.relay.errors import RelayError
from chatapp.relay.upstreams import Target
from chatapp.relay.upstreams import anthropic as anthropic_upstream
from chatapp.relay.upstreams import openai as openai_upstream

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


# --- The relay, as the views run it ---


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
    upstream: str = case["upstream_type"]
    target = target_for(upstream)
    body = copy.deepcopy(case["client_request"])
    try:
        # views.chat_completions / views.messages, then pipeline._build
        request = (
            openai_dialect.parse_chat_request(body)
            if client == "openai"
            else anthropic_dialect.parse_messages_request(body)
        )
        build = (
            anthropic_upstream.build_chat if upstream == "anthropic" else openai_upstream.build_chat
        )
        call = build(target, request)
    except RelayError as error:
        return Outcome(error=error)
    outcome = Outcome(url=call.url, upstream_request=_wire(call.body))
    model = str(body.get("model") or "")  # call.model: the name the client asked for
    if request.stream:
        outcome.client_stream = _relay_stream(case, request, model)
    else:
        outcome.client_response = _wire(_relay_body(case, model))
    return outcome


def _relay_body(case: dict[str, Any], model: str) -> dict[str, Any]:
    """views._relay_chat, non-stream."""
    client, upstream = case["client_dialect"], case["upstream_type"]
    body: dict[str, Any] = copy.deepcopy(case["upstream_response"])
    completion: Completion = (
        anthropic_upstream.parse_completion(body)
        if upstream == "anthropic"
        else openai_upstream.parse_completion(body)
    )
    if upstream == client:
        body["model"] = model
        if client == "openai" and isinstance(body.get("usage"), dict) and completion.usage:
            body["usage"].setdefault(
                "total_tokens", completion.usage.input_tokens + completion.usage.output_tokens
            )
        return body
    if client == "anthropic":
        return anthropic_dialect.render_message(completion, model)
    return openai_dialect.render_completion(completion, model)


def _relay_stream(case: dict[str, Any], request: ChatRequest, model: str) -> list[Any]:
    """pipeline._items feeding views._stream_response; returns the client's SSE elements."""
    client, upstream = case["client_dialect"], case["upstream_type"]
    same_dialect = client == upstream
    renderer: Any = (
        anthropic_dialect.StreamRenderer(model=model, request_id=REQUEST_ID)
        if client == "anthropic"
        else openai_dialect.StreamRenderer(
            model=model, request_id=REQUEST_ID, include_usage=request.include_usage
        )
    )
    parser: Any = (
        anthropic_upstream.StreamParser()
        if upstream == "anthropic"
        else openai_upstream.StreamParser()
    )
    out: list[bytes] = []
    finished = False
    for element in copy.deepcopy(case["upstream_stream"]):
        if upstream == "openai":
            if element == OPENAI_DONE:
                finished = True
                break
            name, raw = "message", element
            events = parser.feed(raw)
        else:
            name, raw = element
            events = parser.feed(name, raw)
        if same_dialect:
            if client == "anthropic":
                out.append(anthropic_dialect.passthrough_event(name, raw, model=model))
            else:
                chunk = openai_dialect.passthrough_chunk(
                    raw, model=model, include_usage=request.include_usage
                )
                if chunk is not None:
                    out.append(chunk)
        else:
            for event in events:
                out.extend(renderer.render(event))
        if upstream == "anthropic" and raw.get("type") == "message_stop":
            finished = True
            break
    assert finished, "the golden upstream stream must end ([DONE] or message_stop)"
    if client == "openai":
        out.append(b"data: [DONE]\n\n")
    elif not same_dialect:
        out.extend(renderer.done())
    return parse_sse(b"".join(out), client)


def parse_sse(data: bytes, dialect: str) -> list[Any]:
    """SSE bytes → elements: OpenAI chunk objects (and "[DONE]"), Anthropic [event, data]."""
    text = data.decode()
    assert text.endswith("\n\n"), f"the stream must end with a blank line: {text[-80:]!r}"
    elements: list[Any] = []
    for block in text[:-2].split("\n\n"):
        name: str | None = None
        payload: list[str] = []
        for line in block.split("\n"):
            key, _, value = line.partition(": ")
            if key == "event":
                name = value
            elif key == "data":
                payload.append(value)
            else:
                raise AssertionError(f"unexpected SSE line {line!r}")
        data_text = "\n".join(payload)
        if dialect == "openai":
            assert name is None, f"OpenAI streams carry no event names, got {name!r}"
            elements.append(OPENAI_DONE if data_text == OPENAI_DONE else json.loads(data_text))
        else:
            assert name is not None, f"an Anthropic event without a name: {data_text!r}"
            elements.append([name, json.loads(data_text)])
    return elements


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
