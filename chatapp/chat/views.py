"""The chat page and its fragments: conversations, branches, attachments."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.decorators import login_required
from django.core.files.base import ContentFile
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils.translation import gettext as _
from django.views.decorators.http import require_GET, require_POST

from chatapp.chat import attachments
from chatapp.chat.actions import (
    ChatError,
    ConversationBusy,
    chat_models,
    default_chat_model,
    do_switch_branch,
)
from chatapp.chat.forms import ConversationSettingsForm
from chatapp.chat.fragments import branch_items, render_branch
from chatapp.models import Attachment, Conversation

# --- The browser chat ---

PAGE_SIZE = 30


def _conversation_page(request: HttpRequest) -> dict[str, Any]:
    query = request.GET.get("q", "").strip()
    conversations = Conversation.objects.visible_to(request.user).search(query)
    page = Paginator(conversations, PAGE_SIZE).get_page(request.GET.get("page"))
    current = request.GET.get("current", "")
    return {"page": page, "q": query, "current": int(current) if current.isdigit() else None}


@login_required
@require_GET
def chat(request: HttpRequest, conversation_id: int | None = None) -> HttpResponse:
    conversation = None
    items: list[dict[str, Any]] = []
    if conversation_id is not None:
        conversation = get_object_or_404(Conversation, pk=conversation_id, owner=request.user)
        items = branch_items(conversation)
    models = chat_models(user=request.user)
    default = default_chat_model(models)
    context = {
        "conversation": conversation,
        "items": items,
        "models": models,
        "default_model": default.name if default else "",
        "current_model": conversation.model if conversation else (default.name if default else ""),
        "strings": chat_strings(),
        **_conversation_page(request),
    }
    return render(request, "chatapp/chat.html", context)


def chat_strings() -> dict[str, str]:
    """Every word chat.js shows, in the page's language (read from a JSON block: no inline script)."""
    return {
        "Send": _("Send"),
        "Stop": _("Stop"),
        "Save": _("Save"),
        "Cancel": _("Cancel"),
        "Copy": _("Copy"),
        "Copied": _("Copied"),
        "Reconnecting": _("Reconnecting…"),
        "LeftOut": _("Earlier messages left out to fit the model:"),
        "NoVision": _("%(model)s cannot read images: remove the image or pick a model that can."),
        "NotImage": _("%(name)s: not an image."),
        "UploadFailed": _("The upload failed: try again."),
        "SwitchFailed": _("This version could not be shown: reload the page and try again."),
        "RemoveImage": _("Remove the image"),
        "SettingsFailed": _("The settings could not be saved: %(errors)s"),
        "EditMessage": _("Edit your message"),
        "Reasoning": _("Reasoning"),
    }


@login_required
@require_GET
def conversation_list(request: HttpRequest) -> HttpResponse:
    return render(request, "chatapp/chat.html#conversation-list", _conversation_page(request))


@login_required
@require_GET
def conversation_title(request: HttpRequest, conversation_id: int) -> HttpResponse:
    conversation = get_object_or_404(Conversation, pk=conversation_id, owner=request.user)
    return render(request, "chatapp/chat.html#chat-title", {"conversation": conversation})


@login_required
@require_GET
def conversation_messages(request: HttpRequest, conversation_id: int) -> HttpResponse:
    conversation = get_object_or_404(Conversation, pk=conversation_id, owner=request.user)
    return HttpResponse(render_branch(conversation))


@login_required
@require_POST
def switch_branch(request: HttpRequest, message_id: int) -> HttpResponse:
    try:
        conversation = do_switch_branch(user_id=int(request.user.pk or 0), message_id=message_id)
    except ConversationBusy as exc:
        return _refusal(str(exc), 409)
    except ChatError as exc:
        return _refusal(str(exc), 404)
    return HttpResponse(render_branch(conversation))


def _refusal(words: str, status: int) -> HttpResponse:
    """An action refused, in words the page shows as they are (``X-Chat-Refusal``)."""
    response = HttpResponse(words, status=status, content_type="text/plain; charset=utf-8")
    response["X-Chat-Refusal"] = "1"
    return response


