"""The browser chat's pages and fragments."""

from __future__ import annotations

from django.urls import path

from chatapp.chat import views

urlpatterns = [
    path("", views.chat, name="chat"),
    path("<int:conversation_id>/", views.chat, name="conversation"),
    path("list/", views.conversation_list, name="conversation-list"),
    path(
        "<int:conversation_id>/messages/",
        views.conversation_messages,
        name="conversation-messages",
    ),
    path("<int:conversation_id>/title/", views.conversation_title, name="conversation-title"),
    path(
        "<int:conversation_id>/settings/",
        views.conversation_settings,
        name="conversation-settings",
    ),
    path("<int:conversation_id>/rename/", views.conversation_rename, name="conversation-rename"),
    path("<int:conversation_id>/delete/", views.conversation_delete, name="conversation-delete"),
    path("messages/<int:message_id>/switch/", views.switch_branch, name="switch-branch"),
    path("attachments/", views.upload_attachment, name="upload-attachment"),
    path("attachments/<int:attachment_id>/", views.attachment_file, name="attachment"),
]
