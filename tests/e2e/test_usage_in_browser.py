"""The usage dashboard in a real browser: charts drawn under the CSP, tables, CSV, the log.

An admin and a member open the dashboard over demo-like usage; every chart's canvas
is drawn, no console error and no CSP violation; the stacking switch redraws; a
table opens and its CSV download equals it; the request log and a request page open.
Screenshots in English, Chinese and at phone width (tests/artifacts/usage-*.png).
"""

from __future__ import annotations

import csv
import io
import random
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

from django.utils import timezone
from playwright.sync_api import Browser

from accounts.models import Role
from keys.models import ApiKey, UsageRecord
from tests.conftest import make_user
from tests.e2e.test_console_in_browser import Visitor

CHARTS = ("cost", "requests", "tokens", "token_mix", "status", "error_rate", "latency", "top_keys")


def demo_usage(count: int = 600) -> None:
    """Usage of two members over the last day: several models, keys and outcomes."""
    rng = random.Random(12)
    members = [make_user("alice@example.com"), make_user("bob@example.com")]
    keys = [
        ApiKey.issue(user=user, name=f"{user.email.split('@')[0]}-{n}")[0]
        for user in members
        for n in range(2)
    ]
    keys[0].money_budget = Decimal("5")
    keys[0].save()
    now = timezone.now()
    outcomes = [("ok", 200)] * 8 + [
        ("error", 429),
        ("error", 502),
        ("error", 400),
        ("stopped", 200),
    ]
    rows = []
    for i in range(count):
        key = rng.choice(keys)
        status, http = rng.choice(outcomes)
        rows.append(
            UsageRecord(
                created_at=now - timedelta(seconds=rng.uniform(0, 86_000)),
                request_id=f"demo-{i}",
                user_id=key.user_id,
                key=key,
                endpoint="chat.completions",
                dialect=rng.choice(["openai", "anthropic", "browser"]),
                model=rng.choice(["gpt-4o", "claude-sonnet", "qwen-max", "llama-70b"]),
                provider=rng.choice(["openai", "anthropic", "local"]),
                status=status,
                http_status=http,
                input_tokens=rng.randrange(10, 4000),
                cached_tokens=rng.randrange(0, 500),
                output_tokens=rng.randrange(0, 1500),
                cost=Decimal(rng.randrange(0, 10**10)).scaleb(-12),
                latency_ms=int(rng.lognormvariate(7, 0.8)),
                ttft_ms=rng.randrange(50, 3000),
            )
        )
    UsageRecord.objects.bulk_create(rows)


def drawn(page, name: str) -> bool:
    """Whether the figure's canvas holds painted pixels."""
    return page.evaluate(
        """(name) => {
          const canvas = document.querySelector(`canvas[data-chart="${name}"]`);
          if (!canvas || !canvas.width) return false;
          const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
          for (let i = 3; i < data.length; i += 4) { if (data[i]) return true; }
          return false;
        }""",
        name,
    )


