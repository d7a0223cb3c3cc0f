"""Reading an upstream's server-sent events: line endings, split reads, pacing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
import uvloop
from aiohttp.client_proto import ResponseHandler

from chatapp.relay import http, sse
from tests.fake_upstream import FakeUpstream, Reply


async def _events(*reads: bytes, pace: Callable[[], float] | None = None) -> list[tuple[str, str]]:
    async def body() -> AsyncIterator[bytes]:
        for read in reads:
            yield read

    response = httpx.Response(200, content=body())
    return [event async for event in sse.events(response, pace)]


async def test_lines_may_end_in_lf_crlf_or_cr() -> None:
    assert await _events(b"data: a\n\nevent: x\r\ndata: b\r\n\r\ndata: c\r\rdata: d\n\n") == [
        ("message", "a"),
        ("x", "b"),
        ("message", "c"),
        ("message", "d"),
    ]


async def test_a_crlf_split_between_two_reads_ends_one_line_not_two() -> None:
    # Read as CR then LF it would be two line ends: an empty line, ending the
    # event before its second data line.
    assert await _events(b"data: one\r", b"\ndata: two\r\n\r\n") == [("message", "one\ntwo")]


async def test_a_character_split_between_two_reads_is_whole() -> None:
    encoded = "data: 你好\n\n".encode()
    assert await _events(encoded[:8], encoded[8:]) == [("message", "你好")]


async def test_the_last_event_needs_no_blank_line_nor_line_end() -> None:
    assert await _events(b": comment\nevent: end\ndata: {}\ndata: bye") == [("end", "{}\nbye")]


@pytest.fixture
def fake() -> AsyncIterator[FakeUpstream]:  # type: ignore[misc]
    server = FakeUpstream().start()
    yield server
    server.stop()


async def _reads(fake: FakeUpstream, pace: float | None) -> tuple[int, str, int]:
    """How many reads a stream of 20 pieces 10 ms apart took, its text, and how many
    times the event loop read the socket for it."""
    fake.script(Reply(text=" ".join(f"w{i}" for i in range(20)), chunk_delay=0.01))
    reads = 0
    socket_reads = 0

    def pacing() -> float:
        nonlocal reads
        reads += 1
        return pace or 0.0

    text = ""
    # The relay's own client: its transport decides what one read holds.
    async with http.client().stream(
        "POST",
        f"{fake.openai_base_url}/chat/completions",
        json={"model": "up", "stream": True, "messages": [{"role": "user", "content": "Hi"}]},
    ) as response:
        socket = http.socket_of(response)
        assert socket is not None
        protocol = socket.get_protocol()
        received = protocol.data_received

        def counted(data: bytes) -> None:
            nonlocal socket_reads
            socket_reads += bool(data)  # (aiohttp calls it with b"" to resume its parser)
            received(data)

        protocol.data_received = counted  # type: ignore[method-assign]
        async for _name, data in sse.events(response, pacing):
            if data != "[DONE]":
                for choice in json.loads(data)["choices"]:
                    text += choice["delta"].get("content") or ""
    return reads, text, socket_reads


async def test_a_paced_reader_gets_the_pieces_sent_meanwhile_in_one_read(
    fake: FakeUpstream,
) -> None:
    words = " ".join(f"w{i}" for i in range(20))
    eager, eager_text, eager_socket = await _reads(fake, None)
    paced, paced_text, paced_socket = await _reads(fake, 0.1)
    await http.aclose()
    assert eager_text == paced_text == words
    # About one read per piece as they come; paced, a read per 0.1 s of a 0.2 s stream.
    assert eager >= 15
    assert paced <= 5
    # Nor does the event loop wake for each piece meanwhile: the socket is not watched
    # while the reader rests, and what came in is read at once afterwards.
    assert eager_socket >= 15
    assert paced_socket <= 6


def test_a_paced_reader_rests_without_reads_on_uvloop_too(
    fake: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The workers run on uvloop (Daphne through chatapp.server, uvicorn), whose
    # transports have asyncio's methods without deriving from its classes.  (uvloop
    # binds the protocol's data_received when the connection is made: counted on the
    # class.)
    socket_reads = 0
    received = ResponseHandler.data_received

    def counted(self: ResponseHandler, data: bytes) -> None:
        nonlocal socket_reads
        socket_reads += bool(data)
        received(self, data)

    monkeypatch.setattr(ResponseHandler, "data_received", counted)

    async def reads(pace: float | None) -> tuple[str, int]:
        nonlocal socket_reads
        socket_reads = 0
        _reads_paced, text, _ = await _reads(fake, pace)
        return text, socket_reads

    async def eager_then_paced() -> tuple[tuple[str, int], tuple[str, int]]:
        try:
            return await reads(None), await reads(0.1)
        finally:
            await http.aclose()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        (eager_text, eager_reads), (paced_text, paced_reads) = runner.run(eager_then_paced())
    assert eager_text == paced_text == " ".join(f"w{i}" for i in range(20))
    assert eager_reads >= 15  # one socket read per piece as they come...
    assert paced_reads <= 6  # ...but none while the reader rests
