"""The browser chat end to end: a real browser, the live server and a scripted fake upstream.

Covers the composer (Enter sends, Shift+Enter is a new line, nothing typed is ever lost),
replies streaming in, images, Esc to stop, regenerate and edit with the version switcher,
a reload in the middle of a reply, a failing upstream, the strict CSP, and screenshots
(desktop, phone, Chinese) in ``tests/artifacts/``.
"""

from __future__ import annotations

import base64
import io
import re
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from playwright.sync_api import Browser, ConsoleMessage, Locator, Page

from chatapp.models import CatalogModel, Message, Provider, Route
from chatapp.relay import routing
from tests.conftest import PASSWORD, make_user
from tests.e2e.conftest import phone_context
from tests.fake_upstream import Fail, FakeUpstream, Reply

# Test instrumentation, run before the page's own scripts on every navigation (injected
# through the DevTools protocol, so the page's CSP does not apply to it):
# - CSP violations are collected in window.__csp;
# - the page's WebSockets in window.__sockets (to wait until the chat's socket is open);
# - every change to the last assistant message in window.__samples as
#   [time, id, status, body text], to watch a reply grow.
INSTRUMENT = """
(() => {
  window.__csp = [];
  document.addEventListener("securitypolicyviolation",
    (e) => window.__csp.push(e.violatedDirective + " " + e.blockedURI));
  const Native = window.WebSocket;
  window.__sockets = [];
  window.WebSocket = class extends Native {
    constructor(...args) { super(...args); window.__sockets.push(this); }
  };
  window.__samples = [];
  document.addEventListener("DOMContentLoaded", () => {
    const messages = document.getElementById("messages");
    if (!messages) return;
    const record = () => {
      const all = messages.querySelectorAll("article.msg.assistant");
      const article = all[all.length - 1];
      if (!article) return;
      const body = article.querySelector(".body");
      window.__samples.push([performance.now(), Number(article.dataset.id),
        article.dataset.status, body ? body.textContent : ""]);
    };
    record();
    new MutationObserver(record).observe(messages,
      { childList: true, subtree: true, characterData: true, attributes: true });
  });
})();
"""


MARKDOWN_REPLY = "Here is code:\n\n```python\nprint('hi')\n```\n\n| a | b |\n|---|---|\n| 1 | 2 |"


@pytest.fixture
def fake(transactional_db: None, settings: Any) -> Iterator[FakeUpstream]:
    # A title request would consume a scripted reply.
    settings.SWITCHBOARD_CHAT_TITLES = False
    routing.reset()
    upstream = FakeUpstream().start()
    provider = Provider.objects.create(
        name="fake", type="openai", base_url=upstream.openai_base_url, timeout=10
    )
    model = CatalogModel.objects.create(
        name="chat-model", display_name="Chat Model", supports_vision=True
    )
    Route.objects.create(model=model, provider=provider, upstream_model="up")
    text_only = CatalogModel.objects.create(name="text-only", display_name="Text Only")
    Route.objects.create(model=text_only, provider=provider, upstream_model="up2")
    yield upstream
    upstream.stop()


