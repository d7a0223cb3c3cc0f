"""Image URLs that would have an upstream fetch from inside the network are refused.

vLLM and Ollama fetch ``image_url`` URLs themselves: without this a client could
have them read the cloud metadata service or anything on loopback.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

from chatapp.relay import validation
from chatapp.relay.canonical import ChatRequest, ImagePart, Message, TextPart, ToolResultPart
from chatapp.relay.errors import RelayError
from chatapp.relay.validation import acheck_image_hosts, image_from_url

# Taken before any fixture replaces it (a suite-wide fake may stand in for DNS).
real_resolve_host = validation.resolve_host

WHERE = "messages[0].content[1].image_url.url"

# Literal hosts, each in a spelling some HTTP client or resolver reads as inside.
INSIDE = [
    ("http://127.0.0.1/a.png", "a loopback address (127.0.0.1)"),
    ("http://169.254.169.254/latest/meta-data/", "a link-local address (169.254.169.254)"),
    ("http://10.1.2.3/a.png", "a private address (10.1.2.3)"),
    ("http://192.168.0.1:8080/a.png", "a private address (192.168.0.1)"),
    ("http://172.16.5.4/a.png", "a private address (172.16.5.4)"),
    ("http://100.64.0.1/a.png", "a non-public address (100.64.0.1)"),  # carrier-grade NAT
    ("http://0.0.0.0/a.png", "an unspecified address (0.0.0.0)"),
    ("http://0/a.png", "an unspecified address (0, that is 0.0.0.0)"),
    ("http://224.0.0.1/a.png", "a multicast address (224.0.0.1)"),
    ("http://240.0.0.1/a.png", "a private address (240.0.0.1)"),
    ("http://2130706433/a.png", "a loopback address (2130706433, that is 127.0.0.1)"),
    ("http://0x7f.1/a.png", "a loopback address (0x7f.1, that is 127.0.0.1)"),
    ("http://0x7f000001/a.png", "a loopback address (0x7f000001, that is 127.0.0.1)"),
    ("http://0177.0.0.1/a.png", "a loopback address (0177.0.0.1, that is 127.0.0.1)"),
    ("http://127.1/a.png", "a loopback address (127.1, that is 127.0.0.1)"),
    ("http://169.254.43518/", "a link-local address (169.254.43518, that is 169.254.169.254)"),
    ("http://127.0.0.1./a.png", "a loopback address (127.0.0.1)"),
    ("http://%31%32%37.0.0.1/a.png", "a loopback address (127.0.0.1)"),
    ("http://１２７．０．０．１/a.png", "a loopback address (127.0.0.1)"),  # full-width
    ("http://[::1]/a.png", "a loopback address (::1)"),
    ("http://[::]/a.png", "an unspecified address (::)"),
    ("http://[fe80::1]/a.png", "a link-local address (fe80::1)"),
    ("http://[fe80::1%25eth0]/a.png", "a link-local address (fe80::1%eth0)"),
    ("http://[fd00::1]/a.png", "a private address (fd00::1)"),
    ("http://[ff02::1]/a.png", "a multicast address (ff02::1)"),
    (
        "http://[::ffff:127.0.0.1]/a.png",
        "a loopback address (::ffff:127.0.0.1, that is ::ffff:7f00:1)",
    ),
    ("http://[::ffff:a9fe:a9fe]/a.png", "a link-local address (::ffff:a9fe:a9fe)"),
    ("http://[::127.0.0.1]/a.png", "a reserved address (::127.0.0.1, that is ::7f00:1)"),
    ("http://[64:ff9b::a00:1]/a.png", "a private address (64:ff9b::a00:1)"),  # NAT64
    ("http://[2002:7f00:1::]/a.png", "a loopback address (2002:7f00:1::)"),  # 6to4
]

NOT_PUBLIC_NAMES = [
    ("http://localhost/a.png", "the host localhost is not a public host name"),
    ("http://LOCALHOST./a.png", "the host localhost is not a public host name"),
    ("http://api.localhost/a.png", "the host api.localhost is not a public host name"),
    ("http://printer.local/a.png", "the host printer.local is not a public host name"),
    ("http://metadata.google.internal/", "is not a public host name"),
    ("http://metadata/computeMetadata/v1/", "the host metadata is not a public host name"),
]

MALFORMED = [
    ("http://cdn.example.com@127.0.0.1/a.png", "user info (user@host) is not allowed"),
    ("http://user:pw@cdn.example.com/a.png", "user info (user@host) is not allowed"),
    ("http://127.0.0.1\\@cdn.example.com/a.png", "backslashes, spaces and control"),
    ("http://cdn.example.com\\.127.0.0.1/", "backslashes, spaces and control"),
    ("http://cdn.example.com /a.png", "backslashes, spaces and control"),
    ("http://cdn.example.com\t/a.png", "backslashes, spaces and control"),
    ("http://1.2.3.256/a.png", "1.2.3.256 is not a valid IPv4 address"),
    ("http://1.2.3.4.5/a.png", "1.2.3.4.5 is not a valid IPv4 address"),
    ("http://cdn.example.123/a.png", "cdn.example.123 is not a valid IPv4 address"),
    ("http://[1.2.3.4]/a.png", "malformed URL"),
    ("http://[::1/a.png", "malformed URL"),
    ("http://cdn.example.com:99999/a.png", "malformed URL"),
    ("http:///a.png", "the URL has no host"),
    ("http://a..b.com/a.png", "is not a valid host name"),
    ("http://cdn%2fexample.com/a.png", "is not a valid host name"),
]

PUBLIC = [
    "https://example.com/cat.png",
    "https://cdn.example.com:8443/a/b.png?x=1@2#frag@",  # "@" outside the host is fine
    "http://93.184.215.14/a.png",
    "http://[2606:4700:4700::1111]/a.png",
    "https://xn--bcher-kva.example/a.png",
    "https://bücher.example/a.png",
    "http://8.8.8.8./a.png",
]


@pytest.fixture(autouse=True)
def _no_cached_lookups() -> Iterator[None]:
    validation.forget_resolved()
    yield
    validation.forget_resolved()


def refusal_of(url: str) -> RelayError:
    with pytest.raises(RelayError) as caught:
        image_from_url(url, WHERE)
    return caught.value


@pytest.mark.parametrize(("url", "reason"), INSIDE)
def test_a_literal_address_inside_is_refused_naming_the_field(url: str, reason: str) -> None:
    error = refusal_of(url)
    assert error.status == 400
    assert error.param == WHERE
    assert error.code == "invalid_image_url"
    assert error.message == (
        f"{WHERE}: the host is {reason}; image URLs must point to public hosts"
    )


@pytest.mark.parametrize(("url", "reason"), NOT_PUBLIC_NAMES + MALFORMED)
def test_names_that_are_never_public_and_tricky_urls_are_refused(url: str, reason: str) -> None:
    error = refusal_of(url)
    assert error.param == WHERE
    assert reason in error.message


@pytest.mark.parametrize("url", PUBLIC)
def test_public_hosts_and_data_urls_pass(url: str) -> None:
    assert image_from_url(url, WHERE) == ImagePart(url=url)


def test_the_setting_allows_private_image_urls(settings) -> None:  # type: ignore[no-untyped-def]
    settings.SWITCHBOARD_ALLOW_PRIVATE_IMAGE_URLS = True
    for url, _reason in INSIDE + NOT_PUBLIC_NAMES:
        assert image_from_url(url, WHERE).url == url


def test_the_dialect_parsers_refuse_them_with_the_clients_field_path() -> None:
    from chatapp.relay.dialects.anthropic import parse_messages_request
    from chatapp.relay.dialects.openai import parse_chat_request

    with pytest.raises(RelayError) as caught:
        parse_chat_request(
            {
                "model": "m",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What is this?"},
                            {"type": "image_url", "image_url": {"url": "http://169.254.169.254/"}},
                        ],
                    },
                ],
            }
        )
    assert caught.value.param == "messages[1].content[1].image_url.url"

    with pytest.raises(RelayError) as caught:
        parse_messages_request(
            {
                "model": "m",
                "max_tokens": 10,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "source": {"type": "url", "url": "http://[::1]/"}}
                        ],
                    }
                ],
            }
        )
    assert caught.value.param == "messages[0].content[0].source.url"


# --- Host names, resolved ---


def chat_with_images(*urls: str, tool_result_url: str | None = None) -> ChatRequest:
    """An OpenAI-shaped request with ``urls`` as image parts, raw body included."""
    content = [{"type": "text", "text": "Compare"}] + [
        {"type": "image_url", "image_url": {"url": url}} for url in urls
    ]
    messages = [Message("user", [TextPart("Compare"), *(ImagePart(url=url) for url in urls)])]
    if tool_result_url is not None:
        messages.append(
            Message("tool", [ToolResultPart("call_1", [ImagePart(url=tool_result_url)])])
        )
    raw = {"model": "m", "messages": [{"role": "user", "content": content}]}
    return ChatRequest(model="m", messages=messages, raw=raw, dialect="openai")


class FakeResolver:
    """Stands in for ``validation.resolve_host``: answers from a table, counts lookups."""

    def __init__(self, answers: dict[str, list[str] | Exception]) -> None:
        self.answers = answers
        self.looked_up: list[str] = []

    async def __call__(self, host: str) -> list[str]:
        self.looked_up.append(host)
        answer = self.answers[host]
        if isinstance(answer, Exception):
            raise answer
        return answer


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> FakeResolver:
    fake = FakeResolver(
        {
            "cdn.example.com": ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"],
            "img.example.org": ["151.101.1.1"],
            "rebind.example.net": ["93.184.215.14", "10.0.0.5"],
            "meta.example.net": ["169.254.169.254"],
            "six.example.net": ["::ffff:127.0.0.1"],
            "gone.example.com": socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
            "slow.example.com": TimeoutError(),
        }
    )
    monkeypatch.setattr(validation, "resolve_host", fake)
    return fake


async def test_hosts_resolving_to_public_addresses_pass(resolver: FakeResolver) -> None:
    request = chat_with_images(
        "https://cdn.example.com/a.png",
        "https://img.example.org/b.png",
        "https://cdn.example.com/c.png",
        "http://93.184.215.14/d.png",  # literal: nothing to look up
        "data:image/png;base64,iVBORw0KGgo=",
    )
    await acheck_image_hosts(request)
    assert sorted(resolver.looked_up) == ["cdn.example.com", "img.example.org"]


async def test_a_host_resolving_inside_is_refused_naming_the_field(resolver: FakeResolver) -> None:
    request = chat_with_images("https://img.example.org/b.png", "https://meta.example.net/x")
    with pytest.raises(RelayError) as caught:
        await acheck_image_hosts(request)
    assert caught.value.status == 400
    assert caught.value.param == "messages[0].content[2].image_url.url"
    assert caught.value.message == (
        "messages[0].content[2].image_url.url: the host meta.example.net resolves to"
        " a link-local address (169.254.169.254); image URLs must point to public hosts"
    )


async def test_one_inside_address_among_public_ones_is_enough(resolver: FakeResolver) -> None:
    with pytest.raises(RelayError, match=r"resolves to a private address \(10\.0\.0\.5\)"):
        await acheck_image_hosts(chat_with_images("https://rebind.example.net/a.png"))
    with pytest.raises(RelayError, match=r"resolves to a loopback address \(::ffff:127\.0\.0\.1\)"):
        await acheck_image_hosts(chat_with_images("https://six.example.net/a.png"))


async def test_a_host_that_does_not_resolve_is_refused(resolver: FakeResolver) -> None:
    with pytest.raises(RelayError) as caught:
        await acheck_image_hosts(chat_with_images("https://gone.example.com/a.png"))
    assert caught.value.message == (
        f"{WHERE}: cannot resolve the host gone.example.com (Name or service not known);"
        " image URLs must point to public hosts"
    )
    with pytest.raises(RelayError, match=r"cannot resolve the host slow\.example\.com \(no answer"):
        await acheck_image_hosts(chat_with_images("https://slow.example.com/a.png"))


async def test_images_in_tool_results_are_checked_too(resolver: FakeResolver) -> None:
    request = chat_with_images(tool_result_url="https://meta.example.net/x")
    with pytest.raises(RelayError) as caught:
        await acheck_image_hosts(request)
    # Not in the raw body here: the message names the URL's place generically.
    assert caught.value.param is None
    assert caught.value.message.startswith("image URL: the host meta.example.net resolves")


async def test_answers_are_cached_briefly(
    resolver: FakeResolver, monkeypatch: pytest.MonkeyPatch
) -> None:
    request = chat_with_images("https://cdn.example.com/a.png")
    await acheck_image_hosts(request)
    await acheck_image_hosts(request)
    assert resolver.looked_up == ["cdn.example.com"]
    for _ in range(2):
        with pytest.raises(RelayError):
            await acheck_image_hosts(chat_with_images("https://gone.example.com/a.png"))
    assert resolver.looked_up == ["cdn.example.com", "gone.example.com"]

    # Past the time to live, the name is looked up again.
    now = validation.time.monotonic()
    monkeypatch.setattr(validation.time, "monotonic", lambda: now + validation.RESOLVED_TTL + 1)
    await acheck_image_hosts(request)
    assert resolver.looked_up.count("cdn.example.com") == 2


async def test_lookups_are_concurrent(monkeypatch: pytest.MonkeyPatch) -> None:
    running = 0
    most = 0

    async def slow_public(host: str) -> list[str]:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.05)
        running -= 1
        return ["93.184.215.14"]

    monkeypatch.setattr(validation, "resolve_host", slow_public)
    await acheck_image_hosts(
        chat_with_images(*(f"https://h{i}.example.com/a.png" for i in range(5)))
    )
    assert most == 5


async def test_too_many_distinct_hosts_are_refused(resolver: FakeResolver) -> None:
    urls = [f"https://h{i}.example.com/a.png" for i in range(validation.MAX_IMAGE_HOSTS + 1)]
    with pytest.raises(RelayError, match=r"Images come from 33 different hosts: the limit is 32"):
        await acheck_image_hosts(chat_with_images(*urls))
    assert resolver.looked_up == []


async def test_the_setting_turns_the_lookup_off(resolver: FakeResolver, settings) -> None:  # type: ignore[no-untyped-def]
    settings.SWITCHBOARD_ALLOW_PRIVATE_IMAGE_URLS = True
    await acheck_image_hosts(chat_with_images("https://meta.example.net/x", "http://127.0.0.1/"))
    assert resolver.looked_up == []


async def test_the_real_resolver_reads_the_hosts_file() -> None:
    # localhost comes from /etc/hosts: no network needed.
    addresses = await real_resolve_host("localhost")
    assert "127.0.0.1" in addresses or "::1" in addresses


def test_the_setting_is_a_strict_boolean() -> None:
    from django.core.exceptions import ImproperlyConfigured

    from chatapp.environ import Env

    name = "SWITCHBOARD_ALLOW_PRIVATE_IMAGE_URLS"
    assert Env({}).flag(name, False) is False
    assert Env({name: "true"}).flag(name, False) is True
    with pytest.raises(ImproperlyConfigured, match=name):
        Env({name: "sure"}).flag(name, False)
