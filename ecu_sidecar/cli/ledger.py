"""The ledger's commands: ``migrate``, ``flush`` (the long-running flusher) and ``report``.

Registered into the ``ecu-sidecar`` command by ecu_sidecar.cli.main.

``flush`` exits 0 when its final drain (at SIGTERM/SIGINT, or ``--once``) finished, after
saying what it left, if anything (entries another flusher took meanwhile, or new ones); 1 when
Redis or the ledger was unavailable, in one line of the configured log format (every entry not
written stays in the outboxes for the next flusher: nothing is lost); 2 for a bad
configuration.
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

from prometheus_client import CollectorRegistry

from ecu_sidecar import eventloop
from ecu_sidecar.errors import StoreUnavailable
from ecu_sidecar.flusher import Flusher
from ecu_sidecar.ledger import LedgerError, open_configured
from ecu_sidecar.metrics import FlusherMetrics, process_metrics, serve_http
from ecu_sidecar.settings import Settings, SettingsError
from ecu_sidecar.store import RedisStore

__all__ = ["add_commands"]

log = logging.getLogger(__name__)

_DIMENSIONS = ("team", "project", "user", "model", "job-type", "job")


def add_commands(sub: Any) -> None:
    """Add migrate, flush and report to the CLI's subparsers."""
    p = sub.add_parser("migrate", help="apply the ledger's schema migrations (ECU_LEDGER_URL)")
    p.set_defaults(run=_migrate)

    p = sub.add_parser(
        "flush", help="run the flusher: outbox streams -> ledger, reconciliation, rebuilds"
    )
    p.add_argument(
        "--once",
        action="store_true",
        help="drain the outboxes once (every pending entry, whoever holds it), rebuild, "
        "reconcile, then exit",
    )
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
    """The flusher until SIGTERM/SIGINT, then a final flush; or one drain (``--once``).

    Exit status: 0 when the drain finished (what it left, arrived meanwhile or taken by
    another flusher, is reported); 1 when it could not, Redis or the ledger being unavailable
    (one line in the configured log format: nothing is lost, every entry not written stays
    in the outboxes for the next flusher); 2 for a bad configuration (ecu_sidecar.cli.main)."""
    try:
        ledger = open_configured(settings)
    except LedgerError as exc:
        log.error("flusher could not start: ledger: %s: %s", type(exc).__name__, exc)
        return 1
    store = RedisStore.from_settings(settings)
    registry = CollectorRegistry()
    process_metrics(registry, "flusher", settings.store_target)
    flusher = Flusher(store, ledger, settings, FlusherMetrics(registry))
    if settings.metrics_listen:
        # /livez: the chart's livenessProbe, failing once no cycle succeeded for
        # ECU_FLUSHER_STALL_TIMEOUT_MS (a stuck flusher answers /metrics all the same).
        serve_http(settings.metrics_listen, registry, {"/livez": flusher.liveness})
    step = "flush --once" if once else "the final flush"
    try:
        if once:
            moved = await flusher.drain()
            await flusher.hydrate_missing()
            drifts = await flusher.reconcile()
            left = await _left(flusher)
            print(
                f"moved {moved} events; reconciled {len(drifts)} organizations, "
                f"{sum(1 for d in drifts.values() if d)} repaired; {left}"
            )
            return 0
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("flusher %s started (ledger %s)", flusher.consumer, ledger.dialect)
        await flusher.run(stop)
        moved = await flusher.drain()
        left = await _left(flusher)
        log.info("flusher stopped after a final flush of %d events; %s", moved, left)
        return 0
    except StoreUnavailable as exc:
        # Unreachable, READONLY (a failover in progress), NOREPLICAS ...: nothing was lost
        # (what was not acknowledged is read again by the next run).
        log.error("%s stopped: Redis unavailable (%s); %s", step, exc.message, _KEPT)
        return 1
    except Exception as exc:  # the ledger down or refusing (driver errors included)
        log.error("%s stopped: ledger failed (%s: %s); %s", step, type(exc).__name__, exc, _KEPT)
        log.debug("%s failure", step, exc_info=True)
        return 1
    finally:
        await store.close()
        ledger.close()


_KEPT = "the events not written stay in the outboxes for the next flusher"


async def _left(flusher: Flusher) -> str:
    """What the outboxes still hold after a drain, in words."""
    left = await flusher.reader.backlog(await flusher.discover(force=True))
    if not left.length:
        return "nothing left in the outboxes"
    return (
        f"left {left.length} events in the outboxes ({left.pending} pending with other "
        "flushers, the rest arrived during the drain)"
    )


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
