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


def estimate_inputs(inputs: str | list[str] | list[int] | list[list[int]]) -> int:
    """Embedding inputs: text is estimated, token arrays are counted."""
    if isinstance(inputs, str):
        return estimate_text(inputs)
    total = 0
    for item in inputs:
        if isinstance(item, str):
            total += estimate_text(item)
        elif isinstance(item, list):
            total += len(item)
        else:
            total += 1
    return total
