from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

from chatapp import views

urlpatterns = [
    path("", views.home, name="home"),
    path("healthz", views.healthz, name="healthz"),
    path("chat/", views.chat, name="chat"),
    path("chat/<int:conversation_id>/", views.chat, name="conversation"),
    path("chat/list/", views.conversation_list, name="conversation-list"),
    path(
        "chat/<int:conversation_id>/messages/",
        views.conversation_messages,
        name="conversation-messages",
    ),
    path("chat/<int:conversation_id>/title/", views.conversation_title, name="conversation-title"),
    path(
        "chat/<int:conversation_id>/settings/",
        views.conversation_settings,
        name="conversation-settings",
    ),
    path(
        "chat/<int:conversation_id>/rename/", views.conversation_rename, name="conversation-rename"
    ),
    path(
        "chat/<int:conversation_id>/delete/", views.conversation_delete, name="conversation-delete"
    ),
    path("chat/messages/<int:message_id>/switch/", views.switch_branch, name="switch-branch"),
    path("chat/attachments/", views.upload_attachment, name="upload-attachment"),
    path("chat/attachments/<int:attachment_id>/", views.attachment_file, name="attachment"),
    path("v1/", include("chatapp.relay.urls")),
    path("accounts/", include("accounts.urls")),
    path("i18n/", include("django.conf.urls.i18n")),
    path("admin/", admin.site.urls),
]
