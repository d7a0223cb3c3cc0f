"""The chat's first hour in Debian's chromium: phone layout, model picker, errors, copying.

Screenshots go to /tmp/shots/chat/ (English, Chinese, phone) to be looked at.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, FloatRect, Page

from accounts.models import User
from chatapp.models import CatalogModel, Conversation, Message, Provider, Route
from chatapp.relay import routing
from keys.actions import do_get_web_key, do_set_limits
from tests.conftest import PASSWORD, make_user
from tests.e2e.test_chat_in_browser import (
    INSTRUMENT,
    Console,
    last_id,
    poll,
    send,
    wait_for_reply,
    wait_for_socket,
)
from tests.fake_upstream import FakeUpstream, Reply

SHOTS = Path("/tmp/shots/chat")
PHONE = {"width": 390, "height": 844}
MARKDOWN = (
    "Steps:\n\n1. **Bold** move\n2. `code`\n\n```python\n"
    + "print('a very long line that must scroll inside its own block, not the page') " * 3
    + "\n```\n"
)


@pytest.fixture
def fake(transactional_db: None, settings: Any) -> Iterator[FakeUpstream]:
    settings.SWITCHBOARD_CHAT_TITLES = False
    routing.reset()
    upstream = FakeUpstream().start()
    provider = Provider.objects.create(
        name="acme-cloud", type="openai", base_url=upstream.openai_base_url, timeout=10
    )
    model = CatalogModel.objects.create(
        name="chat-model", display_name="Chat Model", supports_vision=True, supports_tools=True
    )
    Route.objects.create(model=model, provider=provider, upstream_model="up")
    text_only = CatalogModel.objects.create(name="text-only", display_name="Text Only")
    Route.objects.create(model=text_only, provider=provider, upstream_model="up2")
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield upstream
    upstream.stop()


def sign_in(
    browser: Browser, base_url: str, email: str, *, phone: bool = False, language: str = "en"
) -> tuple[Page, Console]:
    context = browser.new_context(
        base_url=base_url,
        viewport=PHONE if phone else {"width": 1200, "height": 800},
        is_mobile=phone,
        has_touch=phone,
    )
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base_url)
    context.add_cookies([{"name": "django_language", "value": language, "url": base_url}])
    page = context.new_page()
    page.set_default_timeout(10_000)
    page.add_init_script(INSTRUMENT)
    console = Console(page)
    make_user(email)
    page.goto("/accounts/login/")
    page.fill("input[name=username]", email)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url("**/chat/")
    wait_for_socket(page)
    return page, console


def box(page: Page, selector: str) -> FloatRect:
    found = page.locator(selector).first.bounding_box()
    assert found is not None, selector
    return found


def test_the_sign_in_page_has_no_console_error(browser: Browser, live_server_url: str) -> None:
    context = browser.new_context(base_url=live_server_url, viewport=PHONE)
    page = context.new_page()
    page.add_init_script(INSTRUMENT)
    console = Console(page)
    page.goto("/accounts/login/")
    page.wait_for_load_state("networkidle")
    page.screenshot(path=str(SHOTS / "sign-in-phone.png"))
    console.assert_clean()
    context.close()


def test_the_phone_layout(browser: Browser, live_server_url: str, fake: FakeUpstream) -> None:
    page, console = sign_in(browser, live_server_url, "alice@example.com", phone=True)
    fake.script(Reply(text=MARKDOWN))
    wait_for_reply(page, send(page, "Show me code"))
    page.goto(page.url)  # a conversation with a title in the list
    wait_for_socket(page)
    height = page.evaluate("window.innerHeight")
    # The page is no taller (and no wider) than the screen: the messages scroll inside.
    assert page.evaluate("document.documentElement.scrollHeight") <= height
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    composer = box(page, "#composer")
    assert composer["y"] + composer["height"] <= height + 1
    # ...and no shorter: the composer sits at the bottom of the screen.
    assert composer["y"] + composer["height"] >= height - 60, (composer, height)
    # One title: once the conversation has its title, the header shows the list's.
    poll(
        lambda: page.input_value("#chat-title input[name=title]") == "Show me code",
        "the header to show the conversation's title",
    )
    # The header is one line: menu, title, picker and settings side by side.
    tops = [
        box(page, selector)
        for selector in ("#menu-button", "#chat-title", "#model", ".settings summary")
    ]
    centres = [item["y"] + item["height"] / 2 for item in tops]
    assert max(centres) - min(centres) < 12, centres
    assert box(page, ".chat-head")["height"] < 60
    # The composer's placeholder is not clipped.
    page.fill("#prompt", "")
    assert page.evaluate(
        """() => { const area = document.getElementById("prompt");
        const probe = document.createElement("span");
        probe.textContent = area.placeholder; probe.style.position = "absolute"; probe.style.whiteSpace = "nowrap";
        const style = getComputedStyle(area); probe.style.font = style.font;
        document.body.append(probe);
        const fits = probe.getBoundingClientRect().width <= area.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
        probe.remove(); return fits; }"""
    )
    # A long code line scrolls inside its block.
    assert page.evaluate(
        "(() => { const pre = document.querySelector('.markdown pre'); return pre.scrollWidth > pre.clientWidth; })()"
    )
    # The conversation list is a drawer behind the menu button.
    sidebar = page.locator("#sidebar")
    assert (
        not sidebar.is_visible() or box(page, "#sidebar")["x"] + box(page, "#sidebar")["width"] <= 0
    )
    assert page.get_attribute("#menu-button", "aria-expanded") == "false"
    page.screenshot(path=str(SHOTS / "phone-en.png"))
    page.click("#menu-button")
    poll(lambda: box(page, "#sidebar")["x"] >= 0, "the drawer to open")
    assert page.get_attribute("#menu-button", "aria-expanded") == "true"
    assert page.locator("#sidebar .conversations a").first.is_visible()
    page.screenshot(path=str(SHOTS / "phone-drawer-en.png"))
    page.keyboard.press("Escape")
    poll(lambda: not page.locator("#sidebar").is_visible(), "the drawer to close on Escape")
    page.click("#menu-button")
    poll(lambda: page.locator("#sidebar").is_visible(), "the drawer to open again")
    page.click("#drawer-backdrop", position={"x": 370, "y": 400})
    poll(lambda: not page.locator("#sidebar").is_visible(), "the drawer to close on the backdrop")
    # Typing a long message grows the composer up to a limit.
    before = box(page, "#prompt")["height"]
    page.fill("#prompt", "line\n" * 4)
    page.dispatch_event("#prompt", "input")
    grown = box(page, "#prompt")["height"]
    page.fill("#prompt", "line\n" * 60)
    page.dispatch_event("#prompt", "input")
    capped = box(page, "#prompt")["height"]
    assert before < grown <= capped <= 241
    page.fill("#prompt", "")
    page.dispatch_event("#prompt", "input")
    # The icon-only header buttons keep their names for screen readers.
    assert page.get_by_role("button", name="Delete").is_visible()
    # A keyboard taking half the screen: the composer stays in view, above it.
    page.set_viewport_size({"width": 390, "height": 450})
    poll(
        lambda: box(page, "#composer")["y"] + box(page, "#composer")["height"] <= 451,
        "the composer to fit the smaller screen",
    )
    page.set_viewport_size(PHONE)
    console.assert_clean()


def test_the_header_picker_and_the_default_model(
    browser: Browser, live_server_url: str, fake: FakeUpstream
) -> None:
    # An admin picks the default model for new chats (the Django admin's field).
    default = CatalogModel.objects.get(name="text-only")
    default.is_chat_default = True
    default.save()
    page, console = sign_in(browser, live_server_url, "alice@example.com")
    picker = page.locator(".chat-head #model")
    assert picker.is_visible()  # without opening Settings
    assert picker.input_value() == "text-only"
    labels = page.locator("#model option").all_inner_texts()
    assert "Chat Model · vision, tools" in labels
    assert "Text Only" in labels
    page.screenshot(path=str(SHOTS / "desktop-new-chat-en.png"))
    # Switching in the header decides the new chat's model.
    picker.select_option("chat-model")
    fake.script(Reply(text="Hi from the chat model."))
    wait_for_reply(page, send(page, "Which model?"))
    conversation = Conversation.objects.get(owner__email="alice@example.com")
    assert conversation.model == "chat-model"
    assert fake.requests[-1].json["model"] == "up"
    # The choice is remembered (in this browser's localStorage) for the next new chat.
    page.goto("/chat/")
    wait_for_socket(page)
    assert page.locator("#model").input_value() == "chat-model"
    # In an existing conversation, the picker changes that conversation's model.
    page.goto(f"/chat/{conversation.pk}/")
    wait_for_socket(page)
    with page.expect_response(lambda response: "/settings/" in response.url):
        page.locator("#model").select_option("text-only")
    conversation.refresh_from_db()
    assert conversation.model == "text-only"
    console.assert_clean()


def test_an_error_in_chinese_copy_as_markdown_and_editing(
    browser: Browser, live_server_url: str, fake: FakeUpstream
) -> None:
    page, console = sign_in(browser, live_server_url, "alice@example.com", language="zh-hans")
    fake.script(Reply(text=MARKDOWN))
    reply = wait_for_reply(page, send(page, "代码"))
    # Copy as Markdown: the reply as written, not the page's text.
    reply.locator("[data-copy-message]").click()
    poll(lambda: page.evaluate("navigator.clipboard.readText()") == MARKDOWN, "the Markdown copied")
    # The editing box: Save and Cancel, the message's other actions hidden meanwhile.
    user = page.locator("#messages article.msg.user").last
    user.locator("[data-edit]").click()
    assert user.locator("form.editor button.save").inner_text() == "保存"
    assert user.locator("form.editor button.cancel").inner_text() == "取消"
    assert not user.locator("footer.meta").is_visible()
    page.screenshot(path=str(SHOTS / "desktop-editing-zh.png"))
    user.locator("form.editor button.cancel").click()
    assert user.locator("footer.meta").is_visible()
    assert user.locator("form.editor").count() == 0
    # One title: the sidebar and the header say the same.
    header = page.locator("#chat-title input[name=title]")
    assert page.locator(".conversations li.active a").inner_text() == (
        header.input_value() or header.get_attribute("placeholder")
    )
    # A spent budget, in plain Chinese words.
    key = do_get_web_key(user=User.objects.get(email="alice@example.com"))
    do_set_limits(key=key, token_budget=1, budget_period="monthly")
    failed = wait_for_reply(page, send(page, "还在吗？"), "failed")
    error = failed.locator(".error").inner_text()
    assert "你已用完本月的额度。" in error
    assert "重置" in error
    assert key.prefix not in error
    assert "acme" not in error
    page.screenshot(path=str(SHOTS / "desktop-error-zh.png"), full_page=True)
    reply_id = last_id(page)
    assert Message.objects.get(pk=reply_id).status == "failed"
    console.assert_clean()


def test_the_phone_in_chinese(browser: Browser, live_server_url: str, fake: FakeUpstream) -> None:
    page, console = sign_in(
        browser, live_server_url, "bob@example.com", phone=True, language="zh-hans"
    )
    assert page.get_attribute("#prompt", "placeholder") == "消息"
    page.screenshot(path=str(SHOTS / "phone-new-chat-zh.png"))
    page.click("#menu-button")
    poll(lambda: box(page, "#sidebar")["x"] >= 0, "the drawer to open")
    page.screenshot(path=str(SHOTS / "phone-drawer-zh.png"))
    page.keyboard.press("Escape")
    console.assert_clean()
