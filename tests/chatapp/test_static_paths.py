"""Static paths that climb out of the static roots, in every encoding: 404, never 500."""

from __future__ import annotations

from urllib.parse import unquote

import pytest
from asgiref.testing import ApplicationCommunicator

from chatapp.asgi import application

# As a client sends them; the server percent-decodes the path once (uvicorn, Daphne).
CLIMBING = [
    "/static/%2e%2e/%2e%2e/etc/passwd",
    "/static/..%2f..%2fsettings.py",
    "/static/css/%2e%2e%5c..",
    "/static/%2e%2e%2fchatapp%2fsettings.py",
    "/static/..%5c..%5cchatapp%5csettings.py",
    "/static/%252e%252e/%252e%252e/etc/passwd",  # Django's file_path decodes once more
    "/static/../chatapp/settings.py",
    "/static/css/base.css%00.txt",
]


async def get(raw_path: str) -> tuple[int, bytes]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": unquote(raw_path),
        "raw_path": raw_path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }
    communicator = ApplicationCommunicator(application, scope)
    await communicator.send_input({"type": "http.request", "body": b""})
    start = await communicator.receive_output(timeout=5)
    body = b""
    while True:
        message = await communicator.receive_output(timeout=5)
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await communicator.send_input({"type": "http.disconnect"})
    await communicator.wait(timeout=5)
    return start["status"], body


@pytest.mark.parametrize("raw_path", CLIMBING)
async def test_a_path_out_of_the_static_roots_is_404(raw_path: str) -> None:
    status, body = await get(raw_path)
    assert status == 404
    assert b"SECRET_KEY" not in body
    assert b"root:" not in body


async def test_static_files_are_still_served() -> None:
    status, body = await get("/static/css/base.css")
    assert status == 200
    assert body
    # A ".." that stays inside the root is just a longer way to the same file.
    assert await get("/static/css/%2e%2e/css/base.css") == (200, body)
