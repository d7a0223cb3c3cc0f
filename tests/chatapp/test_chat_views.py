"""The chat pages over HTTP: list, search, rename, delete, switch versions, uploads, ownership."""

from __future__ import annotations

import io

import pytest
from django.test import Client
from PIL import Image

from accounts.models import User
from chatapp.models import Attachment, CatalogModel, Conversation, Message, Provider, Route
from chatapp.relay.canonical import ChatRequest, TextPart
from chatapp.relay.canonical import Message as Turn
from chatapp.relay.dialects.browser import fit_context

pytestmark = pytest.mark.django_db


@pytest.fixture
def model(db) -> CatalogModel:  # type: ignore[no-untyped-def]
    provider = Provider.objects.create(name="p", type="openai", base_url="http://127.0.0.1:9/v1")
    model = CatalogModel.objects.create(
        name="chat-model", display_name="Chat Model", supports_vision=True
    )
    Route.objects.create(model=model, provider=provider, upstream_model="up")
    return model


def conversation_with_versions(owner: User) -> tuple[Conversation, Message, Message]:
    conversation = Conversation.objects.create(
        owner=owner, model="chat-model", title="Trip to Lisbon"
    )
    question = Message.objects.create(
        conversation=conversation, role="user", content="Where to eat?"
    )
    first = Message.objects.create(
        conversation=conversation, parent=question, role="assistant", content="**Tasca**"
    )
    second = Message.objects.create(
        conversation=conversation, parent=question, role="assistant", content="Cervejaria"
    )
    conversation.current_leaf = second
    conversation.save()
    return conversation, first, second


def test_the_chat_page_shows_the_branch_and_the_model_picker(
    client: Client, alice: User, model: CatalogModel
) -> None:
    conversation, _first, _second = conversation_with_versions(alice)
    client.force_login(alice)
    page = client.get(f"/chat/{conversation.pk}/")
    html = page.content.decode()
    assert "Cervejaria" in html
    assert "Tasca" not in html  # the other version is not on the displayed branch
    assert "2/2" in html
    assert '<option value="chat-model"' in html
    policy = page["Content-Security-Policy"]
    assert "script-src 'self'" in policy
    assert "unsafe-inline" not in policy


def test_switching_versions_keeps_each_branch(
    client: Client, alice: User, model: CatalogModel
) -> None:
    conversation, first, second = conversation_with_versions(alice)
    follow_up = Message.objects.create(
        conversation=conversation, parent=first, role="user", content="And after?"
    )
    client.force_login(alice)
    html = client.post(f"/chat/messages/{first.pk}/switch/").content.decode()
    assert "<strong>Tasca</strong>" in html  # rendered markdown
    assert "And after?" in html  # the first version's own continuation
    conversation.refresh_from_db()
    assert conversation.current_leaf_id == follow_up.pk
    html = client.post(f"/chat/messages/{second.pk}/switch/").content.decode()
    assert "Cervejaria" in html
    assert "And after?" not in html


def test_the_list_searches_titles_and_text_and_pages(
    client: Client, alice: User, bob: User, model: CatalogModel
) -> None:
    conversation_with_versions(alice)
    for number in range(35):
        Conversation.objects.create(owner=alice, model="chat-model", title=f"Topic {number}")
    Conversation.objects.create(owner=bob, model="chat-model", title="Bob's Lisbon plans")
    client.force_login(alice)
    assert "Trip to Lisbon" in client.get("/chat/list/?q=lisbon").content.decode()
    assert "Bob" not in client.get("/chat/list/?q=lisbon").content.decode()
    assert (
        "Trip to Lisbon" in client.get("/chat/list/?q=cervejaria").content.decode()
    )  # message text
    first_page = client.get("/chat/list/").content.decode()
    assert first_page.count("<li") == 30
    assert "page=2" in first_page
    assert client.get("/chat/list/?page=2").content.decode().count("<li") == 6


def test_rename_and_delete(client: Client, alice: User, model: CatalogModel) -> None:
    conversation, _first, _second = conversation_with_versions(alice)
    client.force_login(alice)
    client.post(f"/chat/{conversation.pk}/rename/", {"title": "Lisbon food"})
    conversation.refresh_from_db()
    assert conversation.title == "Lisbon food"
    response = client.post(f"/chat/{conversation.pk}/delete/")
    assert response.status_code == 302
    assert not Conversation.objects.exists()
    assert not Message.objects.exists()


