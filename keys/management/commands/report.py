"""``manage.py report``: the console's finance report, for scripts.

    manage.py report --from 2026-11-01 --to 2026-12-01 [--tz Asia/Shanghai]
        [--group-by model[,key]] [--format table|csv|json|xlsx] [--output FILE]

``--from`` is included and ``--to`` excluded, both dates in ``--tz`` (default
``TIME_ZONE``).  ``--format json`` prints one object::

    {"from", "to", "tz", "currency", "group_by": [...],
     "rows": [{<group fields>, "requests", "failed", "input_tokens", "cached_tokens",
               "output_tokens", "cost", "upstream_cost", "margin"}],
     "totals": {same counters}, "flags": {"unpriced", "estimated", "zero_cost"},
     "previous": {"from", "to", "totals"}, "generated_at"}

with every money amount a decimal string.  Group fields: ``user`` (email), ``key``
(prefix), ``model``, ``provider``, ``route``, ``source``, ``day`` (ISO date).
``--format xlsx`` needs ``--output``.  Bad arguments raise ``CommandError`` naming
the option.
"""

from __future__ import annotations

from argparse import ArgumentParser
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from keys import reports

FORMATS = ("table", "csv", "json", "xlsx")


class Command(BaseCommand):
    help = "Usage and cost of a period, grouped, as a table, CSV, JSON or XLSX."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--from", dest="start", required=True, help="first day, YYYY-MM-DD (included)"
        )
        parser.add_argument(
            "--to", dest="end", required=True, help="end day, YYYY-MM-DD (excluded)"
        )
        parser.add_argument("--tz", default="", help="the days' time zone (default TIME_ZONE)")
        parser.add_argument(
            "--group-by",
            default="",
            help=f"one or two of {', '.join(reports.GROUPS)}, comma-separated",
        )
        parser.add_argument("--format", default="table", help=" | ".join(FORMATS))
        parser.add_argument("--output", default="", help="write to FILE instead of stdout")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["format"] not in FORMATS:
            raise CommandError(
                f"--format: expected one of {', '.join(FORMATS)}, got {options['format']!r}"
            )
        if options["format"] == "xlsx" and not options["output"]:
            raise CommandError("--output: --format xlsx writes a file; name it with --output")
        try:
            zone = (
                reports.parse_zone(options["tz"], "tz")
                if options["tz"]
                else ZoneInfo(settings.TIME_ZONE)
            )
            period = reports.parse_dates(options["start"], options["end"], zone)
            group_by = reports.parse_group_by([options["group_by"]])
        except reports.ReportError as error:
            raise CommandError(f"--{error.option}: {error.message}") from error

        report = reports.build(period, group_by=group_by)
        output = options["format"]
        if output == "xlsx":
            content: str | bytes = report.xlsx()
        elif output == "json":
            content = report.json()
        elif output == "csv":
            content = report.csv()
        else:
            content = report.text()
        if options["output"]:
            path = Path(options["output"])
            try:
                if isinstance(content, bytes):
                    path.write_bytes(content)
                else:
                    path.write_text(content, encoding="utf-8")
            except OSError as error:
                raise CommandError(f"--output: cannot write {path}: {error}") from error
            return
        assert isinstance(content, str)
        self.stdout.write(content, ending="")