def test_the_dashboard_draws_its_charts_and_its_csv_equals_its_table(
    browser: Browser, live_server_url: str, transactional_db: None, artifacts: Path
) -> None:
    demo_usage()
    make_user("carol@example.com", Role.ADMIN)
    admin = Visitor(
        browser, live_server_url, viewport={"width": 1280, "height": 900}, accept_downloads=True
    )
    admin.sign_in("carol@example.com")
    page = admin.open("/console/usage/?range=24h")
    page.wait_for_function("document.querySelectorAll('canvas[data-chart]').length > 0")
    for name in (*CHARTS, "top_users"):
        assert drawn(page, name), f"the {name} chart is blank"
    admin.check_csp()
    page.screenshot(path=str(artifacts / "usage-dashboard-en.png"), full_page=True)

    # The stacking switch: by key.
    page.click("a[data-stack=key]")
    page.wait_for_load_state()
    assert "stack=key" in page.url
    assert drawn(page, "cost")
    legend = page.locator("table[data-table=cost] thead").text_content() or ""
    assert "alice-0" in legend or "bob-0" in legend

    # A table one click away, and its CSV is the same numbers.
    figure = page.locator("#figure-cost")
    figure.locator("summary").click()
    assert figure.locator("table").is_visible()
    table = page.evaluate(
        """() => [...document.querySelectorAll('table[data-table=cost] tr')].map(
             (tr) => [...tr.children].map((cell) => cell.textContent.trim()))"""
    )
    with page.expect_download() as download_info:
        figure.locator("a[data-csv=cost]").click()
    content = Path(download_info.value.path()).read_text(encoding="utf-8")
    assert list(csv.reader(io.StringIO(content))) == table
    admin.check_csp()

    # The request log and one request's page.
    page = admin.open("/console/usage/requests/")
    rows = page.locator("table.usage-log tbody tr")
    assert rows.count() == 50
    rows.first.locator("a").click()
    page.wait_for_load_state()
    assert "/console/usage/requests/" in page.url
    admin.check_csp()
    page.screenshot(path=str(artifacts / "usage-request-en.png"), full_page=True)
    # Cut to a range (as a dashboard or a report links to it): older, then newer again.
    page = admin.open("/console/usage/requests/?range=24h")
    first = page.locator("table.usage-log tbody tr").first.inner_text()
    page.click("a[rel=next]")
    page.wait_for_load_state()
    assert "at=" in page.url
    assert page.locator("table.usage-log tbody tr").first.inner_text() != first
    page.click("a[rel=prev]")
    page.wait_for_load_state()
    assert page.locator("table.usage-log tbody tr").first.inner_text() == first
    assert page.locator("[data-range]").is_visible()
    page.screenshot(path=str(artifacts / "usage-requests-ranged-en.png"))
    admin.check_csp()

    # Chinese, and a phone.
    page.goto("/console/usage/")
    page.select_option("#language", "zh-hans")
    page.wait_for_selector("text=审计日志")
    page = admin.open("/console/usage/?range=24h")
    page.wait_for_function("document.querySelectorAll('canvas[data-chart]').length > 0")
    assert drawn(page, "status")
    page.screenshot(path=str(artifacts / "usage-dashboard-zh-hans.png"), full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})
    for path in (
        "/console/usage/?range=24h",
        "/console/usage/requests/",
        "/console/usage/requests/?range=24h",
    ):
        page = admin.open(path)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"{path} is {width}px wide on a phone"
    page.screenshot(path=str(artifacts / "usage-requests-ranged-phone-zh-hans.png"))
    page = admin.open("/console/usage/?range=24h")
    assert drawn(page, "cost")
    page.screenshot(path=str(artifacts / "usage-dashboard-phone-zh-hans.png"), full_page=True)
    admin.close()


def test_a_member_sees_only_their_own_usage_in_the_browser(
    browser: Browser, live_server_url: str, transactional_db: None, artifacts: Path
) -> None:
    demo_usage(200)
    member = Visitor(browser, live_server_url, viewport={"width": 1280, "height": 900})
    member.sign_in("alice@example.com")
    page = member.open("/console/usage/?range=24h")
    for name in CHARTS:
        assert drawn(page, name), f"the {name} chart is blank"
    assert page.locator("canvas[data-chart=top_users]").count() == 0
    assert page.locator("select[name=user]").count() == 0
    assert "bob" not in page.content()
    page = member.open("/console/usage/requests/")
    assert "bob" not in page.content()
    page.screenshot(path=str(artifacts / "usage-requests-member-en.png"), full_page=True)
    # One request on a phone: its long labels (English) leave its values room.
    own = UsageRecord.objects.filter(user__email="alice@example.com", priced=False).first()
    assert own is not None
    page.set_viewport_size({"width": 390, "height": 844})
    page = member.open(f"/console/usage/requests/{own.pk}/")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"a request's page is {width}px wide on a phone"
    page.screenshot(path=str(artifacts / "usage-request-phone-en.png"), full_page=True)
    member.close()