def test_bob_cannot_see_or_change_alices_things(
    client: Client, alice: User, bob: User, model: CatalogModel
) -> None:
    conversation, first, _second = conversation_with_versions(alice)
    image = Attachment.objects.create(
        owner=alice, file="attachments/a.png", media_type="image/png", width=1, height=1, size=1
    )
    client.force_login(bob)
    assert client.get(f"/chat/{conversation.pk}/").status_code == 404
    assert client.get(f"/chat/{conversation.pk}/messages/").status_code == 404
    assert client.post(f"/chat/{conversation.pk}/rename/", {"title": "mine"}).status_code == 404
    assert client.post(f"/chat/{conversation.pk}/delete/").status_code == 404
    assert client.post(f"/chat/messages/{first.pk}/switch/").status_code == 404
    assert client.get(f"/chat/attachments/{image.pk}/").status_code == 404
    assert Conversation.objects.get().title == "Trip to Lisbon"


def png(width: int, height: int) -> io.BytesIO:
    data = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(data, "PNG")
    data.seek(0)
    data.name = "photo.png"
    return data


def test_upload_validates_downscales_and_serves_to_the_owner_only(
    client: Client, alice: User, bob: User
) -> None:
    client.force_login(alice)
    answer = client.post("/chat/attachments/", {"file": png(4000, 1000)}).json()
    assert (answer["width"], answer["height"], answer["downscaled"]) == (2048, 512, True)
    attachment = Attachment.objects.get(pk=answer["id"])
    assert attachment.owner == alice
    served = client.get(answer["url"])
    assert served.status_code == 200
    assert served["Content-Type"] == "image/jpeg"  # opaque images are stored as JPEG
    bad = client.post("/chat/attachments/", {"file": io.BytesIO(b"not an image at all")})
    assert bad.status_code == 400
    assert "not an image" in bad.json()["error"]
    client.force_login(bob)
    assert client.get(answer["url"]).status_code == 404


def test_old_turns_are_left_out_to_fit_the_context_window() -> None:
    turns = [
        Turn("user" if number % 2 == 0 else "assistant", [TextPart("word " * 300)])
        for number in range(9)
    ]
    request = ChatRequest(model="m", messages=turns, system=[TextPart("Be brief.")])
    left_out = fit_context(request, context_window=2000, max_output=500)
    assert left_out == 6
    assert len(request.messages) == 3
    assert request.messages[0].role == "user"
    assert request.system[0].text == "Be brief."  # the system prompt always stays
    # The newest turn always stays, even alone.
    alone = ChatRequest(model="m", messages=[Turn("user", [TextPart("word " * 5000)])])
    assert fit_context(alone, context_window=2000, max_output=500) == 0
    assert len(alone.messages) == 1


def test_the_title_fragment_and_the_current_conversation_in_the_list(
    client: Client, alice: User, model: CatalogModel
) -> None:
    conversation, _first, _second = conversation_with_versions(alice)
    client.force_login(alice)
    title = client.get(f"/chat/{conversation.pk}/title/").content.decode()
    assert 'value="Trip to Lisbon"' in title
    assert f"/chat/{conversation.pk}/delete/" in title
    listing = client.get(f"/chat/list/?current={conversation.pk}").content.decode()
    assert '<li class="active">' in listing


def picked(client: Client, path: str = "/chat/") -> str:
    """The model selected in the header's picker."""
    import re

    page = client.get(path).content.decode()
    picker = page[page.index('<select id="model"') :]
    picker = picker[: picker.index("</select>")]
    match = re.search(r'<option value="([^"]+)"[^>]*\sselected>', picker)
    assert match is not None
    return match.group(1)


