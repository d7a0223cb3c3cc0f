"""The monthly statements' pages: the list, a month (close it, adjust it), the files.

Finance and admins see every statement, produce a month, close it and add adjustments;
a member sees and downloads their own statements only (another's is a 404, a change a
403).  The actions live in ``keys.statements``.
"""

from __future__ import annotations

import re
from datetime import date
from decimal import Decimal
from typing import Any

from django.contrib import messages
from django.db.models import Count, OuterRef, Q, Subquery, Sum
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.translation import gettext as _
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from accounts.console import EVERYONE, STAFF
from accounts.models import User
from accounts.roles import console_page
from keys import statements
from keys.models import Adjustment, Statement, StatementMonth

FILES = {
    "csv": "text/csv; charset=utf-8",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
}


def _month(text: str) -> date:
    match = re.fullmatch(r"(\d{4})-(\d{2})", text)
    if not match or not 1 <= int(match.group(2)) <= 12:
        raise Http404
    return date(int(match.group(1)), int(match.group(2)), 1)


@require_GET
@console_page(read=EVERYONE, write=STAFF)
def statement_list(request: HttpRequest) -> HttpResponse:
    """Months with their summaries (finance, admins), or a member's own statements."""
    user: User = request.user  # type: ignore[assignment]
    if statements.sees_all(user):
        months = list(
            StatementMonth.objects.select_related("closed_by").annotate(
                users=Count("statements", filter=Q(statements__user__isnull=False)),
                # A subquery, not a second join: joining both would count each
                # adjustment once per statement.
                adjusted=Subquery(
                    Adjustment.objects.filter(month=OuterRef("pk"))
                    .values("month")
                    .annotate(total=Sum("amount"))
                    .values("total")[:1]
                ),
            )
        )
        summaries = {
            s.month_id: s
            for s in Statement.objects.filter(user__isnull=True).defer("csv_file", "xlsx_file")
        }
        rows = [(month, summaries.get(month.pk)) for month in months]
        context: dict[str, Any] = {"rows": rows, "sees_all": True}
    else:
        own = list(statements.visible_statements(user).order_by("-month__month"))
        context = {
            "own": [(statement, statements.adjusted_total(statement)) for statement in own],
            "sees_all": False,
        }
    context["due"] = statements.previous_month()
    return render(request, "keys/console/statements/list.html", context)


@require_POST
@console_page(read=STAFF, write=STAFF)
def statement_produce(request: HttpRequest) -> HttpResponse:
    """Produce a month now (a past month that has none, or an open month again)."""
    try:
        month = _month(request.POST.get("month", "").strip())
    except Http404:
        messages.error(request, _("Month: expected YYYY-MM, e.g. 2026-11."))
        return redirect("console:statements")
    again = request.POST.get("again") == "1"
    try:
        produced = statements.produce(month, again=again)
    except statements.StatementError as exc:
        messages.error(request, str(exc))
        return redirect("console:statements")
    if produced is None:
        messages.info(
            request, _("%(month)s had no usage: nothing to state.") % {"month": f"{month:%Y-%m}"}
        )
        return redirect("console:statements")
    messages.success(request, _("Statements of %(month)s produced.") % {"month": str(produced)})
    return redirect("console:statement_month", month=str(produced))


@require_http_methods(["GET", "POST"])
@console_page(read=STAFF, write=STAFF)
def statement_month(request: HttpRequest, month: str) -> HttpResponse:
    """One month: every statement, its adjustments; close it or add an adjustment."""
    stored = get_object_or_404(
        StatementMonth.objects.select_related("closed_by"), month=_month(month)
    )
    user: User = request.user  # type: ignore[assignment]
    errors: list[str] = []
    if request.method == "POST":
        action = request.POST.get("action")
        try:
            if action == "close":
                statements.do_close_month(month=stored, by=user)
                messages.success(
                    request,
                    _("%(month)s is closed: its statements are final.") % {"month": str(stored)},
                )
                return redirect("console:statement_month", month=month)
            if action == "adjust":
                target = None
                email = request.POST.get("user", "").strip()
                if email:
                    target = User.objects.filter(email__iexact=email).first()
                    if target is None:
                        raise statements.StatementError(
                            _("User: no user with the email “%(email)s”.") % {"email": email}
                        )
                statements.do_add_adjustment(
                    month=stored,
                    user=target,
                    amount=request.POST.get("amount", ""),
                    reason=request.POST.get("reason", ""),
                    by=user,
                )
                messages.success(request, _("Adjustment added."))
                return redirect("console:statement_month", month=month)
            errors.append(_("Unknown action."))
        except statements.StatementError as exc:
            errors.append(str(exc))
    rows = list(stored.statements.select_related("user").defer("csv_file", "xlsx_file"))
    adjustments = list(stored.adjustments.select_related("user", "created_by"))
    by_user: dict[int | None, Decimal] = {}
    for adjustment in adjustments:
        by_user[adjustment.user_id] = (
            by_user.get(adjustment.user_id, Decimal(0)) + adjustment.amount
        )
    total_adjusted = sum(by_user.values(), Decimal(0))
    lines = [
        (
            statement,
            total_adjusted
            if statement.user_id is None
            else by_user.get(statement.user_id, Decimal(0)),
        )
        for statement in rows
    ]
    context = {
        "month": stored,
        "lines": [(s, adj, s.cost + adj) for s, adj in lines],
        "adjustments": adjustments,
        "errors": errors,
        "posted": request.POST if errors else {},
        "user_choices": [s.user.email for s in rows if s.user_id and s.user],
    }
    return render(
        request,
        "keys/console/statements/month.html",
        context,
        status=400 if errors else 200,
    )


@require_GET
@console_page(read=EVERYONE)
def statement_file(request: HttpRequest, pk: int, kind: str) -> HttpResponse:
    """A statement's CSV or XLSX exactly as it was produced; another member's is a 404."""
    if kind not in FILES:
        raise Http404
    statement = get_object_or_404(
        statements.visible_statements(request.user).defer(None),  # type: ignore[arg-type]
        pk=pk,
    )
    content = bytes(statement.csv_file if kind == "csv" else statement.xlsx_file)
    who = statement.user.email.split("@")[0] if statement.user else "summary"
    response = HttpResponse(content, content_type=FILES[kind])
    response["Content-Disposition"] = (
        f'attachment; filename="switchboard-statement-{statement.month}-{who}.{kind}"'
    )
    return response
