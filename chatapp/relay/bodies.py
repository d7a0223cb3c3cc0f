"""Reading a client's JSON body without trusting it.

``json.loads`` alone lets through, or fails badly on, bodies no client means to
send: 100,000 nested brackets (``RecursionError``), a 5,000-digit integer
(``ValueError`` from ``int``), ``NaN`` and ``1e999`` (which we could not write back
as JSON), and strings holding a NUL or a lone UTF-16 surrogate from a ``\\ud800``
escape (which PostgreSQL refuses to store and UTF-8 cannot encode, so they fail far
from where they came in).  ``load_json`` turns each into a 400 that says what and
where, before anything else sees the body.

The checks after parsing walk the parsed object with an explicit stack, never
recursion, and only when the raw text could hold a problem at all: a body with no
``\\u0000``/``\\ud8xx`` escape holds no bad string, one with at most ``MAX_DEPTH``
opening brackets nests no deeper than that.
"""

from __future__ import annotations

import codecs
import json
import math
import re
from typing import Any

from chatapp.relay.errors import RelayError

MAX_DEPTH = 64  # arrays and objects inside one another
MAX_INTEGER_DIGITS = 100  # an int64 has 19; a uint128 has 39

_SURROGATE = re.compile("[\ud800-\udfff]")
# An escape that could decode to NUL or to a surrogate (paired or not).  A false hit
# (an escaped backslash before "u0000") only costs the walk.
_SUSPECT_ESCAPE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])")
# Digits as "0", e/E as "e", "+" dropped, all else a space: a number too long, or too
# large for a float (an exponent of 3 digits), is then a bytes.find (about 1 ms a
# megabyte, where a regex takes 10 to 50).  Only then are json's number hooks ours: a
# Python call per number slows a body of numbers (token ids, vectors) by up to 3x.
_NUMBER_SHAPES = bytes(
    0x30 if 0x30 <= byte <= 0x39 else 0x65 if byte in b"eE" else 0x20 for byte in range(256)
)
_LONG_INTEGER = b"0" * (MAX_INTEGER_DIGITS + 1)
_NOT_OPENING = bytes(byte for byte in range(256) if byte not in b"[{")


