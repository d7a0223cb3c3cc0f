from __future__ import annotations

from django.urls import path, re_path

from chatapp.relay import openapi, views

urlpatterns = [
    path("chat/completions", views.chat_completions, name="v1-chat-completions"),
    path("responses", views.responses, name="v1-responses"),
    path("messages", views.messages, name="v1-messages"),
    path("messages/count_tokens", views.count_tokens, name="v1-count-tokens"),
    path("embeddings", views.embeddings, name="v1-embeddings"),
    path("models", views.models_list, name="v1-models"),
    path("models/<path:name>", views.model_detail, name="v1-model"),
    path("openapi.json", openapi.openapi_json, name="v1-openapi"),
    re_path(r"^(?P<path>.*)$", views.not_found),
]
