from __future__ import annotations

from django.urls import URLPattern, URLResolver, path

from keys import views

# Mounted under /console/ in the "console" namespace (chatapp/urls.py).
console_urlpatterns: list[URLPattern | URLResolver] = [
    path("keys/", views.key_list, name="keys"),
    path("keys/new/", views.key_create, name="key_create"),
    path("keys/<int:pk>/", views.key_detail, name="key"),
    path("keys/<int:pk>/edit/", views.key_edit, name="key_edit"),
    path("keys/<int:pk>/revoke/", views.key_revoke, name="key_revoke"),
    path("keys/<int:pk>/rotate/", views.key_rotate, name="key_rotate"),
    path("keys/policy/<int:user_id>/", views.key_policy, name="key_policy"),
    path(
        "keys/policy/<int:user_id>/alerts/",
        views.user_alert_thresholds,
        name="user_alert_thresholds",
    ),
    path("alerts/", views.alert_list, name="alerts"),
    path("prices/", views.price_list, name="prices"),
    path("prices/<path:ref>/", views.price_history, name="price_history"),
]

# The usage dashboard and request log (keys.usage_views).
from keys import usage_views  # noqa: E402

console_urlpatterns += [
    path("usage/", usage_views.usage_dashboard, name="usage"),
    path("usage/live/", usage_views.usage_live, name="usage_live"),
    path("usage/csv/", usage_views.usage_csv, name="usage_csv"),
    path("usage/requests/", usage_views.usage_requests, name="usage_requests"),
    path("usage/requests/<int:pk>/", usage_views.usage_request, name="usage_request"),
]

# The finance reports and their exports (keys.report_views).
from keys import report_views  # noqa: E402

console_urlpatterns += [
    path("reports/", report_views.report_page, name="reports"),
    path("reports/export/", report_views.report_export, name="reports_export"),
]

# Monthly statements, closed months and adjustments (keys.statement_views).
from keys import statement_views  # noqa: E402

console_urlpatterns += [
    path("reports/statements/", statement_views.statement_list, name="statements"),
    path(
        "reports/statements/produce/", statement_views.statement_produce, name="statement_produce"
    ),
    path(
        "reports/statements/<str:month>/", statement_views.statement_month, name="statement_month"
    ),
    path(
        "reports/statements/file/<int:pk>.<str:kind>",
        statement_views.statement_file,
        name="statement_file",
    ),
]
