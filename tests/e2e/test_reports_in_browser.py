"""The finance report in a real browser: finance changes the grouping, downloads both files.

Finance opens November's report, groups it by key then model, and downloads the CSV
and the XLSX with Playwright's download API: each file's total line equals the
page's to the last digit.  No CSP violation or browser error; screenshots in English
and Chinese, at desktop and phone width (tests/artifacts/reports-*.png).
"""

from __future__ import annotations

import csv
import io
import random
import re
import zipfile
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from openpyxl import load_workbook
from playwright.sync_api import Browser, Page

from accounts.models import Role
from keys.models import ApiKey, UsageRecord
from tests.conftest import make_user
from tests.e2e.test_console_in_browser import Visitor


def two_months_of_usage(count: int = 400) -> None:
    """Two members' usage over October and November 2026: several models, keys and outcomes."""
    rng = random.Random(13)
    members = [make_user("alice@example.com"), make_user("bob@example.com")]
    keys = [
        ApiKey.issue(user=user, name=f"{user.email.split('@')[0]}-{n}")[0]
        for user in members
        for n in range(2)
    ]
    start = datetime(2026, 9, 30, 16, tzinfo=UTC)  # 1 October in Shanghai
    span = timedelta(days=61).total_seconds()
    rows = []
    for i in range(count):
        key = rng.choice(keys)
        status, http = rng.choice([("ok", 200)] * 8 + [("error", 429), ("error", 502)])
        cost = Decimal(rng.randrange(0, 10**11)).scaleb(-12)
        rows.append(
            UsageRecord(
                created_at=start + timedelta(seconds=rng.uniform(0, span)),
                request_id=f"report-{i}",
                user_id=key.user_id,
                key=key,
                endpoint="chat.completions",
                dialect=rng.choice(["openai", "anthropic", "browser"]),
                model=rng.choice(["gpt-4o", "claude-sonnet", "qwen-max"]),
                provider=rng.choice(["openai", "anthropic", "local"]),
                status=status,
                http_status=http,
                input_tokens=rng.randrange(10, 4000),
                cached_tokens=rng.randrange(0, 500),
                output_tokens=rng.randrange(0, 1500),
                cost=cost,
                priced=cost > 0,
                upstream_cost=(cost * Decimal("0.6")).quantize(Decimal("1E-12")),
                latency_ms=300,
            )
        )
    UsageRecord.objects.bulk_create(rows)


def page_total(page: Page) -> list[str]:
    return page.evaluate(
        """() => [...document.querySelectorAll('table[data-table=report] tfoot tr > *')]
             .map((cell) => cell.textContent.trim())"""
    )


def test_finance_regroups_the_report_and_both_downloads_equal_the_page(
    browser: Browser, live_server_url: str, transactional_db: None, artifacts: Path
) -> None:
    two_months_of_usage()
    make_user("frank@example.com", Role.FINANCE)
    finance = Visitor(
        browser, live_server_url, viewport={"width": 1280, "height": 900}, accept_downloads=True
    )
    finance.sign_in("frank@example.com")
    page = finance.open("/console/reports/?month=2026-11&tz=Asia/Shanghai")
    assert page.locator("[data-period-label]").text_content() == "2026-11"
    assert page.locator("table[data-table=report] tbody tr").count() == 3  # by model
    page.screenshot(path=str(artifacts / "reports-en.png"), full_page=True)

    # Regroup: by key, then model.
    page.select_option("#report-group", "key")
    page.select_option("#report-group-2", "model")
    page.click("form.report-filters button[type=submit]")
    page.wait_for_load_state()
    assert "group_by=key&group_by=model" in page.url
    heads = page.locator("table[data-table=report] thead th").all_text_contents()
    assert heads[:2] == ["Key", "Model"]
    assert page.locator("table[data-table=report] tbody tr").count() == 12  # 4 keys × 3 models
    finance.check_csp()
    shown = page_total(page)
    assert shown[0] == "Total"
    numbers = shown[2:]  # requests ... margin, previous cost, change
    assert numbers[-1].endswith("%")

    # The CSV: its total line is the page's (the change without its % sign).
    with page.expect_download() as csv_download:
        page.click("a[data-export=csv]")
    assert csv_download.value.suggested_filename == "switchboard-report-2026-11-key-model.csv"
    lines = list(csv.reader(io.StringIO(Path(csv_download.value.path()).read_text("utf-8"))))
    header = dict(line for line in lines if len(line) == 2)
    assert header["Time zone"] == "Asia/Shanghai"
    assert header["Grouping"] == "Key + Model"
    assert lines[-1][:2] == ["Total", ""]
    assert lines[-1][2:-1] == numbers[:-1]
    assert lines[-1][-1] + "%" == numbers[-1].replace("+", "")

    # The XLSX: numeric cells equal to the page's numbers, the exact decimals in the file.
    with page.expect_download() as xlsx_download:
        page.click("a[data-export=xlsx]")
    content = Path(xlsx_download.value.path()).read_bytes()
    sheet = load_workbook(io.BytesIO(content)).active
    total = [cell.value for cell in sheet[sheet.max_row]]
    assert total[:2] == ["Total", None]
    for cell, text in zip(total[2:-1], numbers[:-1], strict=True):
        assert isinstance(cell, int | float)
        assert cell == float(Decimal(text))
    xml = zipfile.ZipFile(io.BytesIO(content)).read("xl/worksheets/sheet1.xml").decode()
    stored = set(re.findall(r"<v>([-0-9.eE+]+)</v>", xml))
    assert all(text in stored for text in numbers[:-1])
    finance.check_csp()

    # Custom dates: typing them picks the "Custom dates" kind (static/js/reports.js).
    page.fill("#report-from", "2026-11-10")
    page.fill("#report-to", "2026-11-20")
    assert page.eval_on_selector("#report-period", "(select) => select.value") == "custom"
    page.click("form.report-filters button[type=submit]")
    page.wait_for_load_state()
    assert page.locator("[data-period-label]").text_content() == "2026-11-10 – 2026-11-19"
    assert "group_by=key" in page.url  # the grouping is kept
    finance.check_csp()

    # Chinese, on a desktop and on a phone.
    page.select_option("#language", "zh-hans")
    page.wait_for_selector("text=数据质量")
    page = finance.open("/console/reports/?month=2026-11&tz=Asia/Shanghai&group_by=model")
    assert page_total(page)[0] == "合计"
    page.screenshot(path=str(artifacts / "reports-zh-hans.png"), full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})
    page = finance.open("/console/reports/?month=2026-11&tz=Asia/Shanghai&group_by=model")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the report is {width}px wide on a phone"
    page.screenshot(path=str(artifacts / "reports-phone-zh-hans.png"), full_page=True)
    finance.close()


def test_a_member_reads_their_own_report_in_the_browser(
    browser: Browser, live_server_url: str, transactional_db: None, artifacts: Path
) -> None:
    two_months_of_usage(120)
    member = Visitor(browser, live_server_url, viewport={"width": 390, "height": 844})
    member.sign_in("alice@example.com")
    page = member.open("/console/reports/?month=2026-11&group_by=key")
    assert page.locator(".report-period .badge").count() == 1  # "your usage only"
    content = page.content()
    assert "bob-" not in content
    assert "Margin" not in content
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.screenshot(path=str(artifacts / "reports-member-phone-en.png"), full_page=True)
    member.close()
