"""Errors in each dialect's own body, and the SDKs' matching exception classes."""

from __future__ import annotations

from datetime import timedelta

import anthropic
import httpx
import openai
import pytest
from django.utils import timezone

from accounts.models import User
from chatapp.models import CatalogModel
from keys.actions import do_revoke_key
from keys.models import ApiKey
from tests.fake_upstream import Fail
from tests.gateway import Gateway

USER = [{"role": "user", "content": "hi"}]


def test_a_missing_or_unknown_key_is_401_in_both_dialects(gateway: Gateway) -> None:
    response = httpx.post(
        gateway.base_url + "/chat/completions", json={"model": "gpt-fake", "messages": USER}
    )
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["type"] == "authentication_error"
    assert "Missing API key" in error["message"]
    assert response.headers["x-request-id"].startswith("req_")

    with pytest.raises(openai.AuthenticationError, match="Invalid API key"):
        gateway.openai("sk-" + "x" * 48).chat.completions.create(model="gpt-fake", messages=USER)  # type: ignore[arg-type]
    with pytest.raises(anthropic.AuthenticationError) as caught:
        gateway.anthropic("sk-" + "y" * 48).messages.create(
            model="claude-fake", max_tokens=5, messages=USER
        )  # type: ignore[arg-type]
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": caught.value.body["error"]["message"]},
    }  # type: ignore[index]


def test_a_revoked_key_is_refused_on_its_very_next_request(gateway: Gateway) -> None:
    client = gateway.openai()
    client.chat.completions.create(model="gpt-fake", messages=USER)  # type: ignore[arg-type]
    do_revoke_key(key=ApiKey.objects.get(user=gateway.user))
    with pytest.raises(openai.PermissionDeniedError, match="has been revoked"):
        client.chat.completions.create(model="gpt-fake", messages=USER)  # type: ignore[arg-type]


def test_disabled_and_expired_keys_and_disabled_owners_are_403(gateway: Gateway) -> None:
    key = ApiKey.objects.get(user=gateway.user)
    client = gateway.anthropic()
    key.enabled = False
    key.save()
    with pytest.raises(anthropic.PermissionDeniedError, match="is disabled"):
        client.messages.create(model="claude-fake", max_tokens=5, messages=USER)  # type: ignore[arg-type]
    key.enabled = True
    key.expires_at = timezone.now() - timedelta(seconds=1)
    key.save()
    with pytest.raises(anthropic.PermissionDeniedError, match="expired"):
        client.messages.create(model="claude-fake", max_tokens=5, messages=USER)  # type: ignore[arg-type]
    key.expires_at = None
    key.save()
    User.objects.filter(pk=gateway.user.pk).update(is_active=False)
    gateway.user.refresh_from_db()
    gateway.user.save()  # a save through the model invalidates the owner's keys
    with pytest.raises(anthropic.PermissionDeniedError, match="owner .* is disabled"):
        client.messages.create(model="claude-fake", max_tokens=5, messages=USER)  # type: ignore[arg-type]


def test_an_unknown_model_is_404_model_not_found(gateway: Gateway) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        gateway.openai().chat.completions.create(model="nope", messages=USER)  # type: ignore[arg-type]
    assert caught.value.code == "model_not_found"
    with pytest.raises(anthropic.NotFoundError, match="'nope' does not exist"):
        gateway.anthropic().messages.create(model="nope", max_tokens=5, messages=USER)  # type: ignore[arg-type]
    [openai_record, anthropic_record] = gateway.records()
    assert (openai_record.status, openai_record.http_status, openai_record.error_type) == (
        "error",
        404,
        "invalid_request_error",
    )