class Console:
    """Console errors and CSP violations seen by a page."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.errors.append(f"pageerror: {error}"))
        page.on(
            "response",
            lambda response: (
                self.errors.append(f"HTTP {response.status} {response.url}")
                if response.status >= 400
                else None
            ),
        )

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(f"{message.text} ({message.location.get('url', '')})")

    def assert_clean(self) -> None:
        csp = [e for e in self.errors if "Content Security Policy" in e or "Refused to" in e]
        assert csp == [], csp
        assert self.page.evaluate("window.__csp") == []
        # The browser's own /favicon.ico request is a 404 (the site has no icon).
        errors = [e for e in self.errors if "/favicon.ico" not in e]
        assert errors == [], errors


def open_chat(page: Page, email: str) -> Console:
    page.add_init_script(INSTRUMENT)
    console = Console(page)
    make_user(email)
    response = page.goto("/accounts/login/")
    assert response is not None
    page.fill("input[name=username]", email)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url("**/chat/")
    response = page.goto("/chat/")
    assert response is not None
    assert response.status == 200
    policy = response.headers.get("content-security-policy", "")
    assert "default-src 'self'" in policy
    assert "script-src 'self'" in policy
    assert "unsafe-inline" not in policy
    assert "unsafe-eval" not in policy
    wait_for_socket(page)
    return console


def poll(condition: Callable[[], object], what: str, timeout: float = 15.0) -> None:
    """Wait until ``condition()`` is true, checking from here every 20 ms.

    Not ``page.wait_for_function``: its polling evaluates strings inside the page,
    which the page's CSP (no 'unsafe-eval') rightly refuses.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def wait_for_socket(page: Page) -> None:
    poll(
        lambda: page.evaluate("window.__sockets.some((s) => s.readyState === WebSocket.OPEN)"),
        "the chat's WebSocket to open",
    )


# Enter pressed to confirm an input method's composition (typing Chinese, say).
IME_ENTER = """(element) => element.dispatchEvent(new KeyboardEvent("keydown",
  {key: "Enter", code: "Enter", isComposing: true, bubbles: true, cancelable: true}))"""

LAST = """(role) => {
  const all = document.querySelectorAll('#messages article.msg.' + role);
  const last = all[all.length - 1];
  if (!last) return null;
  const body = last.querySelector('.body');
  const versions = last.querySelector('.versions');
  return {id: Number(last.dataset.id), status: last.dataset.status,
          words: body ? body.textContent.split(/\\s+/).filter(Boolean).length : 0,
          text: body ? body.textContent : '',
          versions: versions ? versions.textContent.replace(/\\s+/g, '') : ''};
}"""


def last_state(page: Page, role: str = "assistant") -> dict[str, Any]:
    """The last message of ``role`` shown: id, status, body text and word count, versions."""
    return page.evaluate(LAST, role) or {
        "id": 0,
        "status": "",
        "words": 0,
        "text": "",
        "versions": "",
    }


def last_assistant(page: Page) -> Locator:
    return page.locator("#messages article.msg.assistant").last


def last_user(page: Page) -> Locator:
    return page.locator("#messages article.msg.user").last


def last_id(page: Page) -> int:
    """The id of the last reply shown (0 when there is none)."""
    return int(last_state(page)["id"])


def wait_for_reply(
    page: Page, previous: int, status: str = "complete", timeout: float = 15.0
) -> Locator:
    """The last reply, once it is another one than ``previous`` and its status is ``status``."""

    def ready() -> bool:
        state = last_state(page)
        return bool(state["id"]) and state["id"] != previous and state["status"] == status

    poll(ready, f"a new reply with status {status}", timeout)
    return last_assistant(page)


def send(page: Page, text: str) -> int:
    """Type ``text`` and press Enter; returns the id of the reply shown before it."""
    previous = last_id(page)
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    return previous


def words(text: str) -> list[str]:
    return text.split()


def samples_of(page: Page, message_id: int) -> list[tuple[float, str, str]]:
    raw = page.evaluate("window.__samples")
    return [(when, status, text) for when, mid, status, text in raw if mid == message_id]


def version_label(article: Locator) -> str:
    match = re.search(r"\d+/\d+", article.locator(".versions").inner_text())
    assert match is not None
    return match.group(0)


def make_png(path: Path) -> Path:
    image = Image.new("RGB", (64, 48), (200, 40, 40))  # red, its left half blue
    image.paste((20, 20, 220), (0, 0, 32, 48))
    image.save(path, format="PNG")
    return path