def test_a_new_chat_starts_with_the_admins_default_else_the_local_model(
    client: Client, alice: User, model: CatalogModel
) -> None:
    from chatapp.chat.actions import do_send_message

    local = Provider.objects.create(name="here", type="local", base_url="")
    small = CatalogModel.objects.create(name="tiny-local", display_name="Tiny")
    Route.objects.create(model=small, provider=local, upstream_model="tiny.gguf")
    CatalogModel.objects.create(name="zeta", display_name="Zeta")
    Route.objects.create(
        model=CatalogModel.objects.get(name="zeta"),
        provider=Provider.objects.get(name="p"),
        upstream_model="z",
    )
    client.force_login(alice)
    # No admin choice: the local model (not the first by name, chat-model).
    assert picked(client) == "tiny-local"
    # An admin's choice wins; the picker is in the header with what each model can do.
    zeta = CatalogModel.objects.get(name="zeta")
    zeta.is_chat_default = True
    zeta.save()  # as the admin and the console do: the catalog's version moves
    assert picked(client) == "zeta"
    page = client.get("/chat/").content.decode()
    assert "Chat Model · vision</option>" in page
    # A send that names no model uses the same default.
    started = do_send_message(
        user_id=alice.pk, conversation_id=None, text="Hi", attachment_ids=[], model=None
    )
    assert Conversation.objects.get(pk=started.conversation_id).model == "zeta"
    # An existing conversation shows its own model.
    conversation = Conversation.objects.create(owner=alice, model="chat-model")
    assert picked(client, f"/chat/{conversation.pk}/") == "chat-model"


def test_at_most_one_default_chat_model_in_the_admin(carol: User, model: CatalogModel) -> None:
    from django.core.exceptions import ValidationError

    CatalogModel.objects.filter(pk=model.pk).update(is_chat_default=True)
    other = CatalogModel(name="other", is_chat_default=True)
    with pytest.raises(ValidationError, match="already the default for new chats"):
        other.full_clean()


def test_the_pages_words_and_the_scripts_words_are_in_chinese(
    client: Client, alice: User, model: CatalogModel
) -> None:
    import json
    import re

    client.force_login(alice)
    client.cookies["django_language"] = "zh-hans"
    page = client.get("/chat/").content.decode()
    found = re.search(r'<script id="chat-strings" type="application/json">(.*?)</script>', page)
    assert found is not None
    strings = json.loads(found.group(1))
    assert strings["Save"] == "保存"
    assert strings["Cancel"] == "取消"
    for name, text in strings.items():
        assert not re.search(r"[A-Za-z]{3,}", re.sub(r"%\(\w+\)s", "", text)), (name, text)


def test_one_title_in_the_list_and_the_header(
    client: Client, alice: User, model: CatalogModel
) -> None:
    conversation = Conversation.objects.create(owner=alice, model="chat-model")
    client.force_login(alice)
    page = client.get(f"/chat/{conversation.pk}/").content.decode()
    assert f"Conversation {conversation.pk}" not in page
    assert page.count("Untitled conversation") >= 3  # <title>, the list, the header


def test_saving_settings_keeps_a_title_and_branch_written_meanwhile(
    client: Client, alice: User, model: CatalogModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The page saves its settings as a conversation starts, while the first reply is
    # being saved and titled: what is written between the view's read and its write stays.
    from chatapp.chat.forms import ConversationSettingsForm

    other = CatalogModel.objects.create(name="other-model", display_name="Other")
    Route.objects.create(model=other, provider=model.routes.get().provider, upstream_model="o")
    conversation, first, _second = conversation_with_versions(alice)
    validate = ConversationSettingsForm.is_valid

    def meanwhile(form: ConversationSettingsForm) -> bool:
        Conversation.objects.filter(pk=conversation.pk).update(
            title="Named meanwhile", current_leaf=first
        )
        return validate(form)

    monkeypatch.setattr(ConversationSettingsForm, "is_valid", meanwhile)
    client.force_login(alice)
    response = client.post(
        f"/chat/{conversation.pk}/settings/",
        {"model": "other-model", "system_prompt": "Be brief.", "temperature": "0.5"},
    )
    assert response.status_code == 200
    conversation.refresh_from_db()
    assert (conversation.model, conversation.system_prompt) == ("other-model", "Be brief.")
    assert conversation.title == "Named meanwhile"
    assert conversation.current_leaf == first


def test_settings_of_a_conversation_deleted_meanwhile_are_a_404(
    client: Client, alice: User, model: CatalogModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chatapp.chat.forms import ConversationSettingsForm

    conversation, _first, _second = conversation_with_versions(alice)
    validate = ConversationSettingsForm.is_valid

    def deleted_meanwhile(form: ConversationSettingsForm) -> bool:
        Conversation.objects.filter(pk=conversation.pk).delete()  # in another tab
        return validate(form)

    monkeypatch.setattr(ConversationSettingsForm, "is_valid", deleted_meanwhile)
    client.force_login(alice)
    response = client.post(f"/chat/{conversation.pk}/settings/", {"model": "chat-model"})
    assert response.status_code == 404
    assert not Conversation.objects.exists()  # not written back
