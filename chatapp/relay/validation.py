"""Small typed readers for request JSON that name the offending field on error."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from chatapp.relay.canonical import ImagePart
from chatapp.relay.errors import RelayError

_MISSING = object()
IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
MAX_INLINE_IMAGE_BYTES = 20 * 1024 * 1024
_DATA_URL = re.compile(r"^data:(?P<type>[\w/+.-]+);base64,(?P<data>.*)$", re.S)


def bad(param: str, message: str) -> RelayError:
    return RelayError(400, f"{param}: {message}", param=param, code="invalid_value")


def field(
    obj: dict[str, Any],
    name: str,
    path: str,
    kinds: type | tuple[type, ...],
    *,
    required: bool = False,
    default: Any = None,
) -> Any:
    value = obj.get(name, _MISSING)
    where = f"{path}.{name}" if path else name
    if value is _MISSING or value is None:
        if required:
            raise RelayError(
                400,
                f"{where}: this field is required",
                param=where,
                code="missing_required_parameter",
            )
        return default
    if kinds in (int, float, (int, float)) and isinstance(value, bool):
        raise bad(where, f"expected a number, got {value!r}")
    if not isinstance(value, kinds):
        raise bad(where, f"expected {_kind_name(kinds)}, got {type(value).__name__}")
    return value


def number(obj: dict[str, Any], name: str, path: str, low: float, high: float) -> float | None:
    value = field(obj, name, path, (int, float))
    if value is not None and not low <= value <= high:
        where = f"{path}.{name}" if path else name
        raise bad(where, f"{value} is out of range: expected {low:g} to {high:g}")
    return None if value is None else float(value)


def integer(
    obj: dict[str, Any], name: str, path: str, low: int, high: int | None = None
) -> int | None:
    value = field(obj, name, path, int)
    where = f"{path}.{name}" if path else name
    if value is not None and (value < low or (high is not None and value > high)):
        limit = f"at least {low}" if high is None else f"{low} to {high}"
        raise bad(where, f"{value} is out of range: expected {limit}")
    return value


def stop_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        if len(value) > 16:
            raise bad(where, f"at most 16 stop sequences, got {len(value)}")
        return list(value)
    raise bad(where, "expected a string or an array of strings")


def image_from_url(url: str, where: str, detail: str | None = None) -> ImagePart:
    """A remote URL is passed on untouched; a data: URL is checked (type, size, base64)."""
    if url.startswith("data:"):
        match = _DATA_URL.match(url)
        if not match:
            raise bad(where, "a data: URL must look like data:image/png;base64,...")
        return image_from_base64(match["type"], match["data"], where, detail)
    if not url.startswith(("http://", "https://")):
        raise bad(where, "expected an http(s) URL or a data: URL")
    return ImagePart(url=url, detail=detail)


def image_from_base64(
    media_type: str, data: str, where: str, detail: str | None = None
) -> ImagePart:
    if media_type not in IMAGE_TYPES:
        raise bad(
            where,
            f"unsupported image type {media_type!r}: expected one of {', '.join(IMAGE_TYPES)}",
        )
    size = len(data) * 3 // 4
    if size > MAX_INLINE_IMAGE_BYTES:
        raise bad(
            where,
            f"image is {size // (1024 * 1024)} MB: the limit is {MAX_INLINE_IMAGE_BYTES // (1024 * 1024)} MB",
        )
    try:
        head = data[:4096]
        base64.b64decode(head[: len(head) - len(head) % 4], validate=True)
    except (binascii.Error, ValueError):
        raise bad(where, "the image data is not valid base64") from None
    return ImagePart(data=data, media_type=media_type, detail=detail)


def _kind_name(kinds: type | tuple[type, ...]) -> str:
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        list: "an array",
        dict: "an object",
    }
    if isinstance(kinds, tuple):
        if set(kinds) == {int, float}:
            return "a number"
        return " or ".join(names.get(kind, kind.__name__) for kind in kinds)
    return names.get(kinds, kinds.__name__)
