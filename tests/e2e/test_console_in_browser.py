"""The console end to end, as its people use it: a real browser, the live server, the SDK.

An admin creates a member, issues them a key and copies it from the page; the key
works with the ``openai`` SDK against a fake upstream; RPM 1 makes the second call a
429; a new price changes the next call's cost and not the earlier one's; revoking
makes the next call fail; the audit log shows each step.  A member creates and
revokes their own key and sees no one else's.  Finance sees and cannot change.
No page breaks the CSP; screenshots in English, Chinese and at phone width.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
from playwright.sync_api import Browser, BrowserContext, Page

from accounts.models import Role, User
from chatapp.models import CatalogModel, Provider, Route
from chatapp.relay import routing
from keys import ledger
from keys.models import ApiKey, ModelPrice, UsageRecord
from tests.conftest import PASSWORD, make_user
from tests.fake_upstream import FakeUpstream, Reply

# Collected before the page's own scripts on every navigation (DevTools, outside the CSP).
CSP_WATCH = """
window.__csp = [];
document.addEventListener("securitypolicyviolation",
  (e) => window.__csp.push(e.violatedDirective + " " + e.blockedURI));
"""


@pytest.fixture
def fake(transactional_db: None, settings: Any) -> Iterator[FakeUpstream]:
    settings.SWITCHBOARD_CHAT_TITLES = False
    routing.reset()
    upstream = FakeUpstream().start()
    provider = Provider.objects.create(
        name="fake", type="openai", base_url=upstream.openai_base_url, timeout=10
    )
    model = CatalogModel.objects.create(name="gpt-fake", display_name="GPT Fake")
    Route.objects.create(model=model, provider=provider, upstream_model="up")
    yield upstream
    upstream.stop()


class Visitor:
    """One person's browser: signs in, and collects CSP violations and page errors."""

    def __init__(self, browser: Browser, base_url: str, **options: Any) -> None:
        self.context: BrowserContext = browser.new_context(base_url=base_url, **options)
        self.context.add_init_script(CSP_WATCH)
        self.page: Page = self.context.new_page()
        self.page.set_default_timeout(10_000)
        self.errors: list[str] = []
        self.page.on("pageerror", lambda error: self.errors.append(f"pageerror: {error}"))
        self.page.on(
            "console",
            lambda message: (
                self.errors.append(message.text)
                if message.type == "error" and "Failed to load resource" not in message.text
                else None
            ),
        )
        self.page.on("dialog", lambda dialog: dialog.accept())

    def sign_in(self, email: str) -> None:
        self.page.goto("/accounts/login/")
        self.page.fill("input[name=username]", email)
        self.page.fill("input[name=password]", PASSWORD)
        self.page.click("button[type=submit]")
        self.page.wait_for_load_state()

    def open(self, path: str) -> Page:
        self.page.goto(path)
        self.check_csp()
        return self.page

    def check_csp(self) -> None:
        violations = self.page.evaluate("window.__csp || []")
        assert violations == [], f"CSP violations on {self.page.url}: {violations}"
        assert self.errors == [], f"browser errors on {self.page.url}: {self.errors}"

    def close(self) -> None:
        self.context.close()


def _client(live_server_url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server_url + "/v1", api_key=key, max_retries=0)


def _ask(client: openai.OpenAI) -> str:
    reply = client.chat.completions.create(
        model="gpt-fake", messages=[{"role": "user", "content": "Hello"}]
    )
    return reply.choices[0].message.content or ""


def _records(key: ApiKey) -> list[UsageRecord]:
    ledger.flush()
    return list(UsageRecord.objects.filter(key=key).order_by("id"))


