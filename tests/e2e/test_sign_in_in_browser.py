"""Signing in through a real browser, in English and in Chinese."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import PASSWORD, make_user


def test_a_member_signs_in_switches_to_chinese_and_signs_out(page, artifacts: Path) -> None:
    make_user("alice@example.com")

    # Given the home page, an anonymous visitor lands on the sign-in form.
    page.goto("/")
    assert page.url.endswith("/accounts/login/")
    # A wrong password shows the neutral message and keeps the typed email.
    page.fill("input[name=username]", "alice@example.com")
    page.fill("input[name=password]", "not it")
    page.click("button[type=submit]")
    assert "do not match an active account" in page.inner_text("[role=alert]")
    assert page.input_value("input[name=username]") == "alice@example.com"

    # When she signs in with the right password, she reaches the chat.
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url("**/chat/")
    assert "alice@example.com" in page.inner_text("header")
    assert "New chat" in page.inner_text("main")

    # The language switch submits itself and the page comes back in Chinese.
    page.select_option("#language", "zh-hans")
    page.wait_for_selector("text=新对话")
    assert page.get_attribute("html", "lang") == "zh-hans"
    page.screenshot(path=str(artifacts / "home-zh-hans.png"), full_page=True)

    # Then signing out returns to the (Chinese) sign-in page.
    page.click("text=退出登录")
    page.wait_for_url("**/accounts/login/")
    assert "登录" in page.inner_text("h1")


def test_the_sign_in_page_fits_a_phone(browser, live_server_url: str, artifacts: Path) -> None:
    context = browser.new_context(viewport={"width": 375, "height": 700}, is_mobile=True)
    page = context.new_page()
    page.goto(live_server_url + "/accounts/login/")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 375
    page.screenshot(path=str(artifacts / "login-phone.png"))
    context.close()