def test_compose_stream_images_refusals_and_screenshots(
    page: Page, browser: Browser, fake: FakeUpstream, tmp_path: Path,
    artifacts: Path,
) -> None:  # fmt: skip
    console = open_chat(page, "alice@example.com")

    # Shift+Enter is a new line; nothing is sent.
    page.click("#prompt")
    page.keyboard.type("line one")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("line two")
    assert page.input_value("#prompt") == "line one\nline two"
    assert page.locator("#messages article.msg").count() == 0
    # Only spaces: Enter sends nothing and the text stays.
    page.fill("#prompt", "   ")
    page.press("#prompt", "Enter")
    page.wait_for_timeout(300)
    assert page.input_value("#prompt") == "   "
    # Enter that ends an input method's composition does not send either.
    page.fill("#prompt", "你好")
    page.locator("#prompt").evaluate(IME_ENTER)
    page.wait_for_timeout(300)
    assert page.input_value("#prompt") == "你好"
    assert page.locator("#messages article.msg").count() == 0
    assert fake.requests == []

    # Enter sends; the reply streams in word by word, then is saved.
    streamed = "The quick brown fox jumps over the lazy dog while this reply streams in slowly."
    fake.script(Reply(text=streamed, chunk_delay=0.06))
    before = send(page, "Hello there")
    page.wait_for_selector('#messages article.msg.assistant[data-status="streaming"]')
    assert last_user(page).locator(".body").inner_text() == "Hello there"
    assert page.input_value("#prompt") == ""
    assert page.inner_text("#send") == "Stop"
    reply = wait_for_reply(page, before)
    assert words(reply.locator(".body").inner_text()) == words(streamed)
    assert page.inner_text("#send") == "Send"
    message_id = int(reply.get_attribute("data-id") or 0)
    while_streaming = [
        (when, words(text))
        for when, status, text in samples_of(page, message_id)
        if status == "streaming" and text.strip()
    ]
    lengths = [len(found) for _when, found in while_streaming]
    assert len(set(lengths)) >= 4, lengths  # it grew in several steps ...
    assert lengths == sorted(lengths)
    assert lengths[0] <= 3
    assert while_streaming[-1][0] - while_streaming[0][0] > 300  # over time, not at once
    for _when, found in while_streaming:
        assert found == words(streamed)[: len(found)]
    assert page.url.endswith(f"/chat/{Message.objects.get(pk=message_id).conversation_id}/")

    # Markdown: a highlighted code block and a table, rendered by the server.
    fake.script(Reply(text=MARKDOWN_REPLY))
    reply = wait_for_reply(page, send(page, "Show me code and a table"))
    assert reply.locator("pre").inner_text().strip() == "print('hi')"
    assert reply.locator("table th").all_inner_texts() == ["a", "b"]
    assert reply.locator("table td").all_inner_texts() == ["1", "2"]

    # An image: a thumbnail in the tray, then in the sent message, and base64 upstream.
    png = make_png(tmp_path / "stripes.png")
    fake.script(Reply(text="Red with blue stripes."))
    page.set_input_files("#file-input", str(png))
    page.wait_for_selector("#attachments img")
    assert page.locator("#attachments").is_visible()
    reply = wait_for_reply(page, send(page, "What is in this image?"))
    assert "Red with blue stripes." in reply.inner_text()
    assert page.locator("#attachments img").count() == 0
    assert page.locator("#attachments").is_hidden()
    image = last_user(page).locator(".images img")
    assert image.count() == 1
    image.scroll_into_view_if_needed()
    poll(lambda: image.evaluate("(img) => img.complete && img.naturalWidth") == 64, "the image")
    turn = fake.requests[-1].json["messages"][-1]
    assert turn["role"] == "user"
    parts = {part["type"]: part for part in turn["content"]}
    assert parts["text"]["text"] == "What is in this image?"
    url = parts["image_url"]["image_url"]["url"]
    # Our own re-encoding of it (an opaque image is sent as JPEG).
    media_type, data = url.split(",", 1)
    assert media_type in ("data:image/jpeg;base64", "data:image/png;base64")
    sent = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
    assert sent.size == (64, 48)
    for (x, y), colour in (((8, 24), (20, 20, 220)), ((56, 24), (200, 40, 40))):
        pixel = sent.getpixel((x, y))
        assert isinstance(pixel, tuple)
        assert all(abs(a - b) <= 16 for a, b in zip(pixel, colour, strict=True)), pixel

    # The desktop screenshot, with the markdown reply in view.
    page.locator("#messages article.msg.assistant").nth(1).scroll_into_view_if_needed()
    page.screenshot(path=str(artifacts / "chat-page.png"), full_page=True)

    # A refused send (an image for a model without vision) keeps the text and the image.
    requests_before = len(fake.requests)
    page.set_input_files("#file-input", str(png))
    page.wait_for_selector("#attachments img")
    page.click(".settings summary")
    page.select_option("#model", "text-only")
    send(page, "Describe it, text-only model")
    page.wait_for_selector("#composer-error:not([hidden])")
    assert "cannot read images" in page.inner_text("#composer-error")
    assert page.input_value("#prompt") == "Describe it, text-only model"
    assert page.locator("#attachments img").count() == 1
    assert len(fake.requests) == requests_before
    assert page.locator("#messages article.msg").count() == 6
    page.select_option("#model", "chat-model")
    page.click(".settings summary")
    page.click("#attachments .remove")
    page.fill("#prompt", "")

    # The same conversation on a phone.
    phone = phone_context(browser, page)
    small = phone.new_page()
    small.goto(page.url)
    small.wait_for_selector("#messages article.msg.assistant")
    assert small.evaluate("document.documentElement.scrollWidth") <= 375
    # What the phone shows at the bottom of the page: the latest exchange and the composer.
    small.evaluate("window.scrollTo(0, document.documentElement.scrollHeight)")
    small.screenshot(path=str(artifacts / "chat-phone.png"))
    phone.close()

    # And in Chinese, through the language switch.
    page.select_option("#language", "zh-hans")
    page.wait_for_selector("html[lang=zh-hans]")
    page.wait_for_selector("#messages article.msg.assistant")
    assert "退出登录" in page.inner_text(".topbar")
    page.screenshot(path=str(artifacts / "chat-zh-hans.png"), full_page=True)
    console.assert_clean()


