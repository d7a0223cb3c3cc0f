from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

from chatapp import metrics, views

urlpatterns = [
    path("", views.home, name="home"),
    path("healthz", views.healthz, name="healthz"),
    path("metrics", metrics.metrics_view, name="metrics"),
    path("chat/", include("chatapp.chat.urls")),
    path("v1/", include("chatapp.relay.urls")),
    path("accounts/", include("accounts.urls")),
    path("i18n/", include("django.conf.urls.i18n")),
    path("admin/", admin.site.urls),
]
