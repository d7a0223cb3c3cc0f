"""Upstream adapters, one module per provider type.

Each adapter is pure: it builds the provider's HTTP request from a canonical
``ChatRequest`` and parses the provider's responses into canonical events.  The
pipeline does the I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Target:
    """Everything needed to call one route: where, with what credentials, which model."""

    route_id: int
    provider: str
    provider_type: str
    base_url: str
    api_key: str
    upstream_model: str
    timeout: float
    extra_headers: dict[str, str] = field(default_factory=dict)
    max_output_tokens: int = 4096


@dataclass(slots=True)
class HttpCall:
    url: str
    headers: dict[str, str]
    body: dict[str, Any]