def test_stop_regenerate_edit_and_versions(
    page: Page, browser: Browser, fake: FakeUpstream, artifacts: Path
) -> None:  # fmt: skip
    console = open_chat(page, "bob@example.com")
    long_text = " ".join(f"word{i}" for i in range(200))
    fake.script(Reply(text=long_text, chunk_delay=0.04))
    before = send(page, "Talk a lot")
    poll(lambda: last_state(page)["words"] >= 5, "the first words")
    # Esc stops it; the partial text stays, marked as stopped.
    page.keyboard.press("Escape")
    reply = wait_for_reply(page, before, "stopped")
    partial = words(reply.locator(".body").inner_text())
    assert 5 <= len(partial) < 200
    assert partial == words(long_text)[: len(partial)]
    assert reply.locator(".note").is_visible()
    stopped = Message.objects.get(pk=int(reply.get_attribute("data-id") or 0))
    assert (stopped.status, words(stopped.content)) == ("stopped", partial)

    # Regenerate: a second version, and the switcher moves between the two.
    fake.script(Reply(text="A shorter second answer."))
    reply.locator("[data-regenerate]").click()
    reply = wait_for_reply(page, stopped.pk)
    assert reply.locator(".body").inner_text().strip() == "A shorter second answer."
    assert version_label(reply) == "2/2"
    reply.locator(".versions button").first.click()  # ‹
    poll(lambda: "1/2" in last_state(page)["versions"], "version 1/2")
    reply = last_assistant(page)
    assert words(reply.locator(".body").inner_text()) == partial
    assert reply.get_attribute("data-status") == "stopped"
    reply.locator(".versions button").last.click()  # ›
    poll(lambda: "2/2" in last_state(page)["versions"], "version 2/2")
    assert last_assistant(page).locator(".body").inner_text().strip() == "A shorter second answer."

    # Edit the question: a new sibling branch with its own reply; a draft in the
    # composer is not touched by it.
    page.fill("#prompt", "a draft I am still writing")
    fake.script(Reply(text="An answer to the edited question."))
    last_user(page).locator("[data-edit]").click()
    editor = page.locator("form.editor textarea")
    assert editor.input_value() == "Talk a lot"
    editor.fill("Talk a little")
    editor.evaluate(IME_ENTER)  # confirming an input method's composition does not send
    page.wait_for_timeout(300)
    assert editor.is_visible()
    assert len(fake.requests) == 2
    before = last_id(page)
    editor.press("Enter")
    reply = wait_for_reply(page, before)
    assert reply.locator(".body").inner_text().strip() == "An answer to the edited question."
    question = last_user(page)
    assert question.locator(".body").inner_text() == "Talk a little"
    assert version_label(question) == "2/2"
    assert page.input_value("#prompt") == "a draft I am still writing"
    # Back to the first question: its branch comes back with its latest reply.
    question.locator(".versions button").first.click()
    poll(lambda: "1/2" in last_state(page, "user")["versions"], "the first question")
    assert version_label(last_user(page)) == "1/2"
    assert last_assistant(page).locator(".body").inner_text().strip() == "A shorter second answer."
    assert len(fake.requests) == 3
    console.assert_clean()

    # The other version is deleted meanwhile (in another tab): a switch to it is
    # refused in words and the branch on screen stays as it was; here in Chinese, on
    # this page and on a phone.
    page.select_option("#language", "zh-hans")
    page.wait_for_selector("html[lang=zh-hans]")
    page.wait_for_selector("#messages article.msg.assistant")
    phone = phone_context(browser, page)
    small = phone.new_page()
    small.goto(page.url)
    small.wait_for_selector("#messages article.msg.assistant")
    Message.objects.filter(content="Talk a little").delete()
    for view in (page, small):
        last_user(view).locator(".versions button").last.click()  # ›
        error = view.locator("#composer-error")
        error.wait_for(state="visible")
        assert error.inner_text() == "没有这条消息。"  # No such message.
        assert version_label(last_user(view)) == "1/2"
        answer = last_assistant(view).locator(".body").inner_text().strip()
        assert answer == "A shorter second answer."
    page.screenshot(path=str(artifacts / "chat-switch-refused-zh-hans.png"), full_page=True)
    small.screenshot(path=str(artifacts / "chat-switch-refused-phone-zh-hans.png"))
    phone.close()
    # A switch that goes through clears the refusal.
    last_assistant(page).locator(".versions button").first.click()  # ‹ the stopped reply
    poll(lambda: "1/2" in last_state(page)["versions"], "the reply's first version")
    page.locator("#composer-error").wait_for(state="hidden")


