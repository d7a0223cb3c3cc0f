"""GET /v1/openapi.json: a valid OpenAPI 3.1 document that the live API keeps to.

The fuzz generates request bodies from the document's own request schemas (the small
JSON Schema subset the document uses, turned into Hypothesis strategies below), with every kind of authentication and a model that exists
or not, sends them to the live gateway (fake upstream behind it) and checks each
answer against the document: a documented status, never a 500, and a JSON body
valid against the schema documented for that status.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from chatapp.relay.openapi import document, raised_errors
from tests.gateway import Gateway

MODELS = ("gpt-fake", "claude-fake", "embed-fake", "no-such-model")


def test_the_document_is_valid_openapi_3_1() -> None:
    spec = document("https://llm.example.com")
    validate(spec)
    assert spec["openapi"] == "3.1.0"
    assert spec["servers"] == [{"url": "https://llm.example.com"}]
    assert {"/v1/chat/completions", "/v1/messages", "/v1/embeddings", "/v1/models"} <= set(
        spec["paths"]
    )


def test_it_documents_every_status_the_relay_raises() -> None:
    statuses = {str(error.status) for error in raised_errors()}
    responses = document("http://x")["paths"]["/v1/messages"]["post"]["responses"]
    assert statuses | {"200"} == set(responses)
    assert "rate_limit_exceeded" in responses["429"]["description"]


@pytest.fixture
def spec(gateway: Gateway) -> dict[str, Any]:
    """The document as the live gateway serves it, without a key."""
    response = httpx.get(f"{gateway.url}/v1/openapi.json")
    assert response.status_code == 200
    served = response.json()
    assert served["servers"] == [{"url": gateway.url}]
    validate(served)
    return dict(served)


def test_it_refuses_other_methods(gateway: Gateway) -> None:
    response = httpx.post(f"{gateway.url}/v1/openapi.json")
    assert response.status_code == 405
    assert response.json()["error"]["type"] == "invalid_request_error"


def _check(spec: dict[str, Any], path: str, method: str, response: httpx.Response) -> None:
    """The answer contradicts nothing in the document."""
    assert response.status_code != 500, response.text
    operation = spec["paths"][path][method]
    documented = operation["responses"].get(str(response.status_code))
    assert documented is not None, f"{method} {path}: undocumented {response.status_code}"
    media = response.headers["content-type"].split(";")[0]
    assert media in documented["content"], f"{method} {path}: undocumented {media}"
    if media == "application/json":
        schema = documented["content"][media]["schema"]
        resource = Resource.from_contents(spec, default_specification=DRAFT202012)
        registry: Registry[Any] = Registry().with_resource("urn:spec", resource)
        rooted = _rooted(schema)
        errors = list(Draft202012Validator(rooted, registry=registry).iter_errors(response.json()))
        assert not errors, f"{method} {path} {response.status_code}: {errors[0].message}"


def _rooted(schema: Any) -> Any:
    """The schema with its local refs pointing into the registered document."""
    if isinstance(schema, dict):
        return {
            key: (f"urn:spec{value}" if key == "$ref" else _rooted(value))
            for key, value in schema.items()
        }
    if isinstance(schema, list):
        return [_rooted(item) for item in schema]
    return schema


def from_schema(schema: Any, spec: dict[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
    """Values valid against ``schema`` (the JSON Schema subset the document uses)."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return from_schema(spec["components"]["schemas"][name], spec, depth)
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "anyOf" in schema:
        return st.one_of([from_schema(option, spec, depth) for option in schema["anyOf"]])
    kind = schema.get("type")
    if isinstance(kind, list):
        return st.one_of([from_schema({**schema, "type": one}, spec, depth) for one in kind])
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=30)
    if kind == "integer":
        # Bounded: the fake upstream really builds what it is asked for (``dimensions``),
        # and hostile sizes are tests/chatapp/test_fuzz.py's business.
        low = schema.get("minimum", -1000)
        return st.integers(low, schema.get("maximum", low + 5000))
    if kind == "number":
        return st.floats(schema.get("minimum", -1e6), schema.get("maximum", 1e6))
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        items = schema.get("items", {"type": "string"})
        return st.lists(
            from_schema(items, spec, depth + 1),
            min_size=schema.get("minItems", 0),
            max_size=schema.get("minItems", 0) + (2 if depth < 2 else 0),
        )
    if kind == "object":
        properties = schema.get("properties", {})
        required = set(schema.get("required", ()))
        if depth > 3:
            properties = {name: properties[name] for name in required}
        fixed = {name: from_schema(properties[name], spec, depth + 1) for name in required}
        optional = {
            name: from_schema(value, spec, depth + 1)
            for name, value in properties.items()
            if name not in required
        }
        return st.fixed_dictionaries(fixed, optional=optional)
    return st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=10))