def test_a_disabled_model_disappears_at_once(gateway: Gateway) -> None:
    client = gateway.openai()
    client.chat.completions.create(model="gpt-fake", messages=USER)  # type: ignore[arg-type]
    CatalogModel.objects.filter(name="gpt-fake").update(enabled=False)
    CatalogModel.objects.get(name="gpt-fake").save()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-fake", messages=USER)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"messages": USER}, "model", "model: this field is required"),
        ({"model": "gpt-fake"}, "messages", "messages: this field is required"),
        (
            {"model": "gpt-fake", "messages": USER, "temperature": 3},
            "temperature",
            "temperature: 3 is out of range: expected 0 to 2",
        ),
        (
            {"model": "gpt-fake", "messages": USER, "max_tokens": "ten"},
            "max_tokens",
            "max_tokens: expected an integer, got str",
        ),
        (
            {"model": "gpt-fake", "messages": [{"role": "robot", "content": "x"}]},
            "messages[0].role",
            "unknown role 'robot'",
        ),
        (
            {
                "model": "gpt-fake",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image_url",
                                "image_url": {"url": "data:image/bmp;base64,AAAA"},
                            }
                        ],
                    }
                ],
            },
            "messages[0].content[0].image_url.url",
            "unsupported image type 'image/bmp'",
        ),
    ],
)
def test_bad_openai_requests_are_400_naming_the_field(
    gateway: Gateway, body: dict[str, object], param: str, message: str
) -> None:
    response = httpx.post(
        gateway.base_url + "/chat/completions",
        headers={"authorization": f"Bearer {gateway.key}"},
        json=body,
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert message in error["message"]
    assert gateway.fake.requests == []


def test_bad_json_and_missing_max_tokens_on_messages(gateway: Gateway) -> None:
    headers = {"x-api-key": gateway.key, "content-type": "application/json"}
    response = httpx.post(gateway.url + "/v1/messages", headers=headers, content=b"{not json")
    assert response.status_code == 400
    assert response.json()["type"] == "error"
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert "not valid JSON" in response.json()["error"]["message"]
    response = httpx.post(
        gateway.url + "/v1/messages",
        headers=headers,
        json={"model": "claude-fake", "messages": USER},
    )
    assert response.status_code == 400
    assert response.json()["error"] == {
        "type": "invalid_request_error",
        "message": "max_tokens: this field is required",
    }


def test_a_body_over_the_limit_is_413(gateway: Gateway, settings) -> None:  # type: ignore[no-untyped-def]
    settings.SWITCHBOARD_MAX_BODY_BYTES = 2048
    response = httpx.post(
        gateway.base_url + "/chat/completions",
        headers={"authorization": f"Bearer {gateway.key}"},
        json={"model": "gpt-fake", "messages": [{"role": "user", "content": "x" * 5000}]},
    )
    assert response.status_code == 413
    assert "over the limit of 2048 bytes" in response.json()["error"]["message"]


def test_capabilities_are_checked_before_anything_is_sent(gateway: Gateway) -> None:
    CatalogModel.objects.filter(name="gpt-fake").update(supports_vision=False)
    CatalogModel.objects.get(name="gpt-fake").save()
    with pytest.raises(openai.BadRequestError, match="does not accept images"):
        gateway.openai().chat.completions.create(
            model="gpt-fake",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
                    ],
                }
            ],
        )
    with pytest.raises(openai.BadRequestError, match="does not provide embeddings"):
        gateway.openai().embeddings.create(model="gpt-fake", input="x")
    with pytest.raises(openai.BadRequestError, match="max_tokens: 100000 is more than the 4096"):
        gateway.openai().chat.completions.create(model="gpt-fake", messages=USER, max_tokens=100000)  # type: ignore[arg-type]
    assert gateway.fake.requests == []


def test_upstream_errors_map_to_502_and_429(gateway: Gateway) -> None:
    gateway.fake.script(Fail(400, "bad things"))
    with pytest.raises(
        openai.BadRequestError, match="The upstream rejected the request: .*bad things"
    ):
        gateway.openai().chat.completions.create(model="gpt-fake", messages=USER)  # type: ignore[arg-type]
    gateway.fake.script(Fail(401, "wrong upstream key"))
    with pytest.raises(openai.APIStatusError) as caught:
        gateway.openai().chat.completions.create(model="gpt-fake", messages=USER)  # type: ignore[arg-type]
    assert caught.value.status_code == 502
    assert "wrong upstream key" in caught.value.message
    gateway.fake.script(*[Fail(429, "slow down", headers={"retry-after": "30"})] * 3)
    with pytest.raises(anthropic.RateLimitError) as limited:
        gateway.anthropic().messages.create(model="claude-fake", max_tokens=5, messages=USER)  # type: ignore[arg-type]
    assert limited.value.response.headers["retry-after"] == "30"


def test_unknown_endpoints_and_wrong_methods(gateway: Gateway) -> None:
    response = httpx.get(
        gateway.base_url + "/nothing-here", headers={"authorization": f"Bearer {gateway.key}"}
    )
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "unknown_url"
    response = httpx.get(
        gateway.base_url + "/chat/completions", headers={"authorization": f"Bearer {gateway.key}"}
    )
    assert response.status_code == 405
