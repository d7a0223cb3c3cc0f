"""Daphne runs on uvloop, started as the README says (``python -m chatapp.server``, ``manage.py serve``).

Each check is a fresh process: Daphne makes its event loop once, as it loads.  That
the server then serves (the chat, SIGTERM's drain) is shown by the tests that start
it: ``test_shutdown``, ``test_chat_multiprocess``, ``test_serve``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from django.conf import settings

ROOT = Path(__file__).resolve().parents[2]

LOOP_OF_DAPHNE = "import daphne.server; print(type(daphne.server.twisted_loop).__module__)"


def loop_of(code: str, tmp_path: Path) -> str:
    """The module of the event loop Daphne made in a process that ran ``code``."""
    env = {
        **os.environ,
        "SECRET_KEY": settings.SECRET_KEY,
        "SWITCHBOARD_DATA_DIR": str(tmp_path),
        "LOG_LEVEL": "WARNING",
    }
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    found = subprocess.run(
        [sys.executable, "-c", f"{code}\n{LOOP_OF_DAPHNE}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return found.stdout.strip().splitlines()[-1]


def test_the_server_module_starts_daphne_on_uvloop(tmp_path: Path) -> None:
    # Its own command line, as Daphne's: --help parses the arguments and exits.
    code = (
        "import contextlib, chatapp.server\n"
        "with contextlib.suppress(SystemExit):\n"
        "    chatapp.server.main(['--help'])"
    )
    assert loop_of(code, tmp_path) == "uvloop"


def test_manage_py_serve_starts_daphne_on_uvloop(tmp_path: Path) -> None:
    # Django loads Daphne's app (and with it Daphne's loop) before the command runs.
    code = (
        "import contextlib, sys, manage\n"
        "sys.argv = ['manage.py', 'serve', '--help']\n"
        "with contextlib.suppress(SystemExit):\n"
        "    manage.main()"
    )
    assert loop_of(code, tmp_path) == "uvloop"


def test_other_commands_leave_the_event_loop_alone(tmp_path: Path) -> None:
    code = (
        "import contextlib, sys, manage\n"
        "sys.argv = ['manage.py', 'check']\n"
        "with contextlib.suppress(SystemExit):\n"
        "    manage.main()"
    )
    assert loop_of(code, tmp_path).startswith("asyncio")


def test_without_uvloop_daphne_runs_on_asyncios_loop(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['uvloop'] = None\n"  # (an import of it fails)
        "import chatapp.server\n"
        "assert chatapp.server.use_uvloop() is False"
    )
    assert loop_of(code, tmp_path).startswith("asyncio")
