"""Daphne runs on uvloop, started as the README says (``python -m chatapp.server``, ``manage.py serve``).

Each check is a fresh process: Daphne makes its event loop once, as it loads.  That
the server then serves (the chat, SIGTERM's drain) is shown by the tests that start
it: ``test_shutdown``, ``test_chat_multiprocess``, ``test_serve``.
"""

from __future__ import annotations

from pathlib import Path

from tests.live import fresh_python

LOOP_OF_DAPHNE = "import daphne.server; print(type(daphne.server.twisted_loop).__module__)"


def loop_of(code: str, tmp_path: Path) -> str:
    """The module of the event loop Daphne made in a process that ran ``code``."""
    return fresh_python(f"{code}\n{LOOP_OF_DAPHNE}", tmp_path).strip().splitlines()[-1]


def manage_py(*argv: str) -> str:
    """Code that runs ``manage.py argv`` as its command line does (an exit is let through)."""
    return (
        "import contextlib, sys, manage\n"
        f"sys.argv = ['manage.py', *{list(argv)!r}]\n"
        "with contextlib.suppress(SystemExit):\n"
        "    manage.main()"
    )


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
    assert loop_of(manage_py("serve", "--help"), tmp_path) == "uvloop"


def test_other_commands_leave_the_event_loop_alone(tmp_path: Path) -> None:
    assert loop_of(manage_py("check"), tmp_path).startswith("asyncio")


def test_without_uvloop_daphne_runs_on_asyncios_loop(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['uvloop'] = None\n"  # (an import of it fails)
        "import chatapp.server\n"
        "assert chatapp.server.use_uvloop() is False"
    )
    assert loop_of(code, tmp_path).startswith("asyncio")
