"""`tally report`: usage by operation, label, day or hour; the period summary
and the forecast, as a table, CSV or JSON."""

from __future__ import annotations

import argparse
import csv
import sys

from tally.cli import arguments, output
from tally.cli.target import Api, Subparsers, add_command
from tally_client.v1 import usage_pb2


def _report(args: argparse.Namespace, api: Api) -> int:
    request = usage_pb2.GetUsageReportRequest(
        account_id=args.account_id,
        group_by=[g.strip().upper() if not g.strip().lower().startswith("label:")
                  else "LABEL:" + g.strip()[6:] for g in args.by.split(",") if g.strip()],
        period=args.period,
    )
    arguments.copy_time_range(args, request)
    report = api.usage.GetUsageReport(request, timeout=api.timeout_s).report
    if args.format == "json" or args.json:
        print(output.dumps(output.message_dict(report)))
        return 0
    headers = ["BUCKET", "ACCOUNT", "OPERATION", "LABELS", "QUANTITY", "UNITS", "COUNT"]
    table_rows = [
        [output.iso(r.bucket_start), r.account_id or "-", r.operation or "-",
         output.labels(r.labels), r.quantity, r.units, r.count]
        for r in report.rows
    ]
    if args.format == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow([h.lower() for h in headers])
        writer.writerows(table_rows)
        return 0
    print(output.table(headers, table_rows) if table_rows else "(no usage)")
    _print_summary(report)
    return 0


def _print_summary(report: usage_pb2.UsageReport) -> None:
    """The totals, then the period summary and the forecast when the report has them."""
    print(f"\ntotal: {report.total_units} units, quantity {report.total_quantity}, "
          f"{report.total_count} charges ({output.iso(report.start)} .. {output.iso(report.end)})")
    if report.HasField("period"):
        p = report.period
        print("\n" + output.fields([
            ("period", f"{output.iso(p.period_start)} .. {output.iso(p.period_end)}"),
            ("allotment", p.allotment), ("used", p.used), ("remaining", p.remaining),
            ("purchased", p.purchased), ("overage", p.overage), ("expired", p.expired),
            ("held", p.held),
        ]))
    if report.HasField("forecast"):
        f = report.forecast
        print("\n" + output.fields([
            (f"burn rate ({f.window_days}-day)", f"{f.units_per_day} units/day"),
            ("runs out", output.iso(f.runs_out_at, unset="not this period")),
            ("projected period use", f.projected_period_consumption),
            ("projected overage", f.projected_overage),
        ]))


def register(subparsers: Subparsers) -> None:
    report = add_command(
        subparsers, "report", _report,
        help="usage by operation, label, day or hour; period summary and forecast",
        description="Usage report. The current billing period is exact in real time; "
        "earlier time comes from the ledger. Bounds are whole UTC hours.",
    )
    report.add_argument("account_id", metavar="ACCOUNT_ID", nargs="?", default="",
                        help="omit for every account (from the ledger; needs --from or --period)")
    report.add_argument("--period", default="", metavar="YYYY-MM",
                        help="the account's billing period that starts in that month "
                        "(the calendar month for every account); not with --from/--to")
    arguments.add_time_range(report)
    report.add_argument("--by", default="operation", metavar="KEYS",
                        help="comma-separated: operation, label:<key>, day, hour "
                        "(default: operation)")
    report.add_argument("--format", choices=["table", "csv", "json"], default="table")
