from __future__ import annotations

from django.contrib import admin
from django.templatetags.static import static
from django.urls import URLPattern, URLResolver, include, path
from django.views.generic import RedirectView

from accounts import urls as accounts_urls
from chatapp import docs, metrics, views
from keys import urls as keys_urls

# One console, each app's pages beside the data they manage (accounts.console).
console_urlpatterns: list[URLPattern | URLResolver] = [
    *accounts_urls.console_urlpatterns,
    *keys_urls.console_urlpatterns,
    *views.console_urlpatterns,
]

urlpatterns = [
    path("", views.home, name="home"),
    path("healthz", views.healthz, name="healthz"),
    # Browsers ask for /favicon.ico on pages that name no icon (Django's admin).
    path("favicon.ico", RedirectView.as_view(url=static("favicon.svg"), permanent=True)),
    path("metrics", metrics.metrics_view, name="metrics"),
    path("chat/", include("chatapp.chat.urls")),
    path("docs/", docs.guide, name="docs"),
    path("v1/", include("chatapp.relay.urls")),
    path("accounts/", include("accounts.urls")),
    path("console/", include((console_urlpatterns, "console"))),
    path("i18n/", include("django.conf.urls.i18n")),
    path("admin/", admin.site.urls),
]