def test_a_reload_mid_reply_and_a_failing_upstream(page: Page, fake: FakeUpstream) -> None:
    console = open_chat(page, "carol@example.com")
    scripted = " ".join(f"w{i}" for i in range(40))
    fake.script(Reply(text=scripted, chunk_delay=0.05))
    before = send(page, "Count for me")
    poll(lambda: last_state(page)["words"] >= 4, "the first words")
    reply_id = int(last_assistant(page).get_attribute("data-id") or 0)

    # Reload in the middle: the reply keeps being written on the server; the page gets
    # the text so far and the live tail, and ends with exactly the scripted text.
    page.reload()
    wait_for_socket(page)
    reply = wait_for_reply(page, before)
    assert int(reply.get_attribute("data-id") or 0) == reply_id
    assert words(reply.locator(".body").inner_text()) == words(scripted)
    live = [
        words(text)
        for _when, status, text in samples_of(page, reply_id)
        if status == "streaming" and text.strip()
    ]
    assert live, "the reload came after the reply had finished: nothing was seen streaming"
    assert len(live[0]) >= 4  # the snapshot: what was written before the reload
    for found in live:  # never a word twice, never one missing
        assert found == words(scripted)[: len(found)]
    assert len({len(found) for found in live}) >= 3  # and then the live tail
    assert Message.objects.get(pk=reply_id).content == scripted
    assert len(fake.requests) == 1  # the reload did not ask again

    # The upstream fails (three times: every retry): the error shows in the conversation.
    fake.script(*[Fail(500, "provider down")] * 3)
    reply = wait_for_reply(page, send(page, "Are you still there?"), "failed")
    # In plain words: the upstream's own text is for admins (the usage record), not here.
    assert "could not answer just now" in reply.locator(".error").inner_text()
    assert "provider down" not in reply.locator(".error").inner_text()
    assert last_user(page).locator(".body").inner_text() == "Are you still there?"
    # The conversation goes on afterwards.
    fake.script(Reply(text="Back again."))
    started = time.monotonic()
    reply = wait_for_reply(page, send(page, "And now?"))
    assert reply.locator(".body").inner_text().strip() == "Back again."
    assert time.monotonic() - started < 10
    console.assert_clean()


