"""Reasoning through the live gateway, with the official SDKs as clients.

Anthropic ``thinking`` reaches Anthropic clients of Anthropic upstreams intact (signed
blocks, redacted blocks, thinking and signature deltas); other directions get the
reasoning in their own terms: ``reasoning_content`` for OpenAI clients (as DeepSeek
sends it), ``thinking`` blocks for Anthropic clients, reasoning tokens in the usage of
every dialect.  On the request side an effort becomes a budget and back.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from chatapp.models import CatalogModel
from chatapp.relay import tokens
from tests.fake_gemini import FakeGemini, GeminiReply, fake_gemini  # noqa: F401 - fixture
from tests.fake_upstream import THINKING_SIGNATURE, Reply
from tests.gateway import Gateway
from tests.sse import parse_sse

USER = [{"role": "user", "content": "What is 17 * 23?"}]
THINKING = "17 times 20 is 340, plus 17 times 3 is 51: 391."


def sent_body(gateway: Gateway) -> dict[str, Any]:
    body = gateway.fake.requests[-1].json
    assert isinstance(body, dict)
    return body


# --- Anthropic clients of Anthropic upstreams: everything passes through intact ---


def test_thinking_passes_through_intact_to_an_anthropic_client(gateway: Gateway) -> None:
    # Given: Claude thinks (a signed block and a redacted one) before it answers
    gateway.fake.script(
        Reply(text="391.", reasoning=THINKING, redacted_thinking="ZW5jcnlwdGVk", output_tokens=90)
    )
    # When: an Anthropic client asks with a thinking budget
    message = gateway.anthropic().messages.create(
        model="claude-fake",
        max_tokens=4000,
        thinking={"type": "enabled", "budget_tokens": 2048},
        messages=USER,  # type: ignore[arg-type]
    )
    # Then: the upstream got the thinking parameter untouched
    assert sent_body(gateway)["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert sent_body(gateway)["max_tokens"] == 4000
    # and the client gets every block as Claude sent it, signature included
    assert [block.type for block in message.content] == ["thinking", "redacted_thinking", "text"]
    thinking, redacted, text = message.content
    assert (thinking.thinking, thinking.signature) == (THINKING, THINKING_SIGNATURE)  # type: ignore[union-attr]
    assert redacted.data == "ZW5jcnlwdGVk"  # type: ignore[union-attr]
    assert text.text == "391."  # type: ignore[union-attr]
    # and the thinking tokens are billed as the output they are part of
    [record] = gateway.wait_records(1)
    assert record.output_tokens == 90


def test_thinking_and_signature_deltas_stream_through_intact(gateway: Gateway) -> None:
    gateway.fake.script(Reply(text="391.", reasoning=THINKING, redacted_thinking="cmVk"))
    with gateway.anthropic().messages.stream(
        model="claude-fake",
        max_tokens=4000,
        thinking={"type": "enabled", "budget_tokens": 2048},
        messages=USER,  # type: ignore[arg-type]
    ) as stream:
        kinds = [event.type for event in stream]
        message = stream.get_final_message()
    assert "thinking" in kinds
    assert "signature" in kinds
    assert [block.type for block in message.content] == ["thinking", "redacted_thinking", "text"]
    assert message.content[0].thinking == THINKING  # type: ignore[union-attr]
    assert message.content[0].signature == THINKING_SIGNATURE  # type: ignore[union-attr]
    assert message.content[1].data == "cmVk"  # type: ignore[union-attr]
    assert sent_body(gateway)["thinking"] == {"type": "enabled", "budget_tokens": 2048}


def test_the_raw_stream_is_the_upstreams_own_events(gateway: Gateway) -> None:
    gateway.fake.script(Reply(text="ok", reasoning="hmm yes"))
    response = httpx.post(
        gateway.url + "/v1/messages",
        headers={"x-api-key": gateway.key, "anthropic-version": "2023-06-01"},
        json={
            "model": "claude-fake",
            "max_tokens": 2000,
            "stream": True,
            "thinking": {"type": "enabled", "budget_tokens": 1024},
            "messages": USER,
        },
    )
    deltas = [
        data["delta"]
        for name, data in parse_sse(response.content)
        if name == "content_block_delta" and data["index"] == 0
    ]
    assert deltas == [
        {"type": "thinking_delta", "thinking": "hmm"},
        {"type": "thinking_delta", "thinking": " yes"},
        {"type": "signature_delta", "signature": THINKING_SIGNATURE},
    ]


def test_thinking_blocks_replayed_in_history_reach_an_anthropic_upstream(gateway: Gateway) -> None:
    history: list[dict[str, Any]] = [
        *USER,
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": THINKING, "signature": THINKING_SIGNATURE},
                {"type": "redacted_thinking", "data": "cmVk"},
                {"type": "text", "text": "391."},
            ],
        },
        {"role": "user", "content": "And 391 / 17?"},
    ]
    gateway.anthropic().messages.create(
        model="claude-fake",
        max_tokens=4000,
        thinking={"type": "enabled", "budget_tokens": 2048},
        messages=history,  # type: ignore[arg-type]
    )
    assert sent_body(gateway)["messages"][1] == history[1]


# --- Reasoning from other upstreams, in each client's terms ---


def test_an_openai_client_gets_reasoning_content_from_an_anthropic_upstream(
    gateway: Gateway,
) -> None:
    gateway.fake.script(Reply(text="391.", reasoning=THINKING, redacted_thinking="cmVk"))
    completion = gateway.openai().chat.completions.create(model="claude-fake", messages=USER)  # type: ignore[arg-type]
    message = completion.choices[0].message
    assert message.content == "391."
    assert message.reasoning_content == THINKING  # type: ignore[attr-defined]


def test_an_openai_stream_gets_reasoning_content_deltas_before_the_answer(
    gateway: Gateway,
) -> None:
    gateway.fake.script(Reply(text="It is 391.", reasoning=THINKING))
    chunks = list(
        gateway.openai().chat.completions.create(
            model="claude-fake",
            messages=USER,  # type: ignore[arg-type]
            stream=True,
        )
    )
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    reasoning = [getattr(delta, "reasoning_content", None) for delta in deltas]
    assert "".join(piece for piece in reasoning if piece) == THINKING
    assert "".join(delta.content or "" for delta in deltas) == "It is 391."
    # All the reasoning comes before the first word of the answer.
    first_text = next(index for index, delta in enumerate(deltas) if delta.content)
    assert all(piece is None for piece in reasoning[first_text:])


def test_an_anthropic_client_gets_thinking_blocks_from_a_deepseek_style_upstream(
    gateway: Gateway,
) -> None:
    # Given: an OpenAI-compatible upstream that reasons as DeepSeek does
    gateway.fake.script(
        Reply(text="391.", reasoning=THINKING, reasoning_tokens=40, output_tokens=42)
    )
    # When: an Anthropic client asks, with a thinking budget
    message = gateway.anthropic().messages.create(
        model="gpt-fake",
        max_tokens=4000,
        thinking={"type": "enabled", "budget_tokens": 5000},
        messages=USER,  # type: ignore[arg-type]
    )
    # Then: the budget was asked as an effort
    assert sent_body(gateway)["reasoning_effort"] == "medium"
    assert "thinking" not in sent_body(gateway)
    # and the reasoning is an (unsigned) thinking block before the text
    assert [block.type for block in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == THINKING  # type: ignore[union-attr]
    assert message.content[0].signature == ""  # type: ignore[union-attr]
    assert message.usage.output_tokens == 42
    [record] = gateway.wait_records(1)
    assert record.output_tokens == 42  # reasoning included, billed as output


def test_an_anthropic_stream_gets_thinking_deltas_from_a_deepseek_style_upstream(
    gateway: Gateway,
) -> None:
    gateway.fake.script(Reply(text="It is 391.", reasoning=THINKING))
    with gateway.anthropic().messages.stream(
        model="gpt-fake",
        max_tokens=4000,
        messages=USER,  # type: ignore[arg-type]
    ) as stream:
        thinking = "".join(event.thinking for event in stream if event.type == "thinking")
        message = stream.get_final_message()
    assert thinking == THINKING
    assert [block.type for block in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == THINKING  # type: ignore[union-attr]
    assert message.content[1].text == "It is 391."  # type: ignore[union-attr]


def test_reasoning_tokens_reach_openai_and_responses_clients(gateway: Gateway) -> None:
    reply = Reply(text="391.", reasoning=THINKING, reasoning_tokens=40, output_tokens=42)
    gateway.fake.script(reply, reply)
    # An OpenAI client of an OpenAI-compatible upstream: the upstream's own body.
    completion = gateway.openai().chat.completions.create(model="gpt-fake", messages=USER)  # type: ignore[arg-type]
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 42
    assert completion.usage.completion_tokens_details.reasoning_tokens == 40  # type: ignore[union-attr]
    assert completion.choices[0].message.reasoning_content == THINKING  # type: ignore[attr-defined]
    # A Responses client: translated, the reasoning a reasoning item before the message,
    # reasoning tokens in output_tokens_details.
    response = gateway.openai().responses.create(model="gpt-fake", input="What is 17 * 23?")
    assert response.output_text == "391."
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output[0].summary[0].text == THINKING  # type: ignore[union-attr]
    assert response.usage is not None
    assert response.usage.output_tokens == 42
    assert response.usage.output_tokens_details.reasoning_tokens == 40
    for record in gateway.wait_records(2):
        assert record.output_tokens == 42


def test_a_streamed_openai_to_anthropic_translation_counts_reasoning_tokens(
    gateway: Gateway,
) -> None:
    gateway.fake.script(Reply(text="391.", reasoning=THINKING, reasoning_tokens=7))
    chunks = list(
        gateway.openai().chat.completions.create(
            model="claude-fake",
            messages=USER,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    # Anthropic reports no reasoning tokens of its own: they are in output_tokens, not apart.
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.completion_tokens_details.reasoning_tokens == 0  # type: ignore[union-attr]


def test_reasoning_is_the_first_token_and_is_estimated_when_usage_is_missing(
    gateway: Gateway,
) -> None:
    # Given: a slow upstream that thinks for a while and reports no usage
    thinking = "one two three four five six seven eight"
    gateway.fake.script(
        Reply(text="Done.", reasoning=thinking, include_usage=False, chunk_delay=0.15)
    )
    # When: an OpenAI client streams it (translated, so the gateway renders each event)
    chunks = list(
        gateway.openai().chat.completions.create(
            model="claude-fake",
            messages=USER,  # type: ignore[arg-type]
            stream=True,
        )
    )
    assert chunks
    # Then: the first reasoning piece was the first token: relayed as it came, not held
    # back until the answer began
    [record] = gateway.wait_records(1)
    assert record.ttft_ms is not None
    assert record.latency_ms is not None
    assert record.ttft_ms < 1000 <= record.latency_ms
    # and the estimate of the output counts the reasoning, billed as output
    assert record.estimated is True
    assert record.output_tokens == tokens.estimate_text(thinking + "Done.")


def test_a_responses_stream_shows_the_reasoning_as_a_reasoning_item(gateway: Gateway) -> None:
    gateway.fake.script(Reply(text="It is 391.", reasoning=THINKING))
    with gateway.openai().responses.stream(
        model="claude-fake", input="What is 17 * 23?", reasoning={"effort": "low"}
    ) as stream:
        deltas = [
            event.delta for event in stream if event.type == "response.reasoning_summary_text.delta"
        ]
        response = stream.get_final_response()
    assert "".join(deltas) == THINKING
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output[0].summary[0].text == THINKING  # type: ignore[union-attr]
    assert response.output_text == "It is 391."
    assert sent_body(gateway)["thinking"] == {"type": "enabled", "budget_tokens": 1024}


def test_a_reply_of_reasoning_only_still_has_its_empty_message(gateway: Gateway) -> None:
    # Streamed or not, a Responses answer is one message, empty if the model only thought.
    gateway.fake.script(Reply(text="", reasoning=THINKING), Reply(text="", reasoning=THINKING))
    with gateway.openai().responses.stream(model="gpt-fake", input="Think only") as stream:
        streamed = stream.get_final_response()
    whole = gateway.openai().responses.create(model="gpt-fake", input="Think only")
    for response in (streamed, whole):
        assert [item.type for item in response.output] == ["reasoning", "message"]
        assert response.output_text == ""


# --- The request side: effort ↔ budget ---


def test_reasoning_effort_passes_through_to_an_openai_upstream(gateway: Gateway) -> None:
    gateway.openai().chat.completions.create(
        model="gpt-fake",
        messages=USER,  # type: ignore[arg-type]
        reasoning_effort="high",
    )
    assert sent_body(gateway)["reasoning_effort"] == "high"


def test_reasoning_effort_becomes_a_thinking_budget_at_anthropic(gateway: Gateway) -> None:
    # A max_tokens at or under the budget is kept for the answer, on top of the budget;
    # a changed temperature does not go with thinking and is left out.
    CatalogModel.objects.filter(name="claude-fake").update(max_output_tokens=32000)
    gateway.openai().chat.completions.create(
        model="claude-fake",
        messages=USER,  # type: ignore[arg-type]
        reasoning_effort="medium",
        max_completion_tokens=1000,
        temperature=0.3,
        top_p=0.5,
    )
    body = sent_body(gateway)
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 4096}
    assert body["max_tokens"] == 5096
    assert "temperature" not in body
    assert body["top_p"] == 0.95  # the least Anthropic takes with thinking
    # Low is Anthropic's smallest budget; a large max_tokens stays as it was.
    gateway.openai().chat.completions.create(
        model="claude-fake",
        messages=USER,  # type: ignore[arg-type]
        reasoning_effort="low",
        max_completion_tokens=3000,
    )
    body = sent_body(gateway)
    assert (body["thinking"]["budget_tokens"], body["max_tokens"]) == (1024, 3000)
    # Minimal (512 elsewhere) is raised to the 1024 Anthropic takes at least.
    gateway.openai().chat.completions.create(
        model="claude-fake",
        messages=USER,  # type: ignore[arg-type]
        reasoning_effort="minimal",
        max_completion_tokens=3000,
    )
    assert sent_body(gateway)["thinking"]["budget_tokens"] == 1024


def test_a_budget_never_passes_the_models_output_limit(gateway: Gateway) -> None:
    CatalogModel.objects.filter(name="claude-fake").update(max_output_tokens=8000)
    gateway.openai().chat.completions.create(
        model="claude-fake",
        messages=USER,  # type: ignore[arg-type]
        reasoning_effort="high",
    )
    body = sent_body(gateway)
    assert body["max_tokens"] == 8000
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 7999}


def test_no_thinking_for_none_or_a_forced_tool(gateway: Gateway) -> None:
    client = gateway.openai()
    client.chat.completions.create(model="claude-fake", messages=USER, reasoning_effort="none")  # type: ignore[arg-type]
    assert "thinking" not in sent_body(gateway)
    tool = {
        "type": "function",
        "function": {"name": "calc", "parameters": {"type": "object", "properties": {}}},
    }
    client.chat.completions.create(
        model="claude-fake",
        messages=USER,  # type: ignore[arg-type]
        reasoning_effort="high",
        tools=[tool],  # type: ignore[list-item]
        tool_choice="required",
    )
    assert "thinking" not in sent_body(gateway)  # Anthropic refuses thinking with a forced tool


@pytest.mark.parametrize(
    ("budget", "effort"),
    # Each effort's own budget maps back to it.
    [(1024, "low"), (4095, "low"), (4096, "medium"), (16383, "medium"), (16384, "high")],
)
def test_a_thinking_budget_becomes_an_effort_at_an_openai_upstream(
    gateway: Gateway, budget: int, effort: str
) -> None:
    gateway.anthropic().messages.create(
        model="gpt-fake",
        max_tokens=4000,
        thinking={"type": "enabled", "budget_tokens": budget},
        messages=USER,  # type: ignore[arg-type]
    )
    assert sent_body(gateway)["reasoning_effort"] == effort


def test_thinking_disabled_asks_no_effort(gateway: Gateway) -> None:
    gateway.anthropic().messages.create(
        model="gpt-fake",
        max_tokens=100,
        thinking={"type": "disabled"},
        messages=USER,  # type: ignore[arg-type]
    )
    assert "reasoning_effort" not in sent_body(gateway)


def test_a_responses_reasoning_effort_reaches_an_openai_upstream(gateway: Gateway) -> None:
    gateway.openai().responses.create(
        model="gpt-fake", input="What is 17 * 23?", reasoning={"effort": "low"}
    )
    assert sent_body(gateway)["reasoning_effort"] == "low"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
        ({"reasoning_effort": 3}, "reasoning_effort"),
    ],
)
def test_an_unknown_effort_is_refused_naming_it(
    gateway: Gateway, body: dict[str, Any], param: str
) -> None:
    response = httpx.post(
        gateway.base_url + "/chat/completions",
        headers={"authorization": f"Bearer {gateway.key}"},
        json={"model": "claude-fake", "messages": USER, **body},
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_an_enabled_thinking_without_a_budget_is_refused(gateway: Gateway) -> None:
    response = httpx.post(
        gateway.url + "/v1/messages",
        headers={"x-api-key": gateway.key, "anthropic-version": "2023-06-01"},
        json={
            "model": "gpt-fake",
            "max_tokens": 100,
            "thinking": {"type": "enabled"},
            "messages": USER,
        },
    )
    assert response.status_code == 400
    assert "thinking.budget_tokens" in response.json()["error"]["message"]


# --- Gemini ---


@pytest.fixture
def gem(gateway: Gateway, fake_gemini: FakeGemini) -> Gateway:  # noqa: F811
    from chatapp.models import Provider

    provider = Provider(name="fake-gemini", type="gemini", base_url=fake_gemini.url, timeout=5)
    provider.api_key = "AIza-fake"
    provider.save()
    gateway.add_model("gemini-fake", provider, "gemini-2.5-flash", max_output_tokens=8192)
    gateway.gemini = fake_gemini  # type: ignore[attr-defined]
    return gateway


def gemini_body(gateway: Gateway) -> dict[str, Any]:
    body = gateway.gemini.requests[-1].json  # type: ignore[attr-defined]
    assert isinstance(body, dict)
    return body


def test_effort_and_budget_become_a_gemini_thinking_budget(gem: Gateway) -> None:
    gem.openai().chat.completions.create(
        model="gemini-fake",
        messages=USER,  # type: ignore[arg-type]
        reasoning_effort="high",
    )
    assert gemini_body(gem)["generationConfig"]["thinkingConfig"] == {
        "thinkingBudget": 16384,
        "includeThoughts": True,
    }
    gem.anthropic().messages.create(
        model="gemini-fake",
        max_tokens=4000,
        thinking={"type": "disabled"},
        messages=USER,  # type: ignore[arg-type]
    )
    assert gemini_body(gem)["generationConfig"]["thinkingConfig"] == {"thinkingBudget": 0}
    gem.openai().chat.completions.create(model="gemini-fake", messages=USER)  # type: ignore[arg-type]
    assert "generationConfig" not in gemini_body(gem)


def test_gemini_thoughts_stream_as_reasoning(gem: Gateway) -> None:
    gem.gemini.script(  # type: ignore[attr-defined]
        GeminiReply(text="It is 391.", thoughts=THINKING, thoughts_tokens=30, output_tokens=4)
    )
    chunks = list(
        gem.openai().chat.completions.create(
            model="gemini-fake",
            messages=USER,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == THINKING
    assert "".join(delta.content or "" for delta in deltas) == "It is 391."
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.completion_tokens == 34
    assert usage.completion_tokens_details.reasoning_tokens == 30  # type: ignore[union-attr]
