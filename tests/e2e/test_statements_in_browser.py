"""Monthly statements in a real browser: finance adjusts and closes a month, downloads files.

Screenshots in English, Chinese and at phone width (tests/artifacts/statements-*.png).
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from openpyxl import load_workbook
from playwright.sync_api import Browser

from accounts.models import Role
from keys import statements
from keys.models import StatementMonth
from tests.conftest import make_user
from tests.e2e.test_console_in_browser import Visitor
from tests.e2e.test_usage_in_browser import demo_usage


def test_finance_adjusts_closes_and_downloads_a_month(
    browser: Browser,
    live_server_url: str,
    transactional_db: None,
    artifacts: Path,
    settings,
) -> None:
    demo_usage(300)  # the last day's usage; produced as "this month" by moving the clock on
    make_user("frank@example.com", Role.FINANCE)
    now = datetime.now(UTC)
    month = statements.produce(now.date().replace(day=1), now=datetime(2100, 1, 1, tzinfo=UTC))
    if month is None:  # the demo's day straddled the month's turn: state the month before
        month = statements.produce(
            statements.previous_month(now), now=datetime(2100, 1, 1, tzinfo=UTC)
        )
    assert month is not None
    finance = Visitor(
        browser, live_server_url, viewport={"width": 1280, "height": 900}, accept_downloads=True
    )
    finance.sign_in("frank@example.com")
    page = finance.open("/console/reports/statements/")
    page.click(f"text={month}")
    page.wait_for_selector("text=alice@example.com")
    finance.check_csp()

    # An adjustment with a bad amount is refused with the field named, then a good one.
    page.select_option("#adjust-user", "alice@example.com")
    page.fill("#adjust-amount", "ten")
    page.fill("#adjust-reason", "refund of the outage")
    page.click("text=Add adjustment")
    page.wait_for_selector("text=is not a number")
    page.fill("#adjust-amount", "-0.25")
    page.click("text=Add adjustment")
    page.wait_for_selector("text=refund of the outage")
    page.click(f"text=Close {month}")
    page.wait_for_selector("text=its statements are final")
    assert StatementMonth.objects.get(pk=month.pk).is_closed
    page.screenshot(path=str(artifacts / "statements-month-en.png"), full_page=True)

    # The summary's files, read back, hold the page's total.
    summary = month.statements.get(user__isnull=True)
    with page.expect_download() as download:
        page.click(f"a[href$='/file/{summary.pk}.csv']")
    lines = list(csv.reader(io.StringIO(Path(download.value.path()).read_text())))
    header = lines[lines.index([]) + 1]
    assert Decimal(lines[-1][header.index("Cost")]) == summary.cost
    with page.expect_download() as download:
        page.click(f"a[href$='/file/{summary.pk}.xlsx']")
    sheet = load_workbook(io.BytesIO(Path(download.value.path()).read_bytes())).active
    assert sheet is not None
    rows = [list(row) for row in sheet.iter_rows(values_only=True)]
    header = rows[[i for i, row in enumerate(rows) if not any(row)][0] + 1]
    assert Decimal(str(rows[-1][header.index("Cost")])) == summary.cost

    # Chinese, and a phone.
    page.select_option("#language", "zh-hans")
    page.wait_for_selector("html[lang=zh-hans]")
    page = finance.open("/console/reports/statements/")
    page.screenshot(path=str(artifacts / "statements-list-zh-hans.png"), full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})
    page = finance.open(f"/console/reports/statements/{month}/")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the month's page is {width}px wide on a phone"
    page.screenshot(path=str(artifacts / "statements-month-phone-zh-hans.png"), full_page=True)
    finance.close()

    # A member sees their own statement only.
    member = Visitor(browser, live_server_url, viewport={"width": 1280, "height": 900})
    member.sign_in("alice@example.com")
    page = member.open("/console/reports/statements/")
    assert "bob@example.com" not in page.content()
    assert page.locator("a[data-file=csv]").count() == 1
    page.screenshot(path=str(artifacts / "statements-member-en.png"), full_page=True)
    member.close()
