"""Static files served by the ASGI app, with every path that leaves the static roots a 404.

Django's ``ASGIStaticFilesHandler`` turns only ``Http404`` into a response: a path
that decodes to ``../..`` (``/static/%2e%2e/%2e%2e/etc/passwd``) makes the finders
raise ``SuspiciousFileOperation``, and one holding a NUL (``%00``) makes ``os.stat``
raise ``ValueError``; both escaped as 500s.  No file is served either way: this only
gives the client the 404 it should get instead of an error page and a logged trace.
"""

from __future__ import annotations

from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
from django.core.exceptions import SuspiciousFileOperation
from django.http import FileResponse, Http404, HttpRequest, HttpResponse


class StaticFilesHandler(ASGIStaticFilesHandler):
    def serve(self, request: HttpRequest) -> HttpResponse | FileResponse:
        try:
            return super().serve(request)
        except (SuspiciousFileOperation, ValueError):
            # The parent's get_response_async renders Http404 as the project's 404.
            raise Http404(f"{request.path!r} could not be found") from None
