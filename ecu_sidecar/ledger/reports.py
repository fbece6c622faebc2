"""Reports: the conservation query, billed usage per period and per key, top consumers, and
when a balance runs out (docs/ledger.md, "Reports")."""

from __future__ import annotations

from typing import Any

from ecu_sidecar.ledger.backends import Tx
from ecu_sidecar.ledger.db import Database, check_int, check_limit
from ecu_sidecar.ledger.types import (
    Conservation,
    ConsumerRow,
    ConsumptionRow,
    Forecast,
    LedgerArgumentError,
)

__all__ = ["CONSERVATION_SQL", "DAY_MS", "REPORT_DIMENSIONS", "Reports"]

DAY_MS = 86_400_000
#: Report dimension -> usage_entries column (a closed list: never interpolate caller text).
REPORT_DIMENSIONS = {
    "team": "team",
    "project": "project",
    "user": "user_id",
    "model": "model",
    "job_type": "job_type",
    "job": "job_id",
}
_PERIODS = ("day", "month")
#: The conservation query (docs/ledger.md): running totals against the sums of the
#: entries they total, and the balance identity, for one organization, in one statement.
CONSERVATION_SQL = """
    WITH t AS (
        SELECT o.granted_uecu AS granted,
               o.expired_grants_uecu AS expired,
               o.committed_uecu AS committed,
               o.balance_uecu AS balance,
               (SELECT COALESCE(SUM(g.amount_uecu), 0) FROM grants g
                 WHERE g.org_id = o.org_id AND g.state = 'confirmed') AS grants_sum,
               (SELECT COALESCE(SUM(x.amount_uecu), 0) FROM grant_expiries x
                 WHERE x.org_id = o.org_id) AS expiries_sum,
               (SELECT COALESCE(SUM(u.amount_uecu), 0) FROM usage_entries u
                 WHERE u.org_id = o.org_id) AS usage_sum
          FROM organizations o
         WHERE o.org_id = ?
    )
    SELECT granted, expired, committed, balance, grants_sum, expiries_sum, usage_sum,
           (granted - expired) - (committed + balance) AS balance_difference,
           usage_sum - committed AS usage_difference,
           grants_sum - granted AS grants_difference,
           expiries_sum - expired AS expiries_difference,
           CASE WHEN granted - expired = committed + balance
                     AND usage_sum = committed
                     AND grants_sum = granted
                     AND expiries_sum = expired
                THEN 1 ELSE 0 END AS ok
      FROM t
"""


class Reports:
    """Read-only reports over the recorded events."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def conservation(self, org: str) -> Conservation | None:
        """Run the conservation query for one organization; None when unknown."""
        rows = self._db.read(lambda tx: tx.rows(CONSERVATION_SQL, (org,)))
        if not rows:
            return None
        v = [int(x) for x in rows[0]]
        return Conservation(org, *v[:11], ok=bool(v[11]))

    def consumption(
        self,
        org: str,
        *,
        by: str | None = None,
        period: str = "day",
        start_ms: int | None = None,
        end_ms: int | None = None,
    ) -> list[ConsumptionRow]:
        """Billed usage per UTC day or month (and per key of ``by``), oldest first.

        ``by``: None, 'team', 'project', 'user', 'model', 'job_type' ('job-type' too) or 'job'
        (the approved job a step drew from; '' for wallet holds).
        The range is ``start_ms <= occurred_at < end_ms`` (either side open when None).
        """
        column = _dimension(by) if by is not None else None
        if period not in _PERIODS:
            raise LedgerArgumentError(f"period: expected day or month, got {period!r}")
        bucket = (
            f"(occurred_at_ms / {DAY_MS}) * {DAY_MS}"
            if period == "day"
            else self._db.backend.month_start_ms("occurred_at_ms")
        )
        where, params = _range(org, start_ms, end_ms)
        key = f", {column}" if column else ""
        rows = self._db.read(
            lambda tx: tx.rows(
                f"SELECT {bucket} AS period_start{key}, SUM(amount_uecu), SUM(tokens_in), "
                f"SUM(tokens_out), SUM(calls), COUNT(*) FROM usage_entries {where} "
                f"GROUP BY 1{', 2' if column else ''} ORDER BY 1{', 2' if column else ''}",
                params,
            )
        )
        out = []
        for r in rows:
            if column:
                out.append(ConsumptionRow(int(r[0]), r[1], *(int(x) for x in r[2:])))
            else:
                out.append(ConsumptionRow(int(r[0]), "", *(int(x) for x in r[1:])))
        return out

    def top_consumers(
        self,
        org: str,
        *,
        by: str,
        limit: int = 10,
        start_ms: int | None = None,
        end_ms: int | None = None,
    ) -> list[ConsumerRow]:
        """The keys of ``by`` that were billed the most in the range, largest first."""
        column = _dimension(by)
        where, params = _range(org, start_ms, end_ms)
        rows = self._db.read(
            lambda tx: tx.rows(
                f"SELECT {column}, SUM(amount_uecu) AS amount, SUM(tokens_in), SUM(tokens_out), "
                f"SUM(calls), COUNT(*) FROM usage_entries {where} GROUP BY {column} "
                f"ORDER BY amount DESC, {column} LIMIT ?",
                [*params, check_limit(limit)],
            )
        )
        return [ConsumerRow(r[0], *(int(x) for x in r[1:])) for r in rows]

    def forecast(self, org: str, *, trailing_days: int = 7, now_ms: int | None = None) -> Forecast:
        """When the ledger balance runs out at the billed rate of the trailing days.

        daily rate = billed in [now − days, now) // days; runs out at
        now + balance × day // rate (integer arithmetic).
        """
        check_int("trailing_days", trailing_days, low=1)
        now = self._db.clock() if now_ms is None else now_ms
        start = now - trailing_days * DAY_MS

        def run(tx: Tx) -> tuple[int, int]:
            bal = tx.rows("SELECT balance_uecu FROM organizations WHERE org_id = ?", (org,))
            used = tx.rows(
                "SELECT COALESCE(SUM(amount_uecu), 0) FROM usage_entries "
                "WHERE org_id = ? AND occurred_at_ms >= ? AND occurred_at_ms < ?",
                (org, start, now),
            )[0][0]
            return (bal[0][0] if bal else 0), int(used)

        balance, used = self._db.read(run)
        rate = used // trailing_days
        if balance <= 0:
            runs_out: int | None = now
        elif rate == 0:
            runs_out = None
        else:
            runs_out = now + balance * DAY_MS // rate
        return Forecast(balance, rate, runs_out, start, now)


def _dimension(by: str) -> str:
    column = REPORT_DIMENSIONS.get(by.replace("-", "_") if isinstance(by, str) else by)
    if column is None:
        raise LedgerArgumentError(f"by: expected one of {', '.join(REPORT_DIMENSIONS)}, got {by!r}")
    return column


def _range(org: str, start_ms: int | None, end_ms: int | None) -> tuple[str, list[Any]]:
    where, params = "WHERE org_id = ?", [org]
    if start_ms is not None:
        check_int("start_ms", start_ms)
        where += " AND occurred_at_ms >= ?"
        params.append(start_ms)
    if end_ms is not None:
        check_int("end_ms", end_ms)
        where += " AND occurred_at_ms < ?"
        params.append(end_ms)
    return where, params
