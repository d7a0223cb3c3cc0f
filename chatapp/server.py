"""Daphne on uvloop: ``python -m chatapp.server [daphne's arguments] chatapp.asgi:application``.

Daphne runs Twisted's asyncio reactor on the event loop it makes as it loads
(``daphne.server``), an ``asyncio`` loop unless a loop policy was set before.  This
sets uvloop's (the loop uvicorn takes with ``--loop uvloop``; uvicorn's ``standard``
extra installs it), then hands over to Daphne's own command line: the same
arguments, the same server.  Under a burst of chat sends every frame, timer and
socket of the worker goes through the loop: 200 sends at once, runs in turns, first
words p50 0.31 -> 0.27 s with Redis (embedded 0.28 -> 0.27 s), worker CPU up to
-14 %; 1,000 on two workers, CPU -14 % (README, *Benchmarks*).

Where uvloop is missing (Windows, or an install without it) Daphne runs on
``asyncio``'s loop, as ``daphne`` itself would.
"""

from __future__ import annotations

import asyncio
import sys


def use_uvloop() -> bool:
    """Make new event loops uvloop's, before Daphne makes its own; True if they are.

    Call before anything imports ``daphne.server`` (``manage.py serve`` does).
    """
    if "daphne.server" in sys.modules:  # its loop is made: too late to change it
        return type(sys.modules["daphne.server"].twisted_loop).__module__.startswith("uvloop")
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def main(argv: list[str] | None = None) -> None:
    use_uvloop()
    from daphne.cli import CommandLineInterface

    CommandLineInterface().run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
