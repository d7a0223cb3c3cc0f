"""Small typed readers for request JSON that name the offending field on error.

Also the guard on image URLs.  We never fetch them, but an upstream may: vLLM and
Ollama fetch ``image_url`` URLs from inside the network they run in, so a client
could have them fetch ``http://169.254.169.254/`` (cloud credentials) or a service
on loopback.  ``image_from_url`` refuses a URL whose host is such an address in any
spelling (``http://2130706433/``, ``http://0x7f.1/``, ``[::ffff:127.0.0.1]``,
``localhost``) while parsing; ``acheck_image_hosts`` resolves the remaining host names
and refuses one that points inside.  ``SWITCHBOARD_ALLOW_PRIVATE_IMAGE_URLS`` turns
both off.  What this cannot stop: a name whose DNS answer changes between our lookup
and the upstream's (DNS rebinding); an upstream that must not reach the internal
network needs that enforced where it runs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import re
import socket
import string
import time
from typing import Any
from urllib.parse import unquote, urlsplit

from django.conf import settings

from chatapp.relay.bodies import find_path
from chatapp.relay.canonical import ChatRequest, ImagePart, ToolResultPart
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
    if not settings.SWITCHBOARD_ALLOW_PRIVATE_IMAGE_URLS:
        image_host(url, where)  # the host names it holds: acheck_image_hosts
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


# --- Image URLs that would reach inside the network. ---

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

RESOLVE_TIMEOUT = 2.0  # seconds for one host name's lookup
RESOLVED_TTL = 60.0  # seconds an answer is kept (per process)
UNRESOLVED_TTL = 10.0  # seconds a failed lookup is kept
MAX_IMAGE_HOSTS = 32  # distinct host names looked up for one request
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# Names that are never public: RFC 6761/6762/8375 and ICANN's private-use .internal.
_PRIVATE_SUFFIXES = (".localhost", ".local", ".internal", ".localdomain", ".home.arpa")
_UNSAFE_URL_CHAR = re.compile(r"[\x00-\x20\x7f\\]")
_HOST_NAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")  # after IDNA, trailing dot gone
_resolved: dict[str, tuple[float, tuple[str, ...] | str]] = {}


def image_host(url: str, where: str) -> tuple[str, Address | None]:
    """The host of an http(s) image URL and, when it is a literal address, that address.

    Raises a 400 naming ``where`` when the host is not a public one.
    """
    try:
        return _public_host(url)
    except _NotPublic as exc:
        raise _refused(where, exc.reason) from None


async def acheck_image_hosts(request: ChatRequest) -> None:
    """Refuse (400) a request whose remote image URLs name a host that resolves inside.

    Every address a name resolves to must be public; a name that does not resolve is
    refused too (the upstream could resolve it differently).  Lookups are concurrent,
    bounded by ``RESOLVE_TIMEOUT`` and cached for ``RESOLVED_TTL``.
    """
    if settings.SWITCHBOARD_ALLOW_PRIVATE_IMAGE_URLS:
        return
    names: dict[str, str] = {}  # host name → the first URL naming it
    for url in _image_urls(request):
        try:
            host, address = _public_host(url)
        except _NotPublic as exc:  # parsed elsewhere than image_from_url
            raise _refused(_where(request, url), exc.reason) from None
        if address is None:
            names.setdefault(host, url)
    if not names:
        return
    if len(names) > MAX_IMAGE_HOSTS:
        raise RelayError(
            400,
            f"Images come from {len(names)} different hosts: the limit is {MAX_IMAGE_HOSTS}.",
            code="invalid_image_url",
        )
    answers = await asyncio.gather(*(_resolve_cached(host) for host in names))
    for (host, url), answer in zip(names.items(), answers, strict=True):
        if isinstance(answer, str):
            raise _refused(_where(request, url), f"cannot resolve the host {host} ({answer})")
        for text in answer:
            problem = _address_problem(ipaddress.ip_address(text))
            if problem is not None:
                raise _refused(
                    _where(request, url), f"the host {host} resolves to {problem} ({text})"
                )


async def resolve_host(host: str) -> list[str]:
    """The addresses ``host`` resolves to, through the system resolver (tests replace this)."""
    loop = asyncio.get_running_loop()
    infos = await asyncio.wait_for(
        loop.getaddrinfo(host, None, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT
    )
    return [str(info[4][0]) for info in infos]


def forget_resolved() -> None:
    """Drop every cached lookup (tests)."""
    _resolved.clear()


async def _resolve_cached(host: str) -> tuple[str, ...] | str:
    """The host's addresses, or why it did not resolve."""
    now = time.monotonic()
    cached = _resolved.get(host)
    if cached is not None and cached[0] > now:
        return cached[1]
    answer: tuple[str, ...] | str
    try:
        answer = tuple(await resolve_host(host)) or "no address"
    except TimeoutError:
        answer = f"no answer within {RESOLVE_TIMEOUT:g} s"
    except OSError as exc:  # socket.gaierror
        answer = exc.strerror or str(exc)
    if len(_resolved) >= 4096:  # a crude bound: hosts are few in practice
        _resolved.clear()
    ttl = UNRESOLVED_TTL if isinstance(answer, str) else RESOLVED_TTL
    _resolved[host] = (now + ttl, answer)
    return answer