def _body_strategy(spec: dict[str, Any], path: str) -> st.SearchStrategy[Any]:
    """Bodies from the request schema (with a real or unknown model), or any JSON object."""
    schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    conforming = st.tuples(from_schema(schema, spec), st.sampled_from(MODELS)).map(
        lambda pair: {**pair[0], "model": pair[1]}
    )
    if path != "/v1/embeddings":
        # Most generated conversations end with a user turn, as real ones do.
        conforming = st.one_of(
            conforming,
            conforming.map(lambda body: {**body, "messages": [*body["messages"], *HELLO]}),
        )
    junk = st.dictionaries(
        st.sampled_from(["model", "messages", "input", "max_tokens", "stream", "x"]),
        st.one_of(
            st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=2)
        ),
        max_size=3,
    )
    return st.one_of(conforming, conforming, conforming, junk)


def _auth(gateway: Gateway) -> st.SearchStrategy[dict[str, str]]:
    return st.sampled_from(
        [
            {"Authorization": f"Bearer {gateway.key}"},
            {"Authorization": f"Bearer {gateway.key}"},
            {"x-api-key": gateway.key},
            {"x-api-key": gateway.key, "anthropic-version": "2023-06-01"},
            {},
            {"Authorization": "Bearer sk-not-a-key"},
        ]
    )


FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
    ],
    database=None,
)


HELLO = [{"role": "user", "content": "Hello"}]
VALID = {
    "/v1/chat/completions": [
        {"model": "gpt-fake", "messages": HELLO},
        {"model": "claude-fake", "messages": HELLO, "stream": True},
    ],
    "/v1/messages": [
        {"model": "claude-fake", "max_tokens": 16, "messages": HELLO},
        {"model": "gpt-fake", "max_tokens": 16, "messages": HELLO, "stream": True},
    ],
    "/v1/messages/count_tokens": [{"model": "claude-fake", "messages": HELLO}],
    "/v1/embeddings": [{"model": "embed-fake", "input": ["one", "two"]}],
}


@pytest.mark.parametrize("path", list(VALID))
def test_a_fuzz_of_the_post_endpoints_finds_no_500_and_nothing_undocumented(
    spec: dict[str, Any], gateway: Gateway, path: str
) -> None:
    seen: set[int] = set()
    with httpx.Client(base_url=gateway.url, timeout=60) as client:

        def fuzz(body: Any, headers: dict[str, str]) -> None:
            response = client.post(path, json=body, headers=headers)
            _check(spec, path, "post", response)
            seen.add(response.status_code)

        run = given(body=_body_strategy(spec, path), headers=_auth(gateway))(fuzz)
        for body in VALID[path]:
            run = example(body=body, headers={"x-api-key": gateway.key})(run)
            run = example(body=body, headers={})(run)
        FUZZ(run)()
    # The fuzz reached both the models and the refusals.
    assert {200, 400, 401} <= seen, seen


def test_a_fuzz_of_the_model_endpoints_finds_no_500_and_nothing_undocumented(
    spec: dict[str, Any], gateway: Gateway
) -> None:
    with httpx.Client(base_url=gateway.url, timeout=60) as client:

        @FUZZ
        @given(
            name=st.one_of(st.sampled_from(MODELS), st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF, exclude_characters="/?#%"), min_size=1, max_size=20)),
            headers=_auth(gateway),
        )  # fmt: skip
        def fuzz(name: str, headers: dict[str, str]) -> None:
            _check(spec, "/v1/models", "get", client.get("/v1/models", headers=headers))
            response = client.get(f"/v1/models/{quote(name)}", headers=headers)
            _check(spec, "/v1/models/{model}", "get", response)

        fuzz()
