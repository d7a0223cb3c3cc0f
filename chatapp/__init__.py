"""Switchboard's project package: settings, URLs, ASGI, Celery, and the model relay."""

from __future__ import annotations

from chatapp.celery import app as celery_app

__all__ = ["celery_app"]
