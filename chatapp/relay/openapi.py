"""``GET /v1/openapi.json``: an OpenAPI 3.1 document of the public API, both dialects.

The error responses are not a hand-kept list: ``raised_errors()`` reads the relay's
own source (every ``RelayError(...)`` it constructs, plus the key refusals of
``errors.KEY_REFUSALS``), so a new error the relay starts raising shows up here and
in the guide's error table (``chatapp.docs``) without anyone remembering to add it.
The document is the same for everyone and names no model, key or price: it is
served without a key.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import DisallowedHost
from django.http import HttpRequest, JsonResponse

from chatapp.relay import reasoning
from chatapp.relay.errors import ERROR_TYPES, KEY_REFUSALS, RelayError

RELAY_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True, order=True)
class RaisedError:
    """One error the relay can answer with: its status, error type and code."""

    status: int
    type: str
    code: str  # "" when the error carries none

    @property
    def key(self) -> str:
        """How the guide names it: the code, or the status for an error without one."""
        return self.code or str(self.status)


def _constant(node: ast.expr | None) -> Any:
    return node.value if isinstance(node, ast.Constant) else None


@functools.cache
def raised_errors() -> tuple[RaisedError, ...]:
    """Every (status, type, code) the relay constructs, read from its source code."""
    found: set[RaisedError] = set()
    for path in sorted(RELAY_DIR.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "RelayError"
                and node.args
            ):
                continue
            status = _constant(node.args[0])
            if not isinstance(status, int):
                continue  # the key refusals' own statuses come from KEY_REFUSALS below
            keywords = {kw.arg: _constant(kw.value) for kw in node.keywords}
            found.add(
                RaisedError(
                    status,
                    keywords.get("type") or ERROR_TYPES.get(status, "api_error"),
                    keywords.get("code") or "",
                )
            )
    for status, code in KEY_REFUSALS.values():
        found.add(RaisedError(status, ERROR_TYPES[status], code))
    return tuple(sorted(found))


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


STRING_OR_NULL = {"type": ["string", "null"]}
POSITIVE = {"type": "integer", "minimum": 1}

SCHEMAS: dict[str, Any] = {
    # -- errors --
    "OpenAIError": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": STRING_OR_NULL,
                    "code": STRING_OR_NULL,
                },
            }
        },
    },
    "AnthropicError": {
        "type": "object",
        "required": ["type", "error"],
        "properties": {
            "type": {"const": "error"},
            "error": {
                "type": "object",
                "required": ["type", "message"],
                "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
            },
        },
    },
    # -- OpenAI chat completions --
    "ChatContentPart": {
        "type": "object",
        "required": ["type"],
        "properties": {
            "type": {"enum": ["text", "image_url"]},
            "text": {"type": "string"},
            "image_url": {
                "type": "object",
                "required": ["url"],
                "properties": {
                    "url": {
                        "type": "string",
                        "description": "https URL or data:image/...;base64,...",
                    },
                    "detail": {"enum": ["auto", "low", "high"]},
                },
            },
        },
    },
    "ChatMessage": {
        "type": "object",
        "required": ["role"],
        "properties": {
            "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
            "content": {
                "anyOf": [
                    {"type": "string"},
                    {"type": "array", "items": _ref("ChatContentPart")},
                    {"type": "null"},
                ]
            },
            "name": {"type": "string"},
            "tool_call_id": {"type": "string"},
            "tool_calls": {"type": "array", "items": _ref("ToolCall")},
        },
    },
    "ToolCall": {
        "type": "object",
        "required": ["id", "type", "function"],
        "properties": {
            "id": {"type": "string"},
            "type": {"const": "function"},
            "function": {
                "type": "object",
                "required": ["name", "arguments"],
                "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}},
            },
        },
    },
    "ChatTool": {
        "type": "object",
        "required": ["type", "function"],
        "properties": {
            "type": {"const": "function"},
            "function": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string"},
                    "description": {"type": "string"},
                    "parameters": {"type": "object"},
                },
            },
        },
    },
    "ChatCompletionRequest": {
        "type": "object",
        "required": ["model", "messages"],
        "properties": {
            "model": {"type": "string"},
            "messages": {"type": "array", "minItems": 1, "items": _ref("ChatMessage")},
            "max_tokens": POSITIVE,
            "max_completion_tokens": POSITIVE,
            "temperature": {"type": "number", "minimum": 0, "maximum": 2},
            "top_p": {"type": "number", "minimum": 0, "maximum": 1},
            "n": {"type": "integer", "minimum": 1, "maximum": 128},
            "stop": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
            "stream": {"type": "boolean"},
            "stream_options": {
                "type": "object",
                "properties": {"include_usage": {"type": "boolean"}},
            },
            "tools": {"type": "array", "items": _ref("ChatTool")},
            "tool_choice": {"anyOf": [{"enum": ["auto", "none", "required"]}, {"type": "object"}]},
            "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
            "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
            "seed": {"type": "integer"},
            "user": {"type": "string"},
            "response_format": {
                "type": "object",
                "properties": {"type": {"enum": ["text", "json_object", "json_schema"]}},
            },
            "reasoning_effort": {
                "enum": list(reasoning.EFFORTS),
                "description": (
                    "Passed on to OpenAI-compatible upstreams; a thinking budget for Anthropic "
                    "and Gemini ones (low 1024, medium 4096, high 16384 tokens)."
                ),
            },
        },
    },
    "ChatCompletion": {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "chat.completion"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["index", "message", "finish_reason"],
                    "properties": {
                        "index": {"type": "integer"},
                        "message": {
                            "type": "object",
                            "required": ["role"],
                            "properties": {
                                "role": {"const": "assistant"},
                                "content": STRING_OR_NULL,
                                "reasoning_content": {
                                    "type": "string",
                                    "description": "The model's reasoning, when it shows any.",
                                },
                                "tool_calls": {"type": "array", "items": _ref("ToolCall")},
                            },
                        },
                        "finish_reason": STRING_OR_NULL,
                    },
                },
            },
            "usage": {
                "type": "object",
                "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
                "properties": {
                    "prompt_tokens": {"type": "integer"},
                    "completion_tokens": {"type": "integer"},
                    "total_tokens": {"type": "integer"},
                },
            },
        },
    },
    # -- OpenAI responses --
    "ResponseContentPart": {
        "type": "object",
        "required": ["type"],
        "properties": {
            "type": {"enum": ["input_text", "output_text", "input_image"]},
            "text": {"type": "string"},
            "image_url": {
                "type": "string",
                "description": "https URL or data:image/...;base64,...",
            },
            "detail": {"enum": ["auto", "low", "high"]},
        },
    },
    "ResponseInputItem": {
        "type": "object",
        "description": (
            "A message (type message, or no type), a function_call the model made, or a "
            "function_call_output; replayed reasoning items are dropped."
        ),
        "properties": {
            "type": {"enum": ["message", "function_call", "function_call_output", "reasoning"]},
            "role": {"enum": ["user", "assistant", "system", "developer"]},
            "content": {
                "anyOf": [
                    {"type": "string"},
                    {"type": "array", "items": _ref("ResponseContentPart")},
                ]
            },
            "call_id": {"type": "string"},
            "name": {"type": "string"},
            "arguments": {"type": "string"},
            "output": {
                "anyOf": [
                    {"type": "string"},
                    {"type": "array", "items": _ref("ResponseContentPart")},
                ]
            },
        },
    },
    "ResponseFunctionTool": {
        "type": "object",
        "required": ["type", "name"],
        "properties": {
            "type": {"const": "function"},
            "name": {"type": "string"},
            "description": {"type": "string"},
            "parameters": {"type": "object"},
            "strict": {"type": "boolean"},
        },
    },
    "ResponsesRequest": {
        "type": "object",
        "required": ["model", "input"],
        "description": (
            "Nothing is stored: previous_response_id, conversation, prompt and background "
            "are refused (400); send the whole conversation in input."
        ),
        "properties": {
            "model": {"type": "string"},
            "input": {
                "anyOf": [
                    {"type": "string"},
                    {"type": "array", "minItems": 1, "items": _ref("ResponseInputItem")},
                ]
            },
            "instructions": {"type": "string"},
            "tools": {"type": "array", "items": _ref("ResponseFunctionTool")},
            "tool_choice": {"anyOf": [{"enum": ["auto", "none", "required"]}, {"type": "object"}]},
            "parallel_tool_calls": {"type": "boolean"},
            "max_output_tokens": POSITIVE,
            "temperature": {"type": "number", "minimum": 0, "maximum": 2},
            "top_p": {"type": "number", "minimum": 0, "maximum": 1},
            "stream": {"type": "boolean"},
            "store": {"type": "boolean", "description": "Accepted; nothing is ever stored."},
            "reasoning": {
                "type": "object",
                "properties": {"effort": {"enum": list(reasoning.EFFORTS)}},
                "description": "The effort, as reasoning_effort on chat completions.",
            },
            "text": {
                "type": "object",
                "properties": {
                    "format": {
                        "type": "object",
                        "properties": {"type": {"enum": ["text", "json_object", "json_schema"]}},
                    }
                },
            },
            "metadata": {"type": "object"},
            "user": {"type": "string"},
        },
    },
    "Response": {
        "type": "object",
        "required": ["id", "object", "created_at", "status", "model", "output", "store"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "response"},
            "created_at": {"type": "integer"},
            "status": {"enum": ["completed", "incomplete"]},
            "incomplete_details": {
                "anyOf": [
                    {"type": "null"},
                    {
                        "type": "object",
                        "properties": {"reason": {"enum": ["max_output_tokens", "content_filter"]}},
                    },
                ]
            },
            "model": {"type": "string"},
            "store": {"const": False},
            "output": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["id", "type", "status"],
                    "properties": {
                        "id": {"type": "string"},
                        "type": {"enum": ["message", "function_call", "reasoning"]},
                        "status": {"enum": ["completed", "incomplete"]},
                        "summary": {
                            "type": "array",
                            "description": "A reasoning item: the reasoning the model showed.",
                        },
                        "role": {"const": "assistant"},
                        "content": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["type", "text"],
                                "properties": {
                                    "type": {"const": "output_text"},
                                    "text": {"type": "string"},
                                },
                            },
                        },
                        "call_id": {"type": "string"},
                        "name": {"type": "string"},
                        "arguments": {"type": "string"},
                    },
                },
            },
            "usage": {
                "anyOf": [
                    {"type": "null"},
                    {
                        "type": "object",
                        "required": ["input_tokens", "output_tokens", "total_tokens"],
                        "properties": {
                            "input_tokens": {"type": "integer"},
                            "input_tokens_details": {
                                "type": "object",
                                "properties": {
                                    "cached_tokens": {"type": "integer"},
                                    "cache_write_tokens": {"type": "integer"},
                                },
                            },
                            "output_tokens": {"type": "integer"},
                            "output_tokens_details": {"type": "object"},
                            "total_tokens": {"type": "integer"},
                        },
                    },
                ]
            },
        },
    },
    # -- OpenAI embeddings --
    "EmbeddingRequest": {
        "type": "object",
        "required": ["model", "input"],
        "properties": {
            "model": {"type": "string"},
            "input": {
                "anyOf": [
                    {"type": "string", "minLength": 1},
                    {"type": "array", "minItems": 1, "items": {"type": "string"}},
                    {"type": "array", "minItems": 1, "items": {"type": "integer"}},
                ]
            },
            "encoding_format": {"enum": ["float", "base64"]},
            "dimensions": POSITIVE,
            "user": {"type": "string"},
        },
    },
    "EmbeddingList": {
        "type": "object",
        "required": ["object", "data", "model"],
        "properties": {
            "object": {"const": "list"},
            "model": {"type": "string"},
            "data": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["index", "embedding"],
                    "properties": {
                        "object": {"const": "embedding"},
                        "index": {"type": "integer"},
                        "embedding": {
                            "anyOf": [
                                {"type": "array", "items": {"type": "number"}},
                                {"type": "string", "description": "base64 little-endian float32"},
                            ]
                        },
                    },
                },
            },
            "usage": {"type": "object"},
        },
    },
    # -- models --
    "OpenAIModel": {
        "type": "object",
        "required": ["id", "object", "created", "owned_by"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "model"},
            "created": {"type": "integer"},
            "owned_by": {"type": "string"},
        },
    },
    "AnthropicModel": {
        "type": "object",
        "required": ["type", "id", "display_name", "created_at"],
        "properties": {
            "type": {"const": "model"},
            "id": {"type": "string"},
            "display_name": {"type": "string"},
            "created_at": {"type": "string", "format": "date-time"},
        },
    },
    "OpenAIModelList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": _ref("OpenAIModel")},
        },
    },
    "AnthropicModelList": {
        "type": "object",
        "required": ["data", "has_more", "first_id", "last_id"],
        "properties": {
            "data": {"type": "array", "items": _ref("AnthropicModel")},
            "has_more": {"type": "boolean"},
            "first_id": STRING_OR_NULL,
            "last_id": STRING_OR_NULL,
        },
    },
    # -- Anthropic messages --
    "ContentBlock": {
        "type": "object",
        "required": ["type"],
        "properties": {
            "type": {
                "enum": [
                    "text",
                    "image",
                    "tool_use",
                    "tool_result",
                    "thinking",
                    "redacted_thinking",
                ]
            },
            "text": {"type": "string"},
            "thinking": {"type": "string"},
            "signature": {"type": "string"},
            "data": {"type": "string"},
            "source": {
                "type": "object",
                "properties": {
                    "type": {"enum": ["base64", "url"]},
                    "media_type": {"type": "string"},
                    "data": {"type": "string"},
                    "url": {"type": "string"},
                },
            },
            "id": {"type": "string"},
            "name": {"type": "string"},
            "input": {"type": "object"},
            "tool_use_id": {"type": "string"},
            "content": {"anyOf": [{"type": "string"}, {"type": "array"}]},
        },
    },
    "AnthropicMessage": {
        "type": "object",
        "required": ["role", "content"],
        "properties": {
            "role": {"enum": ["user", "assistant"]},
            "content": {
                "anyOf": [{"type": "string"}, {"type": "array", "items": _ref("ContentBlock")}]
            },
        },
    },
    "AnthropicTool": {
        "type": "object",
        "required": ["name", "input_schema"],
        "properties": {
            "name": {"type": "string"},
            "description": {"type": "string"},
            "input_schema": {"type": "object"},
        },
    },
    "MessagesRequest": {
        "type": "object",
        "required": ["model", "max_tokens", "messages"],
        "properties": {
            "model": {"type": "string"},
            "max_tokens": POSITIVE,
            "messages": {"type": "array", "minItems": 1, "items": _ref("AnthropicMessage")},
            "system": {
                "anyOf": [{"type": "string"}, {"type": "array", "items": _ref("ContentBlock")}]
            },
            "temperature": {"type": "number", "minimum": 0, "maximum": 1},
            "top_p": {"type": "number", "minimum": 0, "maximum": 1},
            "top_k": {"type": "integer", "minimum": 0},
            "stop_sequences": {"type": "array", "items": {"type": "string"}},
            "stream": {"type": "boolean"},
            "tools": {"type": "array", "items": _ref("AnthropicTool")},
            "tool_choice": {"type": "object"},
            "metadata": {"type": "object", "properties": {"user_id": {"type": "string"}}},
            "thinking": {
                "type": "object",
                "properties": {
                    "type": {"enum": ["enabled", "disabled"]},
                    "budget_tokens": {"type": "integer", "minimum": 1024},
                },
                "description": (
                    "Passed on to Anthropic upstreams; an effort for OpenAI-compatible ones "
                    "(under 4096 low, under 16384 medium, else high), a thinking budget for "
                    "Gemini ones."
                ),
            },
        },
    },
    "CountTokensRequest": {
        "type": "object",
        "required": ["model", "messages"],
        "properties": {
            "model": {"type": "string"},
            "messages": {"type": "array", "minItems": 1, "items": _ref("AnthropicMessage")},
            "system": {
                "anyOf": [{"type": "string"}, {"type": "array", "items": _ref("ContentBlock")}]
            },
            "tools": {"type": "array", "items": _ref("AnthropicTool")},
        },
    },
    "Message": {
        "type": "object",
        "required": ["id", "type", "role", "content", "model", "stop_reason", "usage"],
        "properties": {
            "id": {"type": "string"},
            "type": {"const": "message"},
            "role": {"const": "assistant"},
            "content": {"type": "array", "items": _ref("ContentBlock")},
            "model": {"type": "string"},
            "stop_reason": STRING_OR_NULL,
            "stop_sequence": STRING_OR_NULL,
            "usage": {
                "type": "object",
                "required": ["input_tokens", "output_tokens"],
                "properties": {
                    "input_tokens": {"type": "integer"},
                    "output_tokens": {"type": "integer"},
                },
            },
        },
    },
    "TokenCount": {
        "type": "object",
        "required": ["input_tokens"],
        "properties": {"input_tokens": {"type": "integer"}},
    },
}

SSE = {
    "text/event-stream": {
        "schema": {
            "type": "string",
            "description": (
                "Server-sent events in the dialect's own format, then its end "
                "(data: [DONE], message_stop or response.completed)."
            ),
        }
    }
}


def _error_responses(dialect: str) -> dict[str, Any]:
    """Every status the relay can answer with, in the dialect's error body."""
    schema = (
        {"anyOf": [_ref("OpenAIError"), _ref("AnthropicError")]}
        if dialect == "both"
        else _ref("OpenAIError" if dialect == "openai" else "AnthropicError")
    )
    responses: dict[str, Any] = {}
    for error in raised_errors():
        entry = responses.setdefault(
            str(error.status),
            {"description": "", "content": {"application/json": {"schema": schema}}},
        )
        codes = [part for part in entry["description"].split(", ") if part]
        name = error.code or error.type
        if name not in codes:
            codes.append(name)
        entry["description"] = ", ".join(codes)
    return dict(sorted(responses.items()))


