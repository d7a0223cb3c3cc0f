"""Per-model parameter rules: the upstream gets the rewritten body, a refused parameter a 400."""

from __future__ import annotations

import io

import anthropic
import openai
import pytest
from django.core.management import CommandError, call_command
from django.test import Client
from django.urls import reverse

from accounts.models import User
from chatapp.actions import do_update_model
from chatapp.models import CatalogModel
from chatapp.relay import params
from tests.fake_upstream import Reply
from tests.gateway import Gateway

pytestmark = pytest.mark.django_db

O1_RULES = (
    "temperature: drop\nmax_tokens: rename max_completion_tokens\ntop_p: fix 1\nlogprobs: refuse"
)


def set_rules(name: str, text: str, *, fold_system: bool = False) -> None:
    model = CatalogModel.objects.get(name=name)
    rules = [rule.as_json() for rule in params.parse_text(text)]
    do_update_model(model=model, changes={"param_rules": rules, "fold_system": fold_system})


def sent(gateway: Gateway) -> dict:
    [request] = [
        r for r in gateway.fake.requests if r.path.endswith(("/chat/completions", "/messages"))
    ]
    return request.json


@pytest.mark.parametrize("stream", [False, True])
def test_an_openai_client_reaches_an_o1_like_model_with_the_body_rewritten(
    gateway: Gateway, stream: bool
) -> None:
    set_rules("gpt-fake", O1_RULES, fold_system=True)
    gateway.fake.script(Reply(text="ok"))
    result = gateway.openai().chat.completions.create(
        model="gpt-fake",
        messages=[
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Hello"},
        ],
        temperature=0.2,
        max_tokens=50,
        stream=stream,
    )
    if stream:
        list(result)
    body = sent(gateway)
    assert "temperature" not in body
    assert "max_tokens" not in body
    assert body["max_completion_tokens"] == 50
    assert body["top_p"] == 1
    assert [m["role"] for m in body["messages"]] == ["user"]
    assert body["messages"][0]["content"] == "Answer in French.\n\nHello"


def test_an_anthropic_client_of_the_same_model_gets_the_same_rules(gateway: Gateway) -> None:
    set_rules("gpt-fake", O1_RULES, fold_system=True)
    gateway.fake.script(Reply(text="ok"))
    gateway.anthropic().messages.create(
        model="gpt-fake",
        max_tokens=40,
        system="Be brief.",
        extra_body={"temperature": 0.9},  # (this SDK version has no temperature argument)
        messages=[{"role": "user", "content": "Hi"}],
    )
    body = sent(gateway)
    assert "temperature" not in body
    assert body["max_completion_tokens"] == 40
    assert [m["role"] for m in body["messages"]] == ["user"]
    assert "Be brief." in str(body["messages"][0]["content"])


def test_a_refused_parameter_is_a_400_naming_it_and_the_model(gateway: Gateway) -> None:
    set_rules("gpt-fake", O1_RULES)
    with pytest.raises(openai.BadRequestError) as refused:
        gateway.openai().chat.completions.create(
            model="gpt-fake", messages=[{"role": "user", "content": "Hi"}], logprobs=True
        )
    assert refused.value.status_code == 400
    assert "'logprobs'" in refused.value.message
    assert "'gpt-fake'" in refused.value.message
    assert refused.value.body["param"] == "logprobs"  # type: ignore[index]
    assert not gateway.fake.requests  # nothing was sent upstream
    [record] = gateway.wait_records(1)
    assert record.http_status == 400
    assert record.input_tokens == record.output_tokens == 0


def test_an_anthropic_client_gets_its_own_error_body(gateway: Gateway) -> None:
    set_rules("claude-fake", "temperature: refuse")
    with pytest.raises(anthropic.BadRequestError) as refused:
        gateway.anthropic().messages.create(
            model="claude-fake",
            max_tokens=10,
            extra_body={"temperature": 0.5},
            messages=[{"role": "user", "content": "Hi"}],
        )
    assert "'temperature'" in str(refused.value)
    assert not gateway.fake.requests


def test_without_the_parameter_a_refusing_model_answers(gateway: Gateway) -> None:
    set_rules("claude-fake", "temperature: refuse\nmetadata.user_id: drop")
    gateway.fake.script(Reply(text="fine"))
    reply = gateway.anthropic().messages.create(
        model="claude-fake",
        max_tokens=10,
        metadata={"user_id": "u-1"},
        messages=[{"role": "user", "content": "Hi"}],
    )
    assert reply.content[0].text == "fine"  # type: ignore[union-attr]
    assert sent(gateway).get("metadata", {}).get("user_id") is None  # a nested path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("temperature", "expected 'parameter: action'"),
        ("temperature: remove", "unknown action 'remove'"),
        ("max_tokens: rename", "rename needs the new name"),
        ("top_p: fix one", "fix needs a JSON value"),
        ("temperature: drop now", "drop takes no argument"),
        ("temperature: drop\ntemperature: refuse", "line 2: temperature already has a rule"),
        ("tem perature: drop", "is not a parameter name"),
    ],
)
def test_bad_rules_say_which_line_and_why(text: str, message: str) -> None:
    with pytest.raises(params.RuleError, match=message):
        params.parse_text(text)


def test_an_admin_sets_rules_in_the_console_and_the_next_request_follows_them(
    gateway: Gateway, carol: User
) -> None:
    model = CatalogModel.objects.get(name="gpt-fake")
    client = Client()
    client.force_login(carol)
    url = reverse("console:model", args=[model.pk])
    form = {
        "display_name": "",
        "description": "",
        "context_window": model.context_window,
        "max_output_tokens": model.max_output_tokens,
        "supports_chat": "on",
        "supports_tools": "on",
        "supports_vision": "on",
    }
    refused = client.post(url, {**form, "param_rules": "temperature: delete"})
    assert refused.status_code == 400
    assert "line 1: unknown action" in refused.content.decode()
    saved = client.post(url, {**form, "param_rules": "temperature: drop", "fold_system": "on"})
    assert saved.status_code == 302
    model.refresh_from_db()
    assert model.param_rules == [{"param": "temperature", "action": "drop"}]
    assert model.fold_system
    assert "temperature: drop" in client.get(url).content.decode()
    gateway.fake.script(Reply(text="ok"))
    gateway.openai().chat.completions.create(
        model="gpt-fake", messages=[{"role": "user", "content": "x"}], temperature=1
    )
    assert "temperature" not in sent(gateway)


def test_the_model_command_sets_shows_and_clears_rules(gateway: Gateway) -> None:
    out = io.StringIO()
    call_command(
        "model",
        "rules",
        "gpt-fake",
        "--rule",
        "temperature: drop",
        "--rule",
        'reasoning_effort: fix "low"',
        "--fold-system",
        stdout=out,
    )
    assert 'reasoning_effort: fix "low"' in out.getvalue()
    model = CatalogModel.objects.get(name="gpt-fake")
    assert model.fold_system
    assert params.from_json(model.param_rules)[1] == params.Rule("reasoning_effort", "fix", "low")
    with pytest.raises(CommandError, match="rule 1: unknown action"):
        call_command("model", "rules", "gpt-fake", "--rule", "x: nope")
    call_command("model", "rules", "gpt-fake", "--clear", stdout=io.StringIO())
    assert CatalogModel.objects.get(name="gpt-fake").param_rules == []
