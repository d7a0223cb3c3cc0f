"""A reply's reasoning in a real browser: folded above the answer, streamed, escaped.

Screenshots (desktop English, Chinese, phone) go to ``/tmp/shots/Z/``.
"""

from __future__ import annotations

from pathlib import Path

from playwright.sync_api import Browser, Page

from tests.e2e.conftest import phone_context
from tests.e2e.test_chat_in_browser import (  # noqa: F401 - fixture
    fake,
    last_assistant,
    open_chat,
    poll,
    send,
    wait_for_reply,
)
from tests.fake_upstream import FakeUpstream, Reply

SHOTS = Path("/tmp/shots/Z")
THINKING = (
    "The user asks for 17 times 23. <img src=x onerror=alert(1)> Let me work it out: "
    + " ".join(f"step{i}" for i in range(40))
    + " so 17 times 20 is 340, and 17 times 3 is 51, which makes 391."
)
FOLD = "#messages article.msg.assistant details.reasoning"


def test_reasoning_is_folded_above_the_answer_and_streams_in(
    page: Page,
    fake: FakeUpstream,  # noqa: F811
    browser: Browser,
) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    console = open_chat(page, "alice@example.com")
    # Given: a model that thinks for a while before it answers
    fake.script(Reply(text="17 × 23 = **391**.", reasoning=THINKING, chunk_delay=0.04))
    previous = send(page, "What is 17 × 23?")

    # When: its reasoning streams in, the fold appears, closed, and grows
    page.wait_for_selector(FOLD)
    fold = page.locator(FOLD).last
    assert fold.evaluate("(el) => el.open") is False
    assert fold.locator("summary").inner_text() == "Reasoning"
    first = len(fold.locator(".reasoning-body").text_content() or "")
    poll(
        lambda: len(fold.locator(".reasoning-body").text_content() or "") > first,
        "more reasoning",
    )
    assert last_assistant(page).get_attribute("data-status") == "streaming"
    # The reader opens it mid-stream: it stays open as more arrives
    fold.locator("summary").click()
    page.screenshot(path=str(SHOTS / "reasoning-streaming-open.png"))
    reply = wait_for_reply(page, previous)

    # Then: the answer is below the fold, the fold kept open, the model's HTML shown as text
    fold = reply.locator("details.reasoning")
    assert fold.evaluate("(el) => el.open") is True
    assert reply.locator(".body").inner_text() == "17 × 23 = 391."
    assert "makes 391." in fold.locator(".reasoning-body").inner_text()
    assert "<img src=x onerror=alert(1)>" in fold.locator(".reasoning-body").inner_text()
    assert page.locator("#messages img").count() == 0
    above = page.evaluate(
        """() => {
          const reply = [...document.querySelectorAll('#messages article.msg.assistant')].pop();
          const fold = reply.querySelector('details.reasoning').getBoundingClientRect();
          return fold.bottom <= reply.querySelector('.body').getBoundingClientRect().top;
        }"""
    )
    assert above
    page.screenshot(path=str(SHOTS / "reasoning-desktop-open.png"))

    # A reload shows it as saved: folded again, the answer in view
    page.reload()
    page.wait_for_selector(FOLD)
    assert page.locator(FOLD).last.evaluate("(el) => el.open") is False
    page.screenshot(path=str(SHOTS / "reasoning-desktop.png"))

    # In Chinese
    page.select_option("#language", "zh-hans")
    page.wait_for_selector("html[lang=zh-hans]")
    page.wait_for_selector(FOLD)
    assert page.locator(f"{FOLD} summary").last.inner_text() == "思考过程"
    page.screenshot(path=str(SHOTS / "reasoning-zh-hans.png"))

    # On a phone, opened: nothing wider than the screen
    phone = phone_context(browser, page, width=390, height=780)
    small = phone.new_page()
    small.goto(page.url)
    small.wait_for_selector(FOLD)
    small.locator(f"{FOLD} summary").last.click()
    assert small.evaluate("document.documentElement.scrollWidth") <= 390
    small.locator(FOLD).last.scroll_into_view_if_needed()
    small.screenshot(path=str(SHOTS / "reasoning-phone-zh-hans.png"))
    phone.close()
    console.assert_clean()
