from __future__ import annotations

from django.urls import path

from accounts import views

app_name = "accounts"
urlpatterns = [
    path("login/", views.login, name="login"),
    path("logout/", views.logout, name="logout"),
]

# Mounted under /console/ in the "console" namespace (chatapp/urls.py).
console_urlpatterns = [
    path("", views.console_home, name="home"),
]
