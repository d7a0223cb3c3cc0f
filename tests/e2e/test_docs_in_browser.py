"""/docs/ in a real browser: English, Chinese and phone width, no CSP violation.

A member reads the guide with their own key's limits and the catalog's prices, copies
a sample with its button (the clipboard holds exactly the sample, the placeholder and
not the key), and the page fits a 390 px phone.  Screenshots go to tests/artifacts/
(and SWITCHBOARD_SHOTS when set).
"""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser

from chatapp.models import CatalogModel
from keys.models import ApiKey, ModelPrice
from tests.e2e.test_console_in_browser import Visitor
from tests.gateway import Gateway, fake_upstream, gateway  # noqa: F401 - fixtures


def _shots(artifacts: Path) -> list[Path]:
    places = [artifacts]
    if os.environ.get("SWITCHBOARD_SHOTS"):
        places.append(Path(os.environ["SWITCHBOARD_SHOTS"]))
        places[-1].mkdir(parents=True, exist_ok=True)
    return places


def _shoot(visitor: Visitor, artifacts: Path, name: str) -> None:
    for place in _shots(artifacts):
        visitor.page.screenshot(path=str(place / f"docs-{name}.png"), full_page=True)


@pytest.fixture
def reader(gateway: Gateway, transactional_db: None) -> Gateway:  # noqa: F811
    ModelPrice.objects.create(
        model=CatalogModel.objects.get(name="gpt-fake"),
        input_per_mtok=Decimal("2.5"),
        output_per_mtok=Decimal("10"),
        cached_input_per_mtok=Decimal("1.25"),
        currency="USD",
    )
    ApiKey.objects.filter(user=gateway.user).update(
        rpm=60, tpd=1_000_000, money_budget=Decimal("20"), max_output_tokens=4096
    )
    return gateway


def test_a_member_reads_the_guide_in_both_languages_and_on_a_phone(
    browser: Browser, reader: Gateway, artifacts: Path
) -> None:
    visitor = Visitor(browser, reader.url, viewport={"width": 1280, "height": 900})
    visitor.context.grant_permissions(["clipboard-read", "clipboard-write"])
    visitor.sign_in(reader.user.email)

    # English, desktop: the tables and the samples, and a copy button that copies.
    page = visitor.open("/docs/")
    assert page.inner_text("h1") == "API guide"
    assert page.locator("#model-table tr[data-model='gpt-fake']").inner_text().count("10") >= 1
    assert page.locator("table.limits").count() == 1
    page.click("button[data-copy='#sample-chat-python']")
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied == page.inner_text("#sample-chat-python").strip()
    assert "SWITCHBOARD_API_KEY" in copied
    assert reader.key not in copied
    _shoot(visitor, artifacts, "en")
    visitor.check_csp()

    # The language buttons show one language's samples (and the choice is kept).
    page.click("button[data-show-samples='curl']")
    assert page.locator("figure.sample[data-language='python']").first.is_hidden()
    assert page.locator("figure.sample[data-language='curl']").first.is_visible()
    page.reload()
    assert page.locator("figure.sample[data-language='node']").first.is_hidden()
    _shoot(visitor, artifacts, "en-curl")
    page.click("button[data-show-samples='all']")

    # The OpenAPI link opens the document.
    href = page.get_attribute("a[href$='/v1/openapi.json']", "href")
    assert href is not None
    assert page.request.get(href).json()["openapi"] == "3.1.0"

    # Chinese.
    visitor.context.add_cookies(
        [{"name": "django_language", "value": "zh-hans", "url": reader.url}]
    )
    page = visitor.open("/docs/")
    assert page.inner_text("h1") == "API 指南"
    assert "每分钟请求数" in page.inner_text("table.limits")
    _shoot(visitor, artifacts, "zh")
    visitor.close()

    # A phone: nothing wider than the screen but the code blocks, which scroll.
    phone = Visitor(browser, reader.url, viewport={"width": 390, "height": 844}, is_mobile=True)
    phone.sign_in(reader.user.email)
    page = phone.open("/docs/")
    width: Any = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page is {width}px wide on a 390px phone"
    _shoot(phone, artifacts, "phone")
    page.click("a[href='#task-tools']")
    phone.check_csp()
    phone.close()


def test_anyone_reads_the_public_guide_without_anything_personal(
    browser: Browser, reader: Gateway, artifacts: Path, settings: Any
) -> None:
    settings.SWITCHBOARD_PUBLIC_DOCS = True
    visitor = Visitor(browser, reader.url, viewport={"width": 1280, "height": 900})
    page = visitor.open("/docs/")
    assert page.locator("#limits").count() == 0
    assert page.locator("#model-table tr[data-model='claude-fake']").count() == 1
    _shoot(visitor, artifacts, "public")
    visitor.check_csp()
    visitor.close()
