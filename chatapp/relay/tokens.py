"""Local token estimates, used only when an upstream reports no usage (and flagged so).

Roughly: one token per CJK character, one per four other characters, plus a few
tokens of framing per message and a flat cost per image.
"""

from __future__ import annotations

import json

from chatapp.relay.canonical import ChatRequest, ImagePart, TextPart, ToolCallPart, ToolResultPart

IMAGE_TOKENS = 765  # what a high-detail 512x512 tile costs at OpenAI; a fair middle


def estimate_text(text: str) -> int:
    if not text:
        return 0
    wide = sum(1 for char in text if ord(char) >= 0x2E80)
    return wide + (len(text) - wide + 3) // 4


def estimate_request(request: ChatRequest) -> int:
    total = 3 + sum(estimate_text(part.text) for part in request.system)
    for message in request.messages:
        total += 4
        for part in message.parts:
            if isinstance(part, TextPart):
                total += estimate_text(part.text)
            elif isinstance(part, ImagePart):
                total += IMAGE_TOKENS
            elif isinstance(part, ToolCallPart):
                total += estimate_text(part.name) + estimate_text(part.arguments)
            elif isinstance(part, ToolResultPart):
                total += estimate_text(part.text) + IMAGE_TOKENS * sum(
                    isinstance(item, ImagePart) for item in part.content
                )
    for tool in request.tools:
        total += estimate_text(tool.name + tool.description + json.dumps(tool.parameters))
    return total


# --- Upper bounds, for reservations ---

#: Tokens an image can cost at most, whatever its size: OpenAI's high detail tops out
#: at 85 + 170 × 16 tiles (2805) for 2048 px, Anthropic at about width × height / 750
#: (5592 for 2048 × 2048, images larger than that are scaled down by the provider).
IMAGE_TOKEN_BOUND = 5600
MESSAGE_OVERHEAD_BOUND = 16  # role and template tokens around each message
REQUEST_OVERHEAD_BOUND = 64  # the chat template, tool preambles


def _bytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def bound_request(request: ChatRequest) -> int:
    """Input tokens this request can cost at most, whichever tokenizer the upstream uses.

    Byte-level BPE and SentencePiece with byte fallback never make a token of less
    than one byte, so text costs at most its UTF-8 length; each message adds its
    template tokens, each image at most ``IMAGE_TOKEN_BOUND``.  When the request came
    as a JSON body, that body (without its inline image data) bounds everything the
    parser does not model, such as documents or reasoning blocks passed through.
    """
    images = 0
    image_bytes = 0
    total = REQUEST_OVERHEAD_BOUND + sum(_bytes(part.text) for part in request.system)
    for message in request.messages:
        total += MESSAGE_OVERHEAD_BOUND
        for part in message.parts:
            if isinstance(part, TextPart):
                total += _bytes(part.text)
            elif isinstance(part, ImagePart):
                images += 1
                image_bytes += len(part.data or part.url or "")
            elif isinstance(part, ToolCallPart):
                total += _bytes(part.name) + _bytes(part.arguments) + MESSAGE_OVERHEAD_BOUND
            elif isinstance(part, ToolResultPart):
                total += MESSAGE_OVERHEAD_BOUND
                for item in part.content:
                    if isinstance(item, TextPart):
                        total += _bytes(item.text)
                    else:
                        images += 1
                        image_bytes += len(item.data or item.url or "")
    for tool in request.tools:
        total += MESSAGE_OVERHEAD_BOUND + _bytes(
            tool.name + tool.description + json.dumps(tool.parameters)
        )
    if request.body_size:
        total = max(total, REQUEST_OVERHEAD_BOUND + request.body_size - image_bytes)
    return total + images * IMAGE_TOKEN_BOUND


def bound_inputs(inputs: str | list[str] | list[int] | list[list[int]]) -> int:
    """Embedding inputs: text by its UTF-8 length, token arrays counted."""
    if isinstance(inputs, str):
        return _bytes(inputs) + MESSAGE_OVERHEAD_BOUND
    total = 0
    for item in inputs:
        if isinstance(item, str):
            total += _bytes(item) + MESSAGE_OVERHEAD_BOUND
        elif isinstance(item, list):
            total += len(item)
        else:
            total += 1
    return total