def test_a_reply_whose_server_died_shows_as_interrupted_and_the_chat_goes_on(
    page: Page, browser: Browser, fake: FakeUpstream, artifacts: Path
) -> None:
    from django.utils import timezone

    from accounts.models import User
    from chatapp import hotstore
    from chatapp.chat.events import snapshot_key
    from chatapp.models import Conversation

    console = open_chat(page, "carol@example.com")
    # Given a reply that was being written by a server process that then died: its
    # row says streaming, its text so far is in the hot store, no heartbeat is left...
    carol = User.objects.get(email="carol@example.com")
    conversation = Conversation.objects.create(owner=carol, model="chat-model", title="Lost")
    question = Message.objects.create(
        conversation=conversation, role="user", content="Tell me a long story"
    )
    reply = Message.objects.create(
        conversation=conversation,
        parent=question,
        role="assistant",
        model="chat-model",
        status="streaming",
    )
    conversation.current_leaf = reply
    conversation.save()
    Message.objects.filter(pk=reply.pk).update(created_at=timezone.now() - timedelta(minutes=1))
    hotstore.append(snapshot_key(reply.pk), [(5, "delta", "Once upon a time, a")], 600)

    # ...opening the conversation saves it as interrupted, with what it had written.
    page.goto(f"/chat/{conversation.pk}/")
    wait_for_socket(page)
    article = page.locator(f"#m{reply.pk}")
    poll(lambda: article.get_attribute("data-status") == "interrupted", "the interrupted reply")
    assert "Once upon a time" in article.inner_text()
    assert "Interrupted" in article.locator(".note").inner_text()
    page.screenshot(path=str(artifacts / "chat-interrupted.png"), full_page=True)

    # And the conversation takes a new message at once.
    fake.script(Reply(text="Here is the end of it."))
    answer = wait_for_reply(page, send(page, "Please finish it"))
    assert answer.locator(".body").inner_text().strip() == "Here is the end of it."

    # On a phone, and in Chinese.
    phone = phone_context(browser, page)
    small = phone.new_page()
    small.goto(f"/chat/{conversation.pk}/")
    small.select_option("#language", "zh-hans")
    small.wait_for_selector("html[lang=zh-hans]")
    small.locator(f"#m{reply.pk}").scroll_into_view_if_needed()
    assert "已中断" in small.locator(f"#m{reply.pk} .note").inner_text()
    small.screenshot(path=str(artifacts / "chat-interrupted-phone-zh-hans.png"))
    phone.close()
    console.assert_clean()