@login_required
@require_POST
def conversation_settings(request: HttpRequest, conversation_id: int) -> HttpResponse:
    conversation = get_object_or_404(Conversation, pk=conversation_id, owner=request.user)
    form = ConversationSettingsForm(
        request.POST, instance=conversation, models=chat_models(user=request.user)
    )
    if not form.is_valid():
        return JsonResponse({"errors": form.errors}, status=400)
    # Only the settings: the page saves them as a conversation starts, while its first
    # reply is being saved and titled, and a whole-row save would write back the title
    # and the current branch this request read before them.  (The form has set them on
    # the instance.)  None saved: it was deleted meanwhile, in another tab.
    fields = ConversationSettingsForm.Meta.fields
    if not Conversation.objects.filter(pk=conversation.pk).update(
        **{name: getattr(conversation, name) for name in fields}
    ):
        raise Http404
    return JsonResponse({"ok": True, "model": conversation.model})


@login_required
@require_POST
def conversation_rename(request: HttpRequest, conversation_id: int) -> HttpResponse:
    conversation = get_object_or_404(Conversation, pk=conversation_id, owner=request.user)
    title = request.POST.get("title", "").strip()[:200]
    conversation.title = title
    conversation.title_generated = True
    conversation.save(update_fields=["title", "title_generated"])
    context = {**_conversation_page(request), "current": conversation.pk}
    return render(request, "chatapp/chat.html#conversation-list", context)


@login_required
@require_POST
def conversation_delete(request: HttpRequest, conversation_id: int) -> HttpResponse:
    conversation = get_object_or_404(Conversation, pk=conversation_id, owner=request.user)
    conversation.delete()
    if request.headers.get("HX-Request"):
        response = HttpResponse()
        response["HX-Redirect"] = reverse("chat")
        return response
    return redirect("chat")


@login_required
@require_POST
def upload_attachment(request: HttpRequest) -> JsonResponse:
    upload = request.FILES.get("file")
    if upload is None:
        return JsonResponse({"error": _("Choose an image to upload.")}, status=400)
    if upload.size is not None and upload.size > attachments.MAX_BYTES:
        size = upload.size / (1024 * 1024)
        return JsonResponse(
            {
                "error": _("The image is %(size)s MB; the limit is %(limit)d MB.")
                % {"size": f"{size:.1f}", "limit": attachments.MAX_BYTES // (1024 * 1024)}
            },
            status=400,
        )
    try:
        prepared = attachments.prepare_image(
            upload.read(),
            max_bytes=attachments.MAX_BYTES,
            max_pixels=attachments.MAX_PIXELS,
            max_side=attachments.MAX_SIDE,
        )
    except attachments.ImageRejected as exc:
        return JsonResponse({"error": str(exc)}, status=400)
    extension = {
        "image/png": ".png",
        "image/jpeg": ".jpg",
        "image/webp": ".webp",
        "image/gif": ".gif",
    }[prepared.media_type]
    attachment = Attachment(
        owner_id=int(request.user.pk or 0),
        media_type=prepared.media_type,
        width=prepared.width,
        height=prepared.height,
        size=len(prepared.content),
        original_name=(upload.name or "")[:255],
    )
    attachment.file.save(f"image{extension}", ContentFile(prepared.content), save=False)
    attachment.save()
    return JsonResponse(
        {
            "id": attachment.pk,
            "url": reverse("attachment", args=[attachment.pk]),
            "width": attachment.width,
            "height": attachment.height,
            "name": attachment.original_name,
            "downscaled": prepared.downscaled,
        }
    )


@login_required
@require_GET
def attachment_file(request: HttpRequest, attachment_id: int) -> HttpResponse:
    attachment = get_object_or_404(Attachment, pk=attachment_id, owner=request.user)
    # Stored images are small (downscaled to 2048 px): one read, no sync iterator for ASGI.
    with attachment.file.open("rb") as handle:
        response = HttpResponse(handle.read(), content_type=attachment.media_type)
    response["Cache-Control"] = "private, max-age=86400"
    return response
