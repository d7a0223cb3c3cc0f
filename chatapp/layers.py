"""The embedded mode's channel layer.

Channels' ``InMemoryChannelLayer`` walks every channel's queue and every group's
members on each ``send``, ``receive`` and ``group_send`` to drop expired entries.
With a few hundred chat sockets open and a reply's frames published many times a
second, that walk was the worker's single largest cost (``.ci/chat_load.py
--profile``).  Here it runs at most once a second: a message expires at most a
second after its ``expiry`` (60 s by default), a group membership a second after
``group_expiry`` (a day).
"""

from __future__ import annotations

import time

from channels.layers import InMemoryChannelLayer as BaseInMemoryChannelLayer

CLEAN_EVERY = 1.0  # seconds between walks over every channel and group


class InMemoryChannelLayer(BaseInMemoryChannelLayer):
    _cleaned_at = 0.0

    def _clean_expired(self) -> None:
        now = time.monotonic()
        if now - self._cleaned_at < CLEAN_EVERY:
            return
        self._cleaned_at = now
        super()._clean_expired()
