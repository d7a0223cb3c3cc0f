from __future__ import annotations

from django.urls import path

from accounts import views

app_name = "accounts"
urlpatterns = [
    path("login/", views.login, name="login"),
    path("logout/", views.logout, name="logout"),
    # The one-time links the console hands out (accounts.actions.do_issue_password_link).
    path(
        "set-password/<uidb64>/<token>/",
        views.SetPasswordView.as_view(),
        name="set_password",
    ),
    path("set-password/done/", views.set_password_done, name="set_password_done"),
]

# Mounted under /console/ in the "console" namespace (chatapp/urls.py).
console_urlpatterns = [
    path("", views.console_home, name="home"),
    path("users/", views.console_users, name="users"),
    path("users/new/", views.console_user_new, name="user_new"),
    path("users/<int:pk>/", views.console_user, name="user"),
    path("users/<int:pk>/role/", views.console_user_role, name="user_role"),
    path("users/<int:pk>/active/", views.console_user_active, name="user_active"),
    path(
        "users/<int:pk>/password-link/",
        views.console_user_password_link,
        name="user_password_link",
    ),
    path("audit/", views.console_audit, name="audit"),
]
