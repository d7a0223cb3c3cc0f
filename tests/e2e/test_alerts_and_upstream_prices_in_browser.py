"""Budget alerts and a route's upstream prices in a real browser, as admins and members see them.

No CSP violation or console error; Chinese and phone width hold. Screenshots in
tests/artifacts/alerts-*.png and upstream-prices-*.png.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from django.utils import timezone
from playwright.sync_api import Browser

from accounts.models import Role
from chatapp.models import CatalogModel, Provider, Route
from keys.models import ApiKey, BudgetAlert
from tests.conftest import make_user
from tests.e2e.test_console_in_browser import Visitor


def test_an_admin_prices_a_route_and_members_see_only_their_keys_alerts(
    browser: Browser, live_server_url: str, transactional_db: None, artifacts: Path
) -> None:
    make_user("carol@example.com", Role.ADMIN)
    alice = make_user("alice@example.com")
    bob = make_user("bob@example.com")
    for owner, spent in ((alice, "8.1"), (bob, "9.6")):
        key = ApiKey.issue(user=owner, name=f"{owner.email.split('@')[0]}-ci")[0]
        key.money_budget = Decimal(10)
        key.save()
        BudgetAlert.objects.create(
            key=key,
            user=owner,
            kind="money",
            period="monthly",
            period_start=timezone.now().replace(day=1, hour=0, minute=0, second=0, microsecond=0),
            threshold=80,
            budget=Decimal(10),
            spent=Decimal(spent),
        )
    provider = Provider(name="acme", type="openai", base_url="http://127.0.0.1:9/v1", timeout=5)
    provider.save()
    model = CatalogModel.objects.create(name="acme-large")
    route = Route.objects.create(model=model, provider=provider, upstream_model="large-v2")

    admin = Visitor(browser, live_server_url, viewport={"width": 1280, "height": 900})
    admin.sign_in("carol@example.com")
    page = admin.open(f"/console/routes/{route.pk}/prices/")
    page.fill("input[name=input_per_mtok]", "0.25")
    page.fill("input[name=output_per_mtok]", "1.5")
    page.fill("input[name=cache_write_per_mtok]", "0.3")
    page.click("text=Add upstream price")
    page.wait_for_selector("text=New upstream price of this route saved")
    admin.check_csp()
    assert route.upstream_prices.get().cache_write_per_mtok == Decimal("0.3")
    page.screenshot(path=str(artifacts / "upstream-prices-en.png"), full_page=True)
    page = admin.open("/console/alerts/")
    assert page.locator("table.alerts tbody tr").count() == 2
    page.screenshot(path=str(artifacts / "alerts-admin-en.png"), full_page=True)
    page.select_option("#language", "zh-hans")
    page.wait_for_selector("text=预算提醒")
    page = admin.open(f"/console/routes/{route.pk}/prices/")
    page.screenshot(path=str(artifacts / "upstream-prices-zh-hans.png"), full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})
    for path in ("/console/alerts/", f"/console/routes/{route.pk}/prices/"):
        page = admin.open(path)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"{path} is {width}px wide on a phone"
    page = admin.open("/console/alerts/")
    page.screenshot(path=str(artifacts / "alerts-phone-zh-hans.png"), full_page=True)
    admin.close()

    member = Visitor(browser, live_server_url, viewport={"width": 1280, "height": 900})
    member.sign_in("alice@example.com")
    page = member.open("/console/alerts/")
    assert page.locator("table.alerts tbody tr").count() == 1
    assert "bob-ci" not in page.content()
    page.screenshot(path=str(artifacts / "alerts-member-en.png"), full_page=True)
    member.close()
