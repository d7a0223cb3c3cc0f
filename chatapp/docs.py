"""``/docs/``: our API guide, written from the live catalog and the reader's own keys.

The seed guides (``../shared/seeds/``) are hand-written and drift from what their
gateways do.  This one is built on every request from what the relay really uses:
the enabled catalog (models, capabilities, context windows, prices in force), the
reader's keys (allowed models, limits, current use from ``keys.limiter.usage``, the
numbers of ``manage.py key usage``), the errors the relay really raises
(``chatapp.relay.openapi.raised_errors``) and the base URL clients reach.  The
samples are filled with that base URL and a model the reader may use, read the key
from ``SWITCHBOARD_API_KEY`` (never a real secret on the page), and are run as they
stand against a live gateway by ``tests/chatapp/test_docs.py``.

Signed-in users see their own models and limits.  With ``SWITCHBOARD_PUBLIC_DOCS``
anonymous visitors see the guide too, with the whole enabled catalog and nothing
personal.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.contrib.auth.views import redirect_to_login
from django.db.models import Q
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import reverse
from django.utils import timezone
from django.utils.functional import Promise
from django.utils.translation import gettext_lazy as _
from django.views.decorators.http import require_GET
from redis.exceptions import RedisError

from chatapp.models import CatalogModel
from chatapp.relay.openapi import RaisedError, public_base_url, raised_errors
from keys import limiter
from keys.exceptions import LimiterUnavailable
from keys.models import ApiKey, ModelPrice
from keys.pricing import Price, price_at

KEY_VARIABLE = "SWITCHBOARD_API_KEY"
# A 1x1 PNG: the vision samples send an image inline, so they run anywhere.
PIXEL = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="


# -- the reader's models -----------------------------------------------------------------------


@dataclass
class ModelRow:
    name: str
    display_name: str
    context_window: int
    max_output_tokens: int
    chat: bool
    vision: bool
    tools: bool
    embeddings: bool
    price: Price | None

    @property
    def capabilities(self) -> list[Promise]:
        names = [
            (self.chat, _("chat")),
            (self.vision, _("vision")),
            (self.tools, _("tools")),
            (self.embeddings, _("embeddings")),
        ]
        return [label for on, label in names if on]


def reader_keys(user: Any) -> list[ApiKey]:
    """The reader's API keys that work now (not the browser chat's own key)."""
    if not user.is_authenticated:
        return []
    now = timezone.now()
    return list(
        ApiKey.objects.filter(user=user, is_web_key=False, revoked_at__isnull=True, enabled=True)
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))
        .order_by("created_at", "id")
    )


def allowed_names(keys: list[ApiKey]) -> set[str] | None:
    """The model names the reader's keys may use; None: every enabled model.

    With no working key the reader sees the whole catalog: a new key allows every
    model unless an admin narrows it.
    """
    if not keys or any(not key.allowed_models for key in keys):
        return None
    return {name for key in keys for name in key.allowed_models}


def model_rows(allowed: set[str] | None) -> list[ModelRow]:
    """The enabled models ``allowed`` names, with the price in force now."""
    models = CatalogModel.objects.filter(enabled=True).order_by("name")
    if allowed is not None:
        models = models.filter(name__in=allowed)
    models_list = list(models)
    prices: dict[int, list[Price]] = {}
    rows = ModelPrice.objects.filter(model__in=models_list).order_by("-effective_from", "-id")
    for row in rows:
        prices.setdefault(row.model_id, []).append(
            Price(
                row.input_per_mtok,
                row.output_per_mtok,
                row.cached_input_per_mtok,
                row.currency,
                row.effective_from,
            )
        )
    now = timezone.now()
    return [
        ModelRow(
            name=model.name,
            display_name=model.label,
            context_window=model.context_window,
            max_output_tokens=model.max_output_tokens,
            chat=model.supports_chat,
            vision=model.supports_vision,
            tools=model.supports_tools,
            embeddings=model.supports_embeddings,
            price=price_at(tuple(prices.get(model.pk, ())), now),
        )
        for model in models_list
    ]


def money(amount: Decimal | None) -> str:
    """A price or budget without trailing zeros (``0.15``, ``3``), never in exponent form."""
    return "" if amount is None else f"{amount.normalize():f}"


# -- the reader's limits -----------------------------------------------------------------------


@dataclass
class LimitRow:
    label: Promise
    limit: str  # "" means no limit
    used: str  # "" means not counted here
    resets_at: datetime | None = None
    note: Promise | str = ""


@dataclass
class KeyLimits:
    key: ApiKey
    rows: list[LimitRow] = field(default_factory=list)
    unavailable: bool = False  # the limiter's store could not be read


def _number(value: Any) -> str:
    return "" if value is None else str(value)


def _when(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def key_limits(key: ApiKey) -> KeyLimits:
    """One key's limits in the seeds' dimensions, each with its current use and reset."""
    limits = key.limits
    try:
        report: dict[str, Any] | None = limiter.usage(key_id=key.pk, limits=limits)
    except (LimiterUnavailable, RedisError):
        report = None
    period = key.get_budget_period_display()
    currency = settings.SWITCHBOARD_CURRENCY

    def used(name: str, part: str = "used") -> str:
        return "" if report is None else _number(report[name][part])

    def resets(name: str) -> datetime | None:
        return None if report is None else _when(report[name]["resets_at"])

    rows = [
        LimitRow(_("Requests per minute"), _number(limits.rpm), used("rpm"), resets("rpm")),
        LimitRow(_("Requests per day"), _number(limits.rpd), used("rpd"), resets("rpd")),
        LimitRow(_("Tokens per minute"), _number(limits.tpm), used("tpm"), resets("tpm")),
        LimitRow(_("Tokens per day"), _number(limits.tpd), used("tpd"), resets("tpd")),
        LimitRow(
            _("Concurrent requests"), _number(limits.concurrency), used("concurrency", "in_flight")
        ),
        LimitRow(
            _("Max output tokens per request"),
            _number(limits.max_output_tokens),
            "",
            note=_("larger max_tokens is lowered to it")
            if limits.clamp_max_tokens
            else _("larger max_tokens is refused"),
        ),
    ]
    token_spent = ""
    money_spent = ""
    if report is not None:
        tokens, cash = report["token_budget"], report["money_budget"]
        token_spent = str(int(tokens["spent"]) + int(tokens["reserved"] or 0))
        money_spent = money(Decimal(cash["spent"]) + Decimal(cash["reserved"] or 0))
    rows += [
        LimitRow(
            _("Token budget"),
            _number(limits.token_budget),
            token_spent,
            resets("token_budget"),
            note=period,
        ),
        LimitRow(
            _("Money budget"),
            f"{money(limits.money_budget)} {currency}" if limits.money_budget is not None else "",
            f"{money_spent} {currency}" if money_spent else "",
            resets("money_budget"),
            note=period,
        ),
    ]
    return KeyLimits(key=key, rows=rows, unavailable=report is None)


# -- samples -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    id: str
    task: str
    title: str  # the SDK or tool, not translated
    run: str  # how the tests run it: python, node or curl
    code: str


@dataclass
class Task:
    id: str
    title: Promise
    note: Promise | str
    samples: list[Sample]


def _s(value: str) -> str:
    """A string literal valid in Python and JavaScript (and JSON)."""
    return json.dumps(value, ensure_ascii=False)


def _curl(url: str, headers: list[str], body: dict[str, Any], *, stream: bool = False) -> str:
    lines = [f"curl {'-N ' if stream else ''}{url}"]
    lines += [f'  -H "{header}"' for header in headers]
    data = json.dumps(body, ensure_ascii=False, indent=2).replace("\n", "\n  ")
    lines.append(f"  -d {shlex.quote(data)}")
    return " \\\n".join(lines)


def _py_openai(base: str) -> str:
    return (
        "import os\n\nfrom openai import OpenAI\n\n"
        f'client = OpenAI(base_url={_s(base + "/v1")}, api_key=os.environ["{KEY_VARIABLE}"])\n'
    )


def _py_anthropic(base: str) -> str:
    return (
        "import os\n\nimport anthropic\n\n"
        f'client = anthropic.Anthropic(base_url={_s(base)}, api_key=os.environ["{KEY_VARIABLE}"])\n'
    )


def _node_openai(base: str) -> str:
    return (
        'import OpenAI from "openai";\n\n'
        f"const client = new OpenAI({{ baseURL: {_s(base + '/v1')}, "
        f"apiKey: process.env.{KEY_VARIABLE} }});\n"
    )


def _node_anthropic(base: str) -> str:
    return (
        'import Anthropic from "@anthropic-ai/sdk";\n\n'
        f"const client = new Anthropic({{ baseURL: {_s(base)}, "
        f"apiKey: process.env.{KEY_VARIABLE} }});\n"
    )


HELLO = "Say hello in one sentence."
WEATHER = "What is the weather in Paris?"
DESCRIBE = "What is in this image?"
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}


def _chat_samples(base: str, model: str) -> list[Sample]:
    m = _s(model)
    bearer = [f"Authorization: Bearer ${KEY_VARIABLE}", "Content-Type: application/json"]
    return [
        Sample(
            "chat-python",
            "chat",
            "Python · openai",
            "python",
            _py_openai(base) + "reply = client.chat.completions.create(\n"
            f"    model={m},\n"
            f'    messages=[{{"role": "user", "content": {_s(HELLO)}}}],\n'
            ")\nprint(reply.choices[0].message.content)\n",
        ),
        Sample(
            "chat-node",
            "chat",
            "Node · openai",
            "node",
            _node_openai(base) + "const reply = await client.chat.completions.create({\n"
            f"  model: {m},\n"
            f'  messages: [{{ role: "user", content: {_s(HELLO)} }}],\n'
            "});\nconsole.log(reply.choices[0].message.content);\n",
        ),
        Sample(
            "chat-curl",
            "chat",
            "curl",
            "curl",
            _curl(
                f"{base}/v1/chat/completions",
                bearer,
                {"model": model, "messages": [{"role": "user", "content": HELLO}]},
            ),
        ),
    ]


def _stream_samples(base: str, model: str) -> list[Sample]:
    m = _s(model)
    bearer = [f"Authorization: Bearer ${KEY_VARIABLE}", "Content-Type: application/json"]
    return [
        Sample(
            "stream-python",
            "stream",
            "Python · openai",
            "python",
            _py_openai(base) + "stream = client.chat.completions.create(\n"
            f"    model={m},\n"
            f'    messages=[{{"role": "user", "content": {_s(HELLO)}}}],\n'
            "    stream=True,\n"
            '    stream_options={"include_usage": True},\n'
            ")\nfor chunk in stream:\n"
            "    if chunk.choices and chunk.choices[0].delta.content:\n"
            '        print(chunk.choices[0].delta.content, end="", flush=True)\n'
            "    if chunk.usage:\n"
            '        print("\\n", chunk.usage.total_tokens, "tokens")\n',
        ),
        Sample(
            "stream-node",
            "stream",
            "Node · openai",
            "node",
            _node_openai(base) + "const stream = await client.chat.completions.create({\n"
            f"  model: {m},\n"
            f'  messages: [{{ role: "user", content: {_s(HELLO)} }}],\n'
            "  stream: true,\n"
            "});\nfor await (const chunk of stream) {\n"
            '  process.stdout.write(chunk.choices[0]?.delta?.content ?? "");\n'
            '}\nprocess.stdout.write("\\n");\n',
        ),
        Sample(
            "stream-curl",
            "stream",
            "curl",
            "curl",
            _curl(
                f"{base}/v1/chat/completions",
                bearer,
                {"model": model, "messages": [{"role": "user", "content": HELLO}], "stream": True},
                stream=True,
            ),
        ),
    ]


def _vision_samples(base: str, model: str) -> list[Sample]:
    m = _s(model)
    url = f"data:image/png;base64,{PIXEL}"
    bearer = [f"Authorization: Bearer ${KEY_VARIABLE}", "Content-Type: application/json"]
    return [
        Sample(
            "vision-python",
            "vision",
            "Python · openai",
            "python",
            _py_openai(base) + "# An https:// URL works too; a data: URL sends the image inline.\n"
            f"image = {_s(url)}\n"
            "reply = client.chat.completions.create(\n"
            f"    model={m},\n"
            "    messages=[\n"
            "        {\n"
            '            "role": "user",\n'
            '            "content": [\n'
            f'                {{"type": "text", "text": {_s(DESCRIBE)}}},\n'
            '                {"type": "image_url", "image_url": {"url": image}},\n'
            "            ],\n"
            "        }\n"
            "    ],\n"
            ")\nprint(reply.choices[0].message.content)\n",
        ),
        Sample(
            "vision-node",
            "vision",
            "Node · openai",
            "node",
            _node_openai(base) + f"const image = {_s(url)};\n"
            "const reply = await client.chat.completions.create({\n"
            f"  model: {m},\n"
            "  messages: [\n"
            "    {\n"
            '      role: "user",\n'
            "      content: [\n"
            f'        {{ type: "text", text: {_s(DESCRIBE)} }},\n'
            '        { type: "image_url", image_url: { url: image } },\n'
            "      ],\n"
            "    },\n"
            "  ],\n"
            "});\nconsole.log(reply.choices[0].message.content);\n",
        ),
        Sample(
            "vision-curl",
            "vision",
            "curl",
            "curl",
            _curl(
                f"{base}/v1/chat/completions",
                bearer,
                {
                    "model": model,
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "text", "text": DESCRIBE},
                                {"type": "image_url", "image_url": {"url": url}},
                            ],
                        }
                    ],
                },
            ),
        ),
    ]


def _tools_samples(base: str, model: str) -> list[Sample]:
    m = _s(model)
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": WEATHER_SCHEMA,
        },
    }
    tool_py = json.dumps(tool, indent=4).replace("\n", "\n    ")
    tool_js = json.dumps(tool, indent=2).replace("\n", "\n  ")
    bearer = [f"Authorization: Bearer ${KEY_VARIABLE}", "Content-Type: application/json"]
    return [
        Sample(
            "tools-python",
            "tools",
            "Python · openai",
            "python",
            _py_openai(base) + f"tools = [\n    {tool_py}\n]\n"
            "reply = client.chat.completions.create(\n"
            f"    model={m},\n"
            f'    messages=[{{"role": "user", "content": {_s(WEATHER)}}}],\n'
            "    tools=tools,\n"
            ")\nmessage = reply.choices[0].message\n"
            "for call in message.tool_calls or []:\n"
            "    print(call.function.name, call.function.arguments)\n"
            "print(message.content)\n",
        ),
        Sample(
            "tools-node",
            "tools",
            "Node · openai",
            "node",
            _node_openai(base) + f"const tools = [\n  {tool_js}\n];\n"
            "const reply = await client.chat.completions.create({\n"
            f"  model: {m},\n"
            f'  messages: [{{ role: "user", content: {_s(WEATHER)} }}],\n'
            "  tools,\n"
            "});\nconst message = reply.choices[0].message;\n"
            "for (const call of message.tool_calls ?? []) {\n"
            "  console.log(call.function.name, call.function.arguments);\n"
            "}\nconsole.log(message.content);\n",
        ),
        Sample(
            "tools-curl",
            "tools",
            "curl",
            "curl",
            _curl(
                f"{base}/v1/chat/completions",
                bearer,
                {
                    "model": model,
                    "messages": [{"role": "user", "content": WEATHER}],
                    "tools": [tool],
                },
            ),
        ),
    ]


def _embeddings_samples(base: str, model: str) -> list[Sample]:
    m = _s(model)
    bearer = [f"Authorization: Bearer ${KEY_VARIABLE}", "Content-Type: application/json"]
    texts = ["The first text", "The second text"]
    return [
        Sample(
            "embeddings-python",
            "embeddings",
            "Python · openai",
            "python",
            _py_openai(base) + "result = client.embeddings.create(\n"
            f"    model={m},\n"
            f"    input={json.dumps(texts)},\n"
            ")\nprint(len(result.data), len(result.data[0].embedding))\n",
        ),
        Sample(
            "embeddings-node",
            "embeddings",
            "Node · openai",
            "node",
            _node_openai(base) + "const result = await client.embeddings.create({\n"
            f"  model: {m},\n"
            f"  input: {json.dumps(texts)},\n"
            "});\nconsole.log(result.data.length, result.data[0].embedding.length);\n",
        ),
        Sample(
            "embeddings-curl",
            "embeddings",
            "curl",
            "curl",
            _curl(f"{base}/v1/embeddings", bearer, {"model": model, "input": texts}),
        ),
    ]


def _messages_samples(base: str, model: str, vision: str | None, tools: str | None) -> list[Sample]:
    m = _s(model)
    headers = [
        f"x-api-key: ${KEY_VARIABLE}",
        "anthropic-version: 2023-06-01",
        "Content-Type: application/json",
    ]
    text_out = '"".join(block.text for block in message.content if block.type == "text")'
    samples = [
        Sample(
            "messages-python",
            "messages",
            "Python · anthropic",
            "python",
            _py_anthropic(base) + "message = client.messages.create(\n"
            f"    model={m},\n"
            "    max_tokens=512,\n"
            '    system="You are brief.",\n'
            f'    messages=[{{"role": "user", "content": {_s(HELLO)}}}],\n'
            f")\nprint({text_out})\n",
        ),
        Sample(
            "messages-stream-python",
            "messages",
            "Python · anthropic · stream",
            "python",
            _py_anthropic(base) + "with client.messages.stream(\n"
            f"    model={m},\n"
            "    max_tokens=512,\n"
            f'    messages=[{{"role": "user", "content": {_s(HELLO)}}}],\n'
            ") as stream:\n"
            "    for text in stream.text_stream:\n"
            '        print(text, end="", flush=True)\n'
            "print()\n",
        ),
        Sample(
            "messages-node",
            "messages",
            "Node · @anthropic-ai/sdk",
            "node",
            _node_anthropic(base) + "const message = await client.messages.create({\n"
            f"  model: {m},\n"
            "  max_tokens: 512,\n"
            f'  messages: [{{ role: "user", content: {_s(HELLO)} }}],\n'
            "});\nconsole.log(\n"
            '  message.content.filter((block) => block.type === "text").map((block) => block.text).join(""),\n'
            ");\n",
        ),
        Sample(
            "messages-stream-node",
            "messages",
            "Node · @anthropic-ai/sdk · stream",
            "node",
            _node_anthropic(base) + "const stream = await client.messages.create({\n"
            f"  model: {m},\n"
            "  max_tokens: 512,\n"
            f'  messages: [{{ role: "user", content: {_s(HELLO)} }}],\n'
            "  stream: true,\n"
            "});\nfor await (const event of stream) {\n"
            '  if (event.type === "content_block_delta" && event.delta.type === "text_delta") {\n'
            "    process.stdout.write(event.delta.text);\n"
            '  }\n}\nprocess.stdout.write("\\n");\n',
        ),
        Sample(
            "messages-curl",
            "messages",
            "curl",
            "curl",
            _curl(
                f"{base}/v1/messages",
                headers,
                {
                    "model": model,
                    "max_tokens": 512,
                    "messages": [{"role": "user", "content": HELLO}],
                },
            ),
        ),
        Sample(
            "messages-stream-curl",
            "messages",
            "curl · stream",
            "curl",
            _curl(
                f"{base}/v1/messages",
                headers,
                {
                    "model": model,
                    "max_tokens": 512,
                    "messages": [{"role": "user", "content": HELLO}],
                    "stream": True,
                },
                stream=True,
            ),
        ),
    ]
    if vision:
        samples.append(
            Sample(
                "messages-vision-python",
                "messages",
                "Python · anthropic · vision",
                "python",
                _py_anthropic(base) + "message = client.messages.create(\n"
                f"    model={_s(vision)},\n"
                "    max_tokens=512,\n"
                "    messages=[\n"
                "        {\n"
                '            "role": "user",\n'
                '            "content": [\n'
                "                {\n"
                '                    "type": "image",\n'
                f'                    "source": {{"type": "base64", "media_type": "image/png", "data": {_s(PIXEL)}}},\n'
                "                },\n"
                f'                {{"type": "text", "text": {_s(DESCRIBE)}}},\n'
                "            ],\n"
                "        }\n"
                "    ],\n"
                f")\nprint({text_out})\n",
            )
        )
    if tools:
        samples.append(
            Sample(
                "messages-tools-python",
                "messages",
                "Python · anthropic · tools",
                "python",
                _py_anthropic(base) + "message = client.messages.create(\n"
                f"    model={_s(tools)},\n"
                "    max_tokens=512,\n"
                "    tools=[\n"
                "        {\n"
                '            "name": "get_weather",\n'
                '            "description": "Current weather in a city",\n'
                f'            "input_schema": {json.dumps(WEATHER_SCHEMA)},\n'
                "        }\n"
                "    ],\n"
                f'    messages=[{{"role": "user", "content": {_s(WEATHER)}}}],\n'
                ")\nfor block in message.content:\n"
                '    if block.type == "tool_use":\n'
                "        print(block.name, block.input)\n"
                '    elif block.type == "text":\n'
                "        print(block.text)\n",
            )
        )
    return samples


def _first(rows: list[ModelRow], capability: str) -> str | None:
    return next((row.name for row in rows if getattr(row, capability)), None)


def sample_tasks(base: str, rows: list[ModelRow]) -> list[Task]:
    """The samples, per task, filled with ``base`` and a model of ``rows`` that can do it."""
    chat = _first(rows, "chat")
    vision = _first(rows, "vision")
    tools = _first(rows, "tools")
    embeddings = _first(rows, "embeddings")
    none = _("No model you may use can do this yet.")
    return [
        Task("chat", _("Chat"), "" if chat else none, _chat_samples(base, chat) if chat else []),
        Task(
            "stream",
            _("Streaming"),
            _("Server-sent events: text arrives as it is written.") if chat else none,
            _stream_samples(base, chat) if chat else [],
        ),
        Task(
            "vision",
            _("Vision (images)"),
            "" if vision else none,
            _vision_samples(base, vision) if vision else [],
        ),
        Task(
            "tools",
            _("Tools (function calling)"),
            "" if tools else none,
            _tools_samples(base, tools) if tools else [],
        ),
        Task(
            "embeddings",
            _("Embeddings"),
            "" if embeddings else none,
            _embeddings_samples(base, embeddings) if embeddings else [],
        ),
        Task(
            "messages",
            _("Anthropic Messages API"),
            _("The same models, in Anthropic's format: /v1/messages with the x-api-key header.")
            if chat
            else none,
            _messages_samples(base, chat, vision, tools) if chat else [],
        ),
    ]


# -- errors ------------------------------------------------------------------------------------

# What each error the relay raises means here and what to do about it, by code (or by
# status for the errors without a code).  tests/chatapp/test_docs.py checks that every
# error in ``raised_errors()`` is explained and that nothing here is stale.
ERROR_HELP: dict[str, tuple[Promise, Promise]] = {
    "400": (
        _("The request is malformed in a way the gateway or the model's upstream cannot serve (e.g. n > 1 where only one choice is possible)."),
        _("Read the message: it names the field. Fix the request; retrying it unchanged fails again."),
    ),
    "invalid_json": (
        _("The body is not a JSON object (or has hostile nesting or numbers)."),
        _("Send valid JSON with Content-Type: application/json."),
    ),
    "invalid_string": (
        _("A string holds a NUL character or a lone surrogate."),
        _("Remove those characters from the text."),
    ),
    "invalid_value": (
        _("A field has the wrong type or a value out of range; the message names it (param)."),
        _("Fix that field, e.g. temperature between 0 and 2 (OpenAI) or 0 and 1 (Anthropic)."),
    ),
    "unsupported_parameter": (
        _("The model does not accept this parameter (its parameter rules refuse it); the message names the parameter and the model."),
        _("Leave the parameter out for this model, or ask an admin to drop or rename it in the model's rules."),
    ),
    "missing_required_parameter": (
        _("A required field (model, messages, input, max_tokens for Anthropic) is missing."),
        _("Add the field named in param."),
    ),
    "invalid_image_url": (
        _("An image URL is not http(s)/data:, or names a private or local address."),
        _("Send a public https:// URL, or the image inline as a data: URL (base64)."),
    ),
    "context_length_exceeded": (
        _("The input plus max_tokens does not fit the model's context window."),
        _("Shorten the conversation (drop or summarize old turns) or lower max_tokens; see the model table."),
    ),
    "max_tokens_exceeded": (
        _("max_tokens is above the model's max output or your key's limit."),
        _("Lower max_tokens to the limit in the model and limits tables."),
    ),
    "model_not_supported": (
        _("The model cannot do this endpoint (e.g. chat with an embeddings model)."),
        _("Pick a model with that capability in the model table."),
    ),
    "image_not_supported": (
        _("The request has images but the model has no vision."),
        _("Use a model marked vision, or send text only."),
    ),
    "tools_not_supported": (
        _("The request has tools but the model cannot call them."),
        _("Use a model marked tools, or leave tools out."),
    ),
    "unsupported_content": (
        _("The model's upstream cannot take a part of this request (e.g. an image type)."),
        _("Leave that part out or pick another model."),
    ),
    "unsupported_tool": (
        _("A tool type the model's upstream cannot take (only function tools translate)."),
        _("Use function tools, or a model served in the format of that tool."),
    ),
    "upstream_invalid_request": (
        _("The provider behind the model refused the request as invalid."),
        _("Read the message (it is the provider's), fix the request."),
    ),
    "missing_api_key": (
        _("No key was sent."),
        _("Send Authorization: Bearer <key> or x-api-key: <key>."),
    ),
    "invalid_api_key": (
        _("The key is unknown (mistyped, or never existed)."),
        _("Copy the key again; keys are shown once, so create a new one if it is lost."),
    ),
    "key_revoked": (
        _("The key was revoked."),
        _("Use another key or create a new one."),
    ),
    "key_disabled": (
        _("An admin disabled the key."),
        _("Ask an admin, or use another key."),
    ),
    "key_expired": (
        _("The key is past its expiry (a rotated key stops after its grace period)."),
        _("Use the key that replaced it, or create a new one."),
    ),
    "user_disabled": (
        _("The key's owner account is disabled."),
        _("Ask an admin."),
    ),
    "model_not_allowed": (
        _("This key may not use the model (its allowed models)."),
        _("Use a model listed in the model table, or ask an admin to allow it."),
    ),
    "model_not_found": (
        _("No enabled model has this name."),
        _("Use a name from the model table or GET /v1/models (names are case-sensitive)."),
    ),
    "unknown_url": (
        _("No API endpoint at this path."),
        _("Check the base URL: OpenAI SDKs end it in /v1, Anthropic SDKs do not."),
    ),
    "405": (
        _("Wrong HTTP method (e.g. GET on a POST endpoint)."),
        _("Use the method in the OpenAPI document."),
    ),
    "request_too_large": (
        _("The body is over the size limit."),
        _("Send smaller or fewer images (downscale them, or use URLs)."),
    ),
    "rate_limit_exceeded": (
        _("Your key's requests or tokens per minute/day, or its concurrency, is used up."),
        _("Wait for retry-after seconds (or the x-ratelimit-reset-* headers) and retry with back-off."),
    ),
    "insufficient_quota": (
        _("Your key's token or money budget for the period is spent."),
        _("Wait for the budget to reset (see the limits table) or ask an admin to raise it."),
    ),
    "upstream_rate_limited": (
        _("The provider behind the model is rate limiting the gateway."),
        _("Retry after a short back-off; it is not your key's limit."),
    ),
    "500": (
        _("An unexpected error in the gateway (it is logged with the request id)."),
        _("Retry once; if it persists, tell an admin the x-request-id."),
    ),
    "upstream_error": (
        _("The provider failed or answered with an error, on every route of the model."),
        _("Retry with back-off; tell an admin if it persists."),
    ),
    "upstream_timeout": (
        _("The provider did not answer in time."),
        _("Retry; stream long answers (stream: true) so they start sooner."),
    ),
    "no_route": (
        _("The model has no working route to a provider right now."),
        _("Retry later or pick another model; tell an admin."),
    ),
    "local_model_busy": (
        _("The built-in local model's queue is full."),
        _("Retry after a few seconds."),
    ),
    "limiter_unavailable": (
        _("The rate limiter is recovering after a restart."),
        _("Retry after retry-after seconds."),
    ),
    "service_unavailable": (
        _("A shared service (Redis) is unavailable."),
        _("Retry shortly."),
    ),
    "server_shutting_down": (
        _("The server restarted during the request; what was produced is billed."),
        _("Retry."),
    ),
}  # fmt: skip


@dataclass
class ErrorRow:
    status: int
    type: str
    code: str
    meaning: Promise | str
    action: Promise | str


def error_rows(errors: tuple[RaisedError, ...] | None = None) -> list[ErrorRow]:
    rows = []
    for error in errors if errors is not None else raised_errors():
        meaning, action = ERROR_HELP.get(error.key, ("", ""))
        rows.append(ErrorRow(error.status, error.type, error.code, meaning, action))
    return rows


# -- the page ----------------------------------------------------------------------------------


@require_GET
def guide(request: HttpRequest) -> HttpResponse:
    if not request.user.is_authenticated and not settings.SWITCHBOARD_PUBLIC_DOCS:
        return redirect_to_login(request.get_full_path())
    base = public_base_url(request)
    keys = reader_keys(request.user)
    rows = model_rows(allowed_names(keys))
    currencies = sorted({row.price.currency for row in rows if row.price is not None})
    context = {
        "base_url": base,
        "openai_base": f"{base}/v1",
        "anthropic_base": base,
        "key_variable": KEY_VARIABLE,
        "signed_in": request.user.is_authenticated,
        "keys_url": reverse("console:keys"),
        "models": rows,
        "currency": ", ".join(currencies) or settings.SWITCHBOARD_CURRENCY,
        "key_limits": [key_limits(key) for key in keys],
        "zone": timezone.get_current_timezone_name(),
        "tasks": sample_tasks(base, rows),
        "errors": error_rows(),
        "max_body_mb": settings.SWITCHBOARD_MAX_BODY_BYTES / (1024 * 1024),
        "openapi_url": f"{base}/v1/openapi.json",
        "openai_version": "1.0",
        "anthropic_version": "0.40",
    }
    return render(request, "chatapp/docs.html", context)