def _image_urls(request: ChatRequest) -> list[str]:
    urls: list[str] = []
    for message in request.messages:
        for part in message.parts:
            inner = part.content if isinstance(part, ToolResultPart) else [part]
            urls.extend(
                item.url
                for item in inner
                if isinstance(item, ImagePart)
                and item.url is not None
                and item.url.startswith(("http://", "https://"))
            )
    return urls


def _where(request: ChatRequest, url: str) -> str:
    """The field holding ``url`` in the client's own body (its dialect's path)."""
    found = find_path(request.raw, url) if request.raw is not None else None
    return found or "image URL"


class _NotPublic(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _public_host(url: str) -> tuple[str, Address | None]:
    """The URL's host and its address when literal; ``_NotPublic`` when not public.

    The host is read the way browsers and most HTTP clients read it (WHATWG URL):
    percent-decoded, IDNA-mapped (full-width digits and dots count), IPv4 in any form
    ``inet_aton`` takes (``2130706433``, ``0x7f.1``, ``0177.0.0.1``, ``127.1``).
    """
    if _UNSAFE_URL_CHAR.search(url):
        # WHATWG parsers end the host at a backslash, urlsplit does not: refused rather
        # than read one way here and another by the upstream.
        raise _NotPublic("backslashes, spaces and control characters are not allowed")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a junk or out-of-range port
    except ValueError as exc:
        raise _NotPublic(f"malformed URL ({exc})") from None
    if "@" in parts.netloc:  # http://cdn.example.com@10.0.0.1/ reads one way to people
        raise _NotPublic("user info (user@host) is not allowed")
    host = unquote(parts.hostname or "")
    if not host:
        raise _NotPublic("the URL has no host")
    if parts.netloc.startswith("["):
        try:
            address: Address = ipaddress.IPv6Address(host)
        except ValueError:
            raise _NotPublic(f"{host!r} is not an IPv6 address") from None
        _check_address(address, host)
        return host, address
    try:
        host = host.rstrip(".").encode("idna").decode("ascii").lower()
    except UnicodeError:
        host = ""
    if not _HOST_NAME.fullmatch(host):
        raise _NotPublic(f"{unquote(parts.hostname or '')!r} is not a valid host name")
    ipv4 = _ipv4(host)
    if ipv4 is not None:
        _check_address(ipv4, host)
        return host, ipv4
    if host == "localhost" or host.endswith(_PRIVATE_SUFFIXES) or "." not in host:
        raise _NotPublic(f"the host {host} is not a public host name")
    return host, None


def _ipv4(host: str) -> ipaddress.IPv4Address | None:
    """``host`` as an IPv4 address read as WHATWG and inet_aton do; None for a name.

    A host whose last label is a number is an address (``1.2.3.999`` an invalid one,
    refused), whatever the other labels hold.
    """
    labels = host.split(".")
    if _ipv4_number(labels[-1]) is None:
        return None
    numbers = [_ipv4_number(label) for label in labels]
    values = [number for number in numbers if number is not None]
    if (
        len(values) != len(numbers)
        or len(values) > 4
        or any(value > 255 for value in values[:-1])
        or values[-1] >= 256 ** (5 - len(values))
    ):
        raise _NotPublic(f"{host} is not a valid IPv4 address")
    total = values[-1]
    for index, value in enumerate(values[:-1]):
        total += value << (8 * (3 - index))
    return ipaddress.IPv4Address(total)


def _ipv4_number(label: str) -> int | None:
    if label[:2] in ("0x", "0X"):
        digits, base, allowed = label[2:], 16, string.hexdigits
    elif len(label) > 1 and label.startswith("0"):
        digits, base, allowed = label[1:], 8, string.octdigits
    else:
        digits, base, allowed = label, 10, string.digits
    if label == "" or not all(char in allowed for char in digits):
        return None
    return int(digits, base) if digits else 0


def _address_problem(address: Address) -> str | None:
    """What kind of non-public address this is, or None for a public one."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return _address_problem(embedded)
        if address.scope_id:
            return "a link-local address"
    for kind, test in (
        ("an unspecified address", address.is_unspecified),
        ("a loopback address", address.is_loopback),
        ("a link-local address", address.is_link_local),
        ("a multicast address", address.is_multicast),
        ("a private address", address.is_private),
        ("a reserved address", address.is_reserved),
        ("a non-public address", not address.is_global),
    ):
        if test:
            return kind
    return None


def _check_address(address: Address, host: str) -> None:
    problem = _address_problem(address)
    if problem is not None:
        shown = host if host == str(address) else f"{host}, that is {address}"
        raise _NotPublic(f"the host is {problem} ({shown})")


def _refused(where: str, reason: str) -> RelayError:
    return RelayError(
        400,
        f"{where}: {reason}; image URLs must point to public hosts",
        param=where if where != "image URL" else None,
        code="invalid_image_url",
    )
