"""The README's first command: ``manage.py serve`` sets up, serves, and says where to sign in.

A newcomer must not have to scroll for the first admin's password: it is printed
after the server is ready, in the last lines, with the address to open.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.live import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_serve_prints_the_address_and_the_first_admins_password_once_it_listens(
    tmp_path: Path,
) -> None:
    port = free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"DATABASE_URL", "REDIS_URL", "DJANGO_SETTINGS_MODULE"}
    }
    env |= {
        "SWITCHBOARD_DATA_DIR": str(tmp_path),
        "SWITCHBOARD_ADMIN_EMAIL": "owner@example.com",
        "PYTHONUNBUFFERED": "1",
    }
    process = subprocess.Popen(
        [sys.executable, "manage.py", "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 120
        assert process.stdout is not None
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            if lines[-1].startswith("Lost the admin's password?"):
                break
        output = "\n".join(lines)
        # The banner comes once the port answers: the page it names is there.
        assert f"Switchboard is ready: open http://127.0.0.1:{port}/" in output, output
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        banner = output[output.index("Switchboard is ready") :]
        assert "Created the first admin: owner@example.com" in banner
        password = next(
            line.split(": ", 1)[1] for line in lines if line.startswith("Generated password")
        )
        assert "Generated password" in banner
        # ...and it signs the admin in.
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            client.get("/accounts/login/")
            response = client.post(
                "/accounts/login/",
                data={
                    "username": "owner@example.com",
                    "password": password,
                    "csrfmiddlewaretoken": client.cookies["csrftoken"],
                },
                headers={"Referer": f"http://127.0.0.1:{port}/accounts/login/"},
            )
            assert response.status_code == 302, response.text[:500]
            # Django's admin asks for /favicon.ico: it is the product's icon, not a 404.
            icon = client.get("/favicon.ico", follow_redirects=True)
            assert icon.status_code == 200
            assert icon.headers["content-type"].startswith("image/svg")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
