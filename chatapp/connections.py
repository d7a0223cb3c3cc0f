"""Database work on executor threads of our own (the chat's writes, the dashboards' reads)."""

from __future__ import annotations

from collections.abc import Callable
from typing import ParamSpec, TypeVar

from django.db import connections

P = ParamSpec("P")
R = TypeVar("R")


def on_own_connection(function: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """``function(*args, **kwargs)``, then this thread's connections back to the pool.

    For a thread that outlives the call: nothing else gives its connections back
    (Django does at the end of a request; Channels' ``close_old_connections`` left
    them checked out), and a thread that keeps one holds it for good.
    """
    try:
        return function(*args, **kwargs)
    finally:
        connections.close_all()
