"""The Celery application; tasks run eagerly in the embedded mode (no REDIS_URL)."""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatapp.settings")

app = Celery("switchboard")
app.config_from_object("django.conf:settings", namespace="CELERY")
# The chat's tasks live in a sub-package (chatapp.chat.tasks), which Django's app
# list does not name.
app.autodiscover_tasks()
app.autodiscover_tasks(["chatapp.chat"])
