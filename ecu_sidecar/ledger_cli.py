"""The ledger's commands: ``migrate``, ``flush`` (the long-running flusher) and ``report``.

Registered into the ``ecu-sidecar`` command by ecu_sidecar.cli.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import logging
import signal
import sys
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

from ecu_sidecar import eventloop
from ecu_sidecar.errors import StoreUnavailable
from ecu_sidecar.flusher import Flusher
from ecu_sidecar.ledger import open_configured
from ecu_sidecar.metrics import FlusherMetrics
from ecu_sidecar.settings import Settings, SettingsError
from ecu_sidecar.store import RedisStore

__all__ = ["add_commands"]

log = logging.getLogger(__name__)

_DIMENSIONS = ("team", "project", "user", "model", "job-type")


def add_commands(sub: Any) -> None:
    """Add migrate, flush and report to the CLI's subparsers."""
    p = sub.add_parser("migrate", help="apply the ledger's schema migrations (ECU_LEDGER_URL)")
    p.set_defaults(run=_migrate)

    p = sub.add_parser(
        "flush", help="run the flusher: outbox streams -> ledger, reconciliation, rebuilds"
    )
    p.add_argument("--once", action="store_true", help="drain the outboxes once, then exit")
    p.set_defaults(run=_flush)

    p = sub.add_parser("report", help="consumption report from the ledger")
    p.add_argument("--org", required=True, help="the organization")
    p.add_argument("--by", choices=_DIMENSIONS, help="group by this dimension")
    p.add_argument("--period", choices=("day", "month"), default="day")
    p.add_argument("--from", dest="start", help="first day (YYYY-MM-DD, UTC), inclusive")
    p.add_argument("--to", dest="end", help="last day (YYYY-MM-DD, UTC), exclusive")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    p.add_argument("--top", type=int, default=5, help="top consumers to list (with --by)")
    p.set_defaults(run=_report)


def _require_ledger(settings: Settings) -> None:
    if not settings.ledger_url:
        raise SettingsError("ECU_LEDGER_URL: not set (postgresql://... or sqlite:///path)")


def _migrate(args: argparse.Namespace, defaults: Any) -> int:
    settings = defaults.get()
    _require_ledger(settings)
    ledger = open_configured(settings, check=False)
    try:
        applied = ledger.migrate()
        print(
            f"schema at version {ledger.schema_version()}"
            + (f" (applied {', '.join(map(str, applied))})" if applied else " (up to date)")
        )
    finally:
        ledger.close()
    return 0


def _flush(args: argparse.Namespace, defaults: Any) -> int:
    settings = defaults.get()
    _require_ledger(settings)
    return eventloop.run(_run_flusher(settings, once=args.once), settings)


async def _run_flusher(settings: Settings, *, once: bool) -> int:
    ledger = open_configured(settings)
    store = RedisStore.from_settings(settings)
    registry = CollectorRegistry()
    if settings.metrics_listen:
        host, _, port = settings.metrics_listen.rpartition(":")
        start_http_server(int(port), addr=host.strip("[]"), registry=registry)
    flusher = Flusher(store, ledger, settings, FlusherMetrics(registry))
    try:
        if once:
            try:
                moved = await flusher.drain()
                await flusher.hydrate_missing()
                drifts = await flusher.reconcile()
            except StoreUnavailable as exc:
                # Unreachable, READONLY (a failover in progress), NOREPLICAS ...: nothing was
                # lost (what was not acknowledged is read again by the next run); one line,
                # exit 1, for the operator or the job to retry.
                print(f"error: Redis unavailable: {exc.message}", file=sys.stderr)
                return 1
            print(
                f"moved {moved} events; reconciled {len(drifts)} organizations, "
                f"{sum(1 for d in drifts.values() if d)} repaired"
            )
            return 0
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("flusher %s started (ledger %s)", flusher.consumer, ledger.dialect)
        await flusher.run(stop)
        moved = await flusher.drain()
        log.info("flusher stopped after a final flush of %d events", moved)
        return 0
    finally:
        await store.close()
        ledger.close()


def _day_ms(text: str | None, name: str) -> int | None:
    if text is None:
        return None
    try:
        day = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        raise SettingsError(f"--{name}: expected YYYY-MM-DD, got {text!r}") from None
    return int(day.timestamp() * 1000)


def _iso(ms: int | None) -> str:
    if ms is None:
        return "never (no consumption in the window)"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _report(args: argparse.Namespace, defaults: Any) -> int:
    settings = defaults.get()
    _require_ledger(settings)
    ledger = open_configured(settings)
    try:
        start, end = _day_ms(args.start, "from"), _day_ms(args.end, "to")
        rows = ledger.consumption(
            args.org, by=args.by, period=args.period, start_ms=start, end_ms=end
        )
        top = (
            ledger.top_consumers(args.org, by=args.by, limit=args.top, start_ms=start, end_ms=end)
            if args.by
            else []
        )
        forecast = ledger.forecast(args.org)
    finally:
        ledger.close()
    period_fmt = "%Y-%m-%d" if args.period == "day" else "%Y-%m"
    table = [
        {
            "period": datetime.fromtimestamp(r.period_start_ms / 1000, UTC).strftime(period_fmt),
            **({args.by: r.key} if args.by else {}),
            "amount_uecu": r.amount_uecu,
            "tokens_in": r.tokens_in,
            "tokens_out": r.tokens_out,
            "calls": r.calls,
            "commits": r.events,
        }
        for r in rows
    ]
    summary = {
        "organization": args.org,
        "balance_uecu": forecast.balance_uecu,
        "daily_rate_uecu": forecast.daily_rate_uecu,
        "runs_out_at": _iso(forecast.runs_out_at_ms),
    }
    if args.format == "json":
        print(
            json.dumps(
                {
                    **summary,
                    "consumption": table,
                    "top_consumers": [
                        {"key": t.key, "amount_uecu": t.amount_uecu, "commits": t.events}
                        for t in top
                    ],
                },
                indent=2,
            )
        )
        return 0
    if args.format == "csv":
        out = io.StringIO()
        columns = list(table[0]) if table else ["period", "amount_uecu"]
        writer = csv.DictWriter(out, fieldnames=columns)
        writer.writeheader()
        writer.writerows(table)
        sys.stdout.write(out.getvalue())
        return 0
    print(
        f"organization {args.org}: balance {forecast.balance_uecu} uECU, "
        f"trailing rate {forecast.daily_rate_uecu} uECU/day, runs out {summary['runs_out_at']}"
    )
    if table:
        columns = list(table[0])
        widths = [max(len(c), *(len(str(r[c])) for r in table)) for c in columns]
        print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
        for r in table:
            print(
                "  ".join(
                    str(r[c]).rjust(w) if isinstance(r[c], int) else str(r[c]).ljust(w)
                    for c, w in zip(columns, widths, strict=True)
                )
            )
    else:
        print("no consumption in the range")
    if top:
        print(f"top {args.by}s: " + ", ".join(f"{t.key or '(none)'} {t.amount_uecu}" for t in top))
    return 0
