"""The project's own pages: the home redirect and the health check.

The browser chat's pages live in ``chatapp.chat.views``; the ``/v1`` API in
``chatapp.relay.views``.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect
from django.urls import URLPattern, URLResolver
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from chatapp.health import run_checks


@require_GET
def home(request: HttpRequest) -> HttpResponse:
    if not request.user.is_authenticated:
        return redirect("accounts:login")
    return redirect("chat")


@never_cache
@require_GET
async def healthz(request: HttpRequest) -> JsonResponse:
    checks = await run_checks()
    down = [name for name, result in checks.items() if result["status"] != "up"]
    body: dict[str, object] = {"status": "down" if down else "ok", "checks": checks}
    if down:
        body["down"] = down
    return JsonResponse(body, status=503 if down else 200)


# Mounted under /console/ in the "console" namespace (chatapp/urls.py): the catalog's pages.
console_urlpatterns: list[URLPattern | URLResolver] = []