def _operation(
    summary: str,
    operation_id: str,
    dialect: str,
    ok: dict[str, Any],
    body: str | None = None,
    parameters: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "operationId": operation_id,
        "tags": ["Anthropic" if dialect == "anthropic" else "OpenAI" if body else "Models"],
        "responses": {"200": ok, **_error_responses(dialect)},
    }
    if body:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(body)}},
        }
    if parameters:
        operation["parameters"] = parameters
    return operation


ANTHROPIC_VERSION = {
    "name": "anthropic-version",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "examples": ["2023-06-01"]},
    "description": "Sent by the Anthropic SDKs; accepted, not required.",
}


def document(base_url: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document, with ``base_url`` (no trailing slash) as its server."""
    json_ok = lambda name, description: {  # noqa: E731 - a local shorthand
        "description": description,
        "content": {"application/json": {"schema": _ref(name)}},
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Switchboard API",
            "version": "1",
            "description": (
                "OpenAI- and Anthropic-compatible API of this Switchboard gateway. "
                "Authenticate with `Authorization: Bearer <key>` or `x-api-key: <key>`. "
                f"Request bodies up to {settings.SWITCHBOARD_MAX_BODY_BYTES} bytes."
            ),
        },
        "servers": [{"url": base_url}],
        "security": [{"bearer": []}, {"apiKey": []}],
        "paths": {
            "/v1/chat/completions": {
                "post": _operation(
                    "Chat completion (OpenAI format); SSE with stream: true",
                    "createChatCompletion",
                    "openai",
                    {
                        "description": "The completion, or its chunks as server-sent events",
                        "content": {
                            "application/json": {"schema": _ref("ChatCompletion")},
                            **SSE,
                        },
                    },
                    "ChatCompletionRequest",
                )
            },
            "/v1/responses": {
                "post": _operation(
                    "Response (OpenAI Responses format); typed SSE events with stream: true",
                    "createResponse",
                    "openai",
                    {
                        "description": (
                            "The response, or its events (response.created … "
                            "response.completed) as server-sent events"
                        ),
                        "content": {"application/json": {"schema": _ref("Response")}, **SSE},
                    },
                    "ResponsesRequest",
                )
            },
            "/v1/embeddings": {
                "post": _operation(
                    "Embeddings (OpenAI format)",
                    "createEmbedding",
                    "openai",
                    json_ok("EmbeddingList", "The embeddings"),
                    "EmbeddingRequest",
                )
            },
            "/v1/messages": {
                "post": _operation(
                    "Messages (Anthropic format); SSE with stream: true",
                    "createMessage",
                    "anthropic",
                    {
                        "description": "The message, or its events as server-sent events",
                        "content": {"application/json": {"schema": _ref("Message")}, **SSE},
                    },
                    "MessagesRequest",
                    [ANTHROPIC_VERSION],
                )
            },
            "/v1/messages/count_tokens": {
                "post": _operation(
                    "Count input tokens (Anthropic format)",
                    "countTokens",
                    "anthropic",
                    json_ok("TokenCount", "The input token count"),
                    "CountTokensRequest",
                    [ANTHROPIC_VERSION],
                )
            },
            "/v1/models": {
                "get": _operation(
                    "The models this key may use (Anthropic's shape with an anthropic-version header)",
                    "listModels",
                    "both",
                    {
                        "description": "The models",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "anyOf": [
                                        _ref("OpenAIModelList"),
                                        _ref("AnthropicModelList"),
                                    ]
                                }
                            }
                        },
                    },
                    parameters=[ANTHROPIC_VERSION],
                )
            },
            "/v1/models/{model}": {
                "get": _operation(
                    "One model",
                    "retrieveModel",
                    "both",
                    {
                        "description": "The model",
                        "content": {
                            "application/json": {
                                "schema": {"anyOf": [_ref("OpenAIModel"), _ref("AnthropicModel")]}
                            }
                        },
                    },
                    parameters=[
                        {
                            "name": "model",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        },
                        ANTHROPIC_VERSION,
                    ],
                )
            },
            "/v1/openapi.json": {
                "get": {
                    "summary": "This document",
                    "operationId": "getOpenAPI",
                    "tags": ["Meta"],
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "The OpenAPI document",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
        },
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "OpenAI SDKs"},
                "apiKey": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "x-api-key",
                    "description": "Anthropic SDKs",
                },
            },
        },
    }


def public_base_url(request: HttpRequest) -> str:
    """Where clients reach this gateway: ``SWITCHBOARD_PUBLIC_URL``, else the request's host."""
    configured: str | None = settings.SWITCHBOARD_PUBLIC_URL
    if configured:
        return configured.rstrip("/")
    return f"{request.scheme}://{request.get_host()}"


async def openapi_json(request: HttpRequest) -> JsonResponse:
    from chatapp.relay.pipeline import new_request_id
    from chatapp.relay.views import error_response

    if request.method not in ("GET", "HEAD"):
        error = RelayError(405, f"Method {request.method} is not allowed here; use GET.")
        return error_response(error, "openai", new_request_id())
    try:
        base_url = public_base_url(request)
    except DisallowedHost:
        error = RelayError(400, "The Host header names no host this gateway serves.")
        return error_response(error, "openai", new_request_id())
    response = JsonResponse(document(base_url))
    response["Access-Control-Allow-Origin"] = "*"  # Swagger UIs elsewhere may load it
    return response