def test_an_admin_runs_the_gateway_from_the_console(
    browser: Browser, live_server_url: str, fake: FakeUpstream, artifacts: Path
) -> None:
    make_user("carol@example.com", Role.ADMIN)
    ModelPrice.objects.create(
        model=CatalogModel.objects.get(name="gpt-fake"),
        input_per_mtok=Decimal("1"),
        output_per_mtok=Decimal("2"),
        currency="USD",
    )
    admin = Visitor(browser, live_server_url, viewport={"width": 1280, "height": 900})
    admin.context.grant_permissions(["clipboard-read", "clipboard-write"])
    admin.sign_in("carol@example.com")

    # Given the console, the admin creates a member and gets a set-password link.
    page = admin.open("/console/users/new/")
    page.fill("input[name=email]", "dave@example.com")
    page.select_option("select[name=role]", Role.MEMBER)
    page.click("button[type=submit].primary")
    page.wait_for_selector("#password-link")
    link = page.inner_text("#password-link").strip()
    assert "/accounts/set-password/" in link
    admin.check_csp()
    dave = User.objects.get(email="dave@example.com")

    # When the admin issues dave a key with RPM 1 and copies the secret from the page...
    page = admin.open(f"/console/keys/new/?user={dave.email}")
    page.fill("input[name=name]", "dave's script")
    page.fill("input[name=rpm]", "1")
    page.click("form button[type=submit].primary")
    page.wait_for_selector("#new-secret")
    page.screenshot(path=str(artifacts / "console-key-secret-en.png"), full_page=True)
    page.click("[data-copy='#new-secret']")
    secret = page.evaluate("navigator.clipboard.readText()").strip()
    assert secret == page.inner_text("#new-secret").strip()
    key = ApiKey.objects.get(user=dave)
    admin.check_csp()

    # ...the key works with the openai SDK, and the second call in the minute is a 429.
    client = _client(live_server_url, secret)
    fake.script(Reply(text="Hi there", input_tokens=1000, output_tokens=500))
    assert _ask(client) == "Hi there"
    with pytest.raises(openai.RateLimitError):
        _ask(client)

    # Lifting the limit in the key's edit form lets dave call again at once.
    page = admin.open(f"/console/keys/{key.pk}/edit/")
    page.fill("input[name=rpm]", "")
    page.click("form button[type=submit].primary")
    page.wait_for_url(f"**/console/keys/{key.pk}/")
    fake.script(Reply(text="Again", input_tokens=1000, output_tokens=500))
    assert _ask(client) == "Again"

    # A new price changes the next call's recorded cost, and not the earlier ones'.
    before = [record.cost for record in _records(key) if record.status == "ok"]
    assert before == [Decimal("0.002"), Decimal("0.002")]
    page = admin.open("/console/prices/")
    page.select_option("select[name=model]", label="gpt-fake")
    page.fill("input[name=input_per_mtok]", "10")
    page.fill("input[name=output_per_mtok]", "20")
    page.click("form button[type=submit].primary")
    page.wait_for_load_state()
    admin.check_csp()
    fake.script(Reply(text="Pricier", input_tokens=1000, output_tokens=500))
    assert _ask(client) == "Pricier"
    costs = [record.cost for record in _records(key) if record.status == "ok"]
    assert costs == [Decimal("0.002"), Decimal("0.002"), Decimal("0.02")]

    # Revoking the key (after the confirmation) refuses dave's very next call.
    page = admin.open(f"/console/keys/{key.pk}/")
    page.screenshot(path=str(artifacts / "console-key-en.png"), full_page=True)
    page.click("form[action$='/revoke/'] button")
    page.wait_for_load_state()
    with pytest.raises(openai.PermissionDeniedError):
        _ask(client)

    # Then the audit log shows each step, by the admin, without the secret.
    page = admin.open("/console/audit/")
    log = page.inner_text("main")
    assert "dave@example.com" in log
    assert "carol@example.com" in log
    for action in ("create", "revoke"):
        assert action in log.lower()
    assert secret not in page.content()
    assert key.prefix in log or "dave's script" in log
    page.screenshot(path=str(artifacts / "console-audit-en.png"), full_page=True)

    # The console in Chinese, and at phone width.
    page.select_option("#language", "zh-hans")
    page.wait_for_selector("text=审计日志")
    page = admin.open("/console/keys/")
    page.screenshot(path=str(artifacts / "console-keys-zh-hans.png"), full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})
    for path in ("/console/users/", "/console/keys/", "/console/prices/", "/console/audit/"):
        page = admin.open(path)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"{path} is {width}px wide on a phone"
    page = admin.open("/console/keys/")
    page.screenshot(path=str(artifacts / "console-keys-phone-zh-hans.png"), full_page=True)
    admin.close()


def test_a_member_manages_their_own_keys_and_finance_only_reads(
    browser: Browser, live_server_url: str, fake: FakeUpstream, artifacts: Path
) -> None:
    alice = make_user("alice@example.com")
    bob = make_user("bob@example.com")
    make_user("frank@example.com", Role.FINANCE)
    from keys.actions import do_create_key

    do_create_key(user=bob, name="bob's secret project")

    # Given alice's console, she creates a key of her own...
    member = Visitor(browser, live_server_url, viewport={"width": 1280, "height": 900})
    member.sign_in("alice@example.com")
    page = member.open("/console/")
    assert page.url.endswith("/console/keys/")
    nav = page.inner_text("nav.console-nav")
    assert "Users" not in nav
    assert "Audit log" not in nav
    page = member.open("/console/keys/new/")
    page.fill("input[name=name]", "laptop")
    page.click("form button[type=submit].primary")
    secret = page.inner_text("#new-secret").strip()
    fake.script(Reply(text="Mine"))
    assert _ask(_client(live_server_url, secret)) == "Mine"

    # ...sees only her own keys, never bob's...
    page = member.open("/console/keys/")
    listing = page.inner_text("main")
    assert "laptop" in listing
    assert "bob's secret project" not in listing
    bobs = ApiKey.objects.get(user=bob)
    assert member.page.goto(f"/console/keys/{bobs.pk}/").status == 404
    member.errors.clear()

    # ...and revokes hers: the next call with it is refused.
    mine = ApiKey.objects.get(user=alice, name="laptop")
    page = member.open(f"/console/keys/{mine.pk}/")
    page.click("form[action$='/revoke/'] button")
    page.wait_for_load_state()
    with pytest.raises(openai.PermissionDeniedError):
        _ask(_client(live_server_url, secret))
    member.close()

    # Finance sees every key and price, with no button that would change anything...
    finance = Visitor(browser, live_server_url, viewport={"width": 1280, "height": 900})
    finance.sign_in("frank@example.com")
    page = finance.open(f"/console/keys/{bobs.pk}/")
    assert "bob's secret project" in page.inner_text("main")
    assert page.locator("main form[method=post]").count() == 0
    page = finance.open("/console/prices/")
    assert page.locator("select[name=model]").count() == 0
    # ...and a change sent anyway is refused.
    status = page.evaluate(
        """async (url) => {
            const token = document.cookie.match(/csrftoken=([^;]+)/)[1];
            const response = await fetch(url, {method: "POST", headers: {"X-CSRFToken": token}});
            return response.status;
        }""",
        f"/console/keys/{bobs.pk}/revoke/",
    )
    assert status == 403
    assert ApiKey.objects.get(pk=bobs.pk).revoked_at is None
    page.screenshot(path=str(artifacts / "console-finance-en.png"), full_page=True)
    finance.close()