def load_json(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a ``RelayError(400)`` saying what is wrong."""
    offset = 0
    if raw.startswith(codecs.BOM_UTF8):  # tolerated, as json.loads(bytes) always did
        raw, offset = raw[len(codecs.BOM_UTF8) :], len(codecs.BOM_UTF8)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        byte = raw[exc.start : exc.start + 1].hex()
        raise _invalid(
            f"The request body is not valid UTF-8: {exc.reason} (byte 0x{byte} at byte {exc.start + offset})."
        ) from None
    if not text.strip():
        raise _invalid("The request body is empty: expected a JSON object.")
    decoder = _DECODER
    shapes = raw.translate(_NUMBER_SHAPES, b"+")
    if _LONG_INTEGER in shapes or b"e000" in shapes:
        decoder = _CAREFUL_DECODER
    try:
        body = decoder.decode(text)
    except json.JSONDecodeError as exc:
        raise _invalid(f"The request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise _too_deep() from None
    except _BadNumber as exc:
        raise _invalid(
            f"The request body is not valid JSON: {exc.reason} {_at(text, exc.token)}."
        ) from None
    except ValueError as exc:  # int()'s own digit limit, should a long one slip past the hooks
        raise _invalid(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _invalid(f"The request body must be a JSON object, not {_json_kind(body)}.")
    # On the bytes, where a one-byte find is a memchr: the text's scans are slower.
    escape = raw.find(b"\\")
    check_strings = escape >= 0 and _SUSPECT_ESCAPE.search(raw, escape) is not None
    check_depth = len(raw.translate(None, _NOT_OPENING)) > MAX_DEPTH  # "[" and "{" left
    if check_strings or check_depth:
        _walk(body, check_strings=check_strings)
    return body


def check_text(value: str, where: str) -> str:
    """``value`` unchanged, or a 400 naming ``where`` if it holds a NUL or a lone surrogate."""
    problem = _string_problem(value)
    if problem is not None:
        raise _bad_string(where, problem)
    return value


def find_path(body: Any, value: str) -> str | None:
    """The path (``messages[0].content[1].image_url.url``) of the first string equal to ``value``."""
    stack: list[tuple[Any, _Path]] = [(body, None)]
    while stack:
        node, path = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node)
        children = []
        for key, child in items:
            if child == value:
                return _render((path, key))
            if isinstance(child, dict | list):
                children.append((child, (path, key)))
        stack.extend(reversed(children))  # document order
    return None


# --- Parsing hooks: json calls them with the token's text. ---


class _BadNumber(Exception):
    def __init__(self, token: str, reason: str) -> None:
        super().__init__(reason)
        self.token = token
        self.reason = reason


def _parse_int(token: str) -> int:
    digits = len(token) - token.startswith("-")
    if digits > MAX_INTEGER_DIGITS:
        raise _BadNumber(
            token, f"integer too long ({digits} digits; the limit is {MAX_INTEGER_DIGITS})"
        )
    return int(token)


def _parse_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):
        raise _BadNumber(token, "number too large for a double (64-bit float)")
    return value


def _parse_constant(token: str) -> float:
    raise _BadNumber(token, f"{token} is not a JSON number")


# Built once: json.loads with any hook builds a new decoder (and scanner) per call.
_DECODER = json.JSONDecoder(parse_constant=_parse_constant)  # called only for NaN, Infinity
_CAREFUL_DECODER = json.JSONDecoder(
    parse_constant=_parse_constant, parse_int=_parse_int, parse_float=_parse_float
)


def _at(text: str, token: str) -> str:
    """Where ``token`` first stands as a value: ``at line L column C (char N)``.

    json's hooks get the token's text, not its position, so it is looked up: the
    first occurrence with a delimiter before and after it.  An earlier copy inside a
    string could only come from a body written to mislead the message.
    """
    start = 0
    while (index := text.find(token, start)) >= 0:
        # A number holds no delimiter, so the real one cannot overlap this copy.
        start = index + len(token)
        before = index - 1
        while before >= 0 and text[before] in " \t\r\n":
            before -= 1
        after = text[start : start + 1]
        if (before < 0 or text[before] in "[:,") and not (after.isalnum() or after in ".+-"):
            line = text.count("\n", 0, index) + 1
            column = index - text.rfind("\n", 0, index)
            return f"at line {line} column {column} (char {index})"
    return "in the body"  # not reached for a token json read from this text


# --- The walk after parsing. ---

# A container's path as a linked list (parent, key): cheap to build for every
# container, rendered only for the error message.
_Path = tuple[Any, str | int] | None
_CONTAINERS = frozenset({dict, list})


def _walk(body: dict[str, Any], *, check_strings: bool) -> None:
    """Depth everywhere; keys and string values too when ``check_strings``."""
    stack: list[tuple[Any, _Path, int]] = [(body, None, 1)]
    while stack:
        node, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _too_deep()
        is_dict = type(node) is dict
        if check_strings:
            if is_dict:
                _check_keys(node, path)
            children = node.items() if is_dict else enumerate(node)
        # A node with no container inside (a message, a list of token ids) is passed
        # over in C: type() and isdisjoint never call back into Python bytecode.
        elif _CONTAINERS.isdisjoint(map(type, node.values() if is_dict else node)):
            continue
        else:
            children = node.items() if is_dict else enumerate(node)
        for key, child in children:
            kind = type(child)
            if kind is dict or kind is list:
                stack.append((child, (path, key), depth + 1))
            elif check_strings and kind is str and (problem := _string_problem(child)):
                raise _bad_string(_render((path, key)), problem)


def _check_keys(node: dict[str, Any], path: _Path) -> None:
    for key in node:
        if (problem := _string_problem(key)) is not None:
            where = _render(path)
            name = _printable(key[:40]) + ("..." if len(key) > 40 else "")
            raise _bad_string(where or "the body", f'the key "{name}" {problem}', param=where)


def _string_problem(value: str) -> str | None:
    if "\x00" in value:
        return "contains a NUL character (\\u0000)"
    if not value.isascii() and (match := _SURROGATE.search(value)) is not None:
        return f"contains a lone UTF-16 surrogate (\\u{ord(match[0]):04x})"
    return None


def _render(path: _Path) -> str:
    keys: list[str | int] = []
    while path is not None:
        path, key = path
        keys.append(key)
    text = ""
    for key in reversed(keys):
        if isinstance(key, int):
            text += f"[{key}]"
        else:
            text += f".{_printable(key)}" if text else _printable(key)
    return text


def _printable(key: str) -> str:
    """A key as it can go into an error message: NULs and surrogates escaped."""
    if _string_problem(key) is None:
        return key
    return "".join(
        f"\\u{ord(char):04x}" if char == "\x00" or "\ud800" <= char <= "\udfff" else char
        for char in key
    )


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"


def _invalid(message: str) -> RelayError:
    return RelayError(400, message, code="invalid_json")


def _too_deep() -> RelayError:
    return _invalid(f"The request body nests arrays and objects more than {MAX_DEPTH} levels deep.")


def _bad_string(where: str, problem: str, *, param: str | None = None) -> RelayError:
    """A 400 for a bad string at ``where``; ``param`` when it differs (empty: the body)."""
    return RelayError(
        400,
        f"{where}: {problem}",
        param=where if param is None else param or None,
        code="invalid_string",
    )
