from __future__ import annotations

from django.urls import URLPattern, URLResolver

# Mounted under /console/ in the "console" namespace (chatapp/urls.py).
console_urlpatterns: list[URLPattern | URLResolver] = []
