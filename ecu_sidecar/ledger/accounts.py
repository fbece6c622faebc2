"""Accounts: what the ledger holds of an organization, as a Redis rebuild takes it
(``ledger_account``, with the burn order replayed by burn.py), as the engine settles an
unknown reservation id from it (``reservation``), and as operators read it (``account``)."""

from __future__ import annotations

import itertools
import json
from typing import Any

from ecu_sidecar.ledger import burn
from ecu_sidecar.ledger.backends import Tx
from ecu_sidecar.ledger.db import Database
from ecu_sidecar.ledger.jobs import ledger_accuracy, ledger_jobs, open_jobs
from ecu_sidecar.ledger.types import (
    AccountState,
    AutoTopup,
    GrantState,
    GrantStatus,
    HoldTotals,
    ScopeState,
)
from ecu_sidecar.model import (
    CommitOutcome,
    KnownHold,
    LedgerAccount,
    LedgerBalance,
    LedgerHold,
    LedgerReservation,
    Usage,
)

__all__ = ["Accounts"]

#: A balance snapshot is due when an organization's last one is older than this (without drift).
SNAPSHOT_EVERY_MS = 86_400_000
#: Organizations one balance read names in its IN list (well under either dialect's bound).
_BALANCE_CHUNK = 500
#: Grants a Redis rebuild receives (so that a retried grant is still recognized as a replay).
_RECENT = 1_000


class Accounts:
    """Reads of an organization's state (each one transaction, one snapshot)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def organizations(self, after: str = "", limit: int | None = None) -> list[str]:
        """The organizations the ledger knows, sorted (for hydration and reconciliation):
        every one, or the first ``limit`` whose id sorts after ``after`` (a page)."""
        sql = "SELECT org_id FROM organizations WHERE org_id > ? ORDER BY org_id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        rows = self._db.read(lambda tx: tx.rows(sql, (after,)))
        return [r[0] for r in rows]

    def open_jobs(self) -> int:
        """How many approved jobs are open across every organization."""
        return self._db.read(open_jobs)

    def balance(self, org: str) -> int:
        """The ledger balance (granted − expired grants − committed); 0 for an unknown org."""
        rows = self._db.read(
            lambda tx: tx.rows("SELECT balance_uecu FROM organizations WHERE org_id = ?", (org,))
        )
        return rows[0][0] if rows else 0

    def balances(self, orgs: list[str]) -> dict[str, LedgerBalance]:
        """What reconciliation compares of each organization in ``orgs`` (one query per
        chunk of them, each a snapshot): the balance ``ledger_account`` reports, whether
        pending ledger-first grants wait, whether a balance snapshot is due (none within
        SNAPSHOT_EVERY_MS by the ledger's clock), and its open jobs (index jobs_open). Unknown
        organizations are absent."""
        out: dict[str, LedgerBalance] = {}
        recent = self._db.clock() - SNAPSHOT_EVERY_MS
        for i in range(0, len(orgs), _BALANCE_CHUNK):
            part = orgs[i : i + _BALANCE_CHUNK]
            sql = (
                "SELECT o.org_id, o.granted_uecu - o.expired_grants_uecu - o.committed_uecu, "
                "EXISTS (SELECT 1 FROM grants g WHERE g.org_id = o.org_id "
                "AND g.state = 'pending'), "
                "NOT EXISTS (SELECT 1 FROM balance_snapshots s WHERE s.org_id = o.org_id "
                "AND s.taken_at_ms >= ?), "
                "(SELECT COUNT(*) FROM jobs j WHERE j.org_id = o.org_id AND j.state = 'open') "
                "FROM organizations o "
                f"WHERE o.org_id IN ({', '.join(['?'] * len(part))})"
            )
            params = [recent, *part]
            rows = self._db.read(lambda tx, sql=sql, params=params: tx.rows(sql, params))
            out.update(
                {r[0]: LedgerBalance(int(r[1]), bool(r[2]), bool(r[3]), int(r[4])) for r in rows}
            )
        return out

    def account(self, org: str) -> AccountState | None:
        """Everything needed to rebuild one organization in Redis; None when unknown."""
        return self._db.read(lambda tx: _account(tx, org))

    def ledger_account(self, org: str) -> LedgerAccount | None:
        """The state a Redis rebuild of ``org`` takes (ecu_sidecar.model.LedgerAccount), or
        None when the ledger does not know the organization.

        The totals count confirmed grants only (Redis applied them). Pending grants (written
        ledger-first, no outbox event yet) are listed in ``unconfirmed_grants``: they reach
        Redis through the grant script (the caller's retry, or the flusher finishing them),
        whose event confirms them. Void grants (Redis refused them) are in neither.
        """

        def run(tx: Tx) -> tuple[AccountState, int, list[LedgerHold], list[Any], list[Any]] | None:
            acct = _account(tx, org)
            if acct is None:
                return None
            # generation counts confirmed grants only, as Redis's gen does
            generation = acct.generation
            holds = _outstanding_holds(tx, org)
            jobs = (ledger_jobs(tx, org, holds), ledger_accuracy(tx, org))
            return acct, generation, holds, _notices(tx, org, generation), jobs

        found = self._db.read(run)
        if found is None:
            return None
        acct, generation, holds, notices, (jobs, accuracy) = found
        pending = [g for g in acct.grants if g.state == GrantStatus.PENDING]
        confirmed = [g for g in acct.grants if g.confirmed]
        latest = sorted(confirmed, key=lambda g: (g.granted_at_ms, g.grant_id))[-_RECENT:]
        references = [ref for _kind, ref in notices if ref is not None]
        return LedgerAccount(
            organization=org,
            granted_uecu=acct.granted_uecu,
            expired_grants_uecu=acct.expired_grants_uecu,
            committed_uecu=acct.committed_uecu,
            generation=generation,
            scopes=[(s.scope, s.scope_id, s.cap_uecu, s.used_uecu) for s in acct.scopes],
            expiring_grants=acct.expiring_grants,
            auto_topup_threshold_uecu=acct.auto_topup.threshold_uecu if acct.auto_topup else None,
            auto_topup_amount_uecu=acct.auto_topup.amount_uecu if acct.auto_topup else 0,
            recent_grants=[
                (g.grant_id, g.amount_uecu, g.kind, g.expires_at_ms or 0) for g in latest
            ],
            unconfirmed_grants=[
                (g.grant_id, g.amount_uecu, g.kind, g.expires_at_ms or 0) for g in pending
            ],
            active_holds=holds,
            jobs=jobs,
            job_accuracy=accuracy,
            notified=sorted({kind for kind, _ref in notices}),
            notice_reference_uecu=references[0] if references else None,
        )

    def reservation(self, org: str, reservation_id: str) -> LedgerReservation | None:
        """What the ledger recorded of a reservation id's latest hold, or None when it never
        saw one (ecu_sidecar.model.LedgerReservation). Its events share the hold's creation
        time t0: reserve:<rid>:<t0>, then commit:, release: or expire:<rid>:<t0>."""

        def run(tx: Tx) -> LedgerReservation | None:
            rows = tx.rows(
                "SELECT event_id, amount_uecu, team, project, user_id, job_type, model "
                "FROM hold_events WHERE org_id = ? AND reservation_id = ? AND kind = 'reserve' "
                "ORDER BY occurred_at_ms DESC, event_id DESC LIMIT 1",
                (org, reservation_id),
            )
            if not rows:
                # A hold degraded mode granted locally reached the ledger only as its commit.
                rows = tx.rows(
                    "SELECT event_id, hold_uecu, team, project, user_id, job_type, model "
                    "FROM usage_entries WHERE org_id = ? AND reservation_id = ? "
                    "ORDER BY occurred_at_ms DESC, event_id DESC LIMIT 1",
                    (org, reservation_id),
                )
            if not rows:
                return None
            event_id, amount, team, project, user, job, model = rows[0]
            t0 = int(event_id.rsplit(":", 1)[1])
            hold = KnownHold(int(amount), t0, "late", team, project, user, job, model)
            tail = f"{reservation_id}:{t0}"
            used = tx.rows(
                "SELECT actual_uecu, tokens_in, tokens_out, calls, amount_uecu, released_uecu, "
                "overage_uecu, unbilled_uecu, late FROM usage_entries "
                "WHERE org_id = ? AND event_id = ?",
                (org, f"commit:{tail}"),
            )
            if used:
                actual, t_in, t_out, calls, billed, released, overage, unbilled, late = used[0]
                outcome = CommitOutcome(
                    reservation_id,
                    committed_uecu=int(billed),
                    released_uecu=int(released),
                    overage_uecu=int(overage),
                    unbilled_overage_uecu=int(unbilled),
                    late=bool(late),
                    replayed=True,
                )
                usage = Usage(int(t_in), int(t_out), int(calls))
                return LedgerReservation(
                    reservation_id, "committed", hold, int(actual), usage, outcome
                )
            ended = tx.rows(
                "SELECT kind FROM hold_events WHERE org_id = ? AND event_id IN (?, ?)",
                (org, f"release:{tail}", f"expire:{tail}"),
            )
            kinds = {k for (k,) in ended}
            state = "released" if "release" in kinds else "expired" if kinds else "active"
            return LedgerReservation(reservation_id, state, hold)

        return self._db.read(run)


def _account(tx: Tx, org: str) -> AccountState | None:
    """An organization's state, read in ``tx``; None when unknown."""
    rows = tx.rows(
        "SELECT created_at_ms, last_event_at_ms, granted_uecu, expired_grants_uecu, "
        "committed_uecu, balance_uecu, auto_topup_threshold_uecu, auto_topup_amount_uecu "
        "FROM organizations WHERE org_id = ?",
        (org,),
    )
    if not rows:
        return None
    created, last, granted, expired, committed, balance, atu_t, atu_a = rows[0]
    grant_rows = tx.rows(
        "SELECT g.grant_id, g.kind, g.amount_uecu, g.granted_at_ms, g.expires_at_ms, "
        "x.amount_uecu, g.state FROM grants g LEFT JOIN grant_expiries x "
        "ON x.org_id = g.org_id AND x.grant_id = g.grant_id "
        "WHERE g.org_id = ? ORDER BY g.granted_at_ms, g.grant_id",
        (org,),
    )
    # Only what Redis applied burns: a pending or void grant never funded a commit.
    confirmed = [r for r in grant_rows if r[6] == GrantStatus.CONFIRMED]
    expiring = [burn.ExpiringGrant(r[0], r[3], r[4], r[2]) for r in confirmed if r[4] is not None]
    bounds = burn.boundaries(expiring)
    sums = [
        int(
            tx.rows(
                "SELECT COALESCE(SUM(amount_uecu), 0) FROM usage_entries "
                "WHERE org_id = ? AND occurred_at_ms >= ? AND occurred_at_ms < ?",
                (org, lo, hi),
            )[0][0]
        )
        for lo, hi in itertools.pairwise(bounds)
    ]
    rests = burn.replay(expiring, bounds, sums)
    grants = [
        GrantState(
            grant_id=r[0],
            kind=r[1],
            amount_uecu=r[2],
            granted_at_ms=r[3],
            expires_at_ms=r[4],
            expired_uecu=r[5],
            remaining_uecu=(
                rests[r[0]]
                if r[4] is not None and r[5] is None and r[6] == GrantStatus.CONFIRMED
                else None
            ),
            state=GrantStatus(r[6]),
        )
        for r in grant_rows
    ]
    scopes: dict[tuple[str, str], list[Any]] = {}
    for scope, sid, cap in tx.rows(
        "SELECT scope, scope_id, cap_uecu FROM caps WHERE org_id = ?", (org,)
    ):
        scopes[(scope, sid)] = [cap, 0]
    for scope, column in (("team", "team"), ("project", "project")):
        for sid, used in tx.rows(
            f"SELECT {column}, SUM(amount_uecu) FROM usage_entries "
            f"WHERE org_id = ? AND {column} <> '' GROUP BY {column}",
            (org,),
        ):
            scopes.setdefault((scope, sid), [None, 0])[1] = int(used)
    # The wallet's hold counters, as Redis keeps them: a job holds its approval (and what its
    # steps drew beyond it) as one hold, its steps move money inside it, and its end returns
    # the rest (released when closed, expired when abandoned). A step bills job_uecu from the
    # job's money (from holds) and the rest of what it billed from the wallet (overage).
    h = tx.rows(
        "SELECT "
        "COALESCE(SUM(CASE WHEN kind <> 'reserve' THEN 0 WHEN job_id = '' THEN amount_uecu "
        "ELSE extra_uecu END), 0), "
        "COALESCE(SUM(CASE WHEN kind = 'release' AND job_id = '' THEN amount_uecu ELSE 0 END), 0), "
        "COALESCE(SUM(CASE WHEN kind = 'expire' AND job_id = '' THEN amount_uecu ELSE 0 END), 0), "
        "COALESCE(SUM(CASE WHEN kind = 'expire' AND job_id = '' THEN 1 ELSE 0 END), 0) "
        "FROM hold_events WHERE org_id = ?",
        (org,),
    )[0]
    j = tx.rows(
        "SELECT COALESCE(SUM(approved_uecu), 0), "
        "COALESCE(SUM(CASE WHEN state = 'closed' THEN returned_uecu ELSE 0 END), 0), "
        "COALESCE(SUM(CASE WHEN state = 'abandoned' THEN returned_uecu ELSE 0 END), 0) "
        "FROM jobs WHERE org_id = ?",
        (org,),
    )[0]
    c = tx.rows(
        "SELECT "
        "COALESCE(SUM(CASE WHEN job_uecu > 0 THEN job_uecu WHEN late THEN 0 "
        "WHEN amount_uecu < hold_uecu THEN amount_uecu ELSE hold_uecu END), 0), "
        "COALESCE(SUM(CASE WHEN job_id = '' THEN released_uecu ELSE 0 END), 0), "
        "COALESCE(SUM(CASE WHEN late AND NOT orphan AND job_uecu = 0 THEN amount_uecu "
        "ELSE 0 END), 0), "
        "COALESCE(SUM(CASE WHEN orphan THEN amount_uecu ELSE 0 END), 0), "
        "COALESCE(SUM(CASE WHEN job_id <> '' AND NOT late THEN amount_uecu - job_uecu "
        "ELSE overage_uecu END), 0), "
        "COALESCE(SUM(unbilled_uecu), 0) "
        "FROM usage_entries WHERE org_id = ?",
        (org,),
    )[0]
    h, c = [int(x) for x in h], [int(x) for x in c]
    h[0] += int(j[0])
    h[1] += int(j[1])
    h[2] += int(j[2])
    return AccountState(
        organization=org,
        granted_uecu=granted,
        expired_grants_uecu=expired,
        committed_uecu=committed,
        balance_uecu=balance,
        generation=len(confirmed),
        grants=grants,
        scopes=[
            ScopeState(scope, sid, cap, used)
            for (scope, sid), (cap, used) in sorted(scopes.items())
        ],
        holds=HoldTotals(
            reserved_uecu=h[0],
            committed_from_holds_uecu=c[0],
            released_uecu=h[1] + c[1],
            expired_uecu=h[2],
            expired_holds=h[3],
            late_committed_uecu=c[2],
            orphan_committed_uecu=c[3],
            overage_uecu=c[4],
            unbilled_uecu=c[5],
        ),
        auto_topup=AutoTopup(atu_t, atu_a) if atu_t is not None else None,
        created_at_ms=created,
        last_event_at_ms=last,
    )


#: Holds the ledger records as outstanding: a reserve event with no release, expiry or commit
#: of the same reservation id and creation time. Every later event id of a hold is its kind,
#: then what follows 'reserve:' in its reserve event id ('<rid>:<t0>'), so each check is one
#: primary-key lookup; an extend adds ':<sequence>'. The reserve event's payload carries the
#: rate card version the hold was priced with.
_OUTSTANDING_HOLDS_SQL = """
    SELECT r.reservation_id, r.event_id, r.occurred_at_ms, r.amount_uecu, r.deadline_ms,
           r.team, r.project, r.user_id, r.job_type, r.model,
           (SELECT MAX(x.deadline_ms) FROM hold_events x
             WHERE x.org_id = r.org_id AND x.reservation_id = r.reservation_id
               AND x.kind = 'extend'
               AND substr(x.event_id, 1, length(r.event_id))
                   = 'extend:' || substr(r.event_id, 9) || ':'),
           (SELECT MAX(x.sequence) FROM hold_events x
             WHERE x.org_id = r.org_id AND x.reservation_id = r.reservation_id
               AND x.kind = 'extend'
               AND substr(x.event_id, 1, length(r.event_id))
                   = 'extend:' || substr(r.event_id, 9) || ':'),
           CAST(e.payload AS TEXT)
      FROM hold_events r
      JOIN events e ON e.org_id = r.org_id AND e.event_id = r.event_id
     WHERE r.org_id = ? AND r.kind = 'reserve'
       AND NOT EXISTS (
           SELECT 1 FROM hold_events t
            WHERE t.org_id = r.org_id
              AND t.event_id IN ('release:' || substr(r.event_id, 9),
                                 'expire:' || substr(r.event_id, 9)))
       AND NOT EXISTS (
           SELECT 1 FROM usage_entries u
            WHERE u.org_id = r.org_id AND u.event_id = 'commit:' || substr(r.event_id, 9))
     ORDER BY r.occurred_at_ms, r.event_id
"""


def _outstanding_holds(tx: Tx, org: str) -> list[LedgerHold]:
    """What a rebuild restores as ACTIVE holds (at most one per reservation id: the newest)."""
    found: dict[str, LedgerHold] = {}
    for row in tx.rows(_OUTSTANDING_HOLDS_SQL, (org,)):
        rid, eid, at, amount, deadline, team, project, user, job, model = row[:10]
        ext_deadline, ext_sequence, payload = row[10:]
        # t0 ends the reserve event id the scripts write; the event's time is the same.
        tail = eid.rsplit(":", 1)[-1]
        t0 = int(tail) if tail.isdigit() and len(tail) < 16 else int(at)
        fields = json.loads(payload) if payload else {}
        found.pop(rid, None)  # a newer hold of a reused id replaces the older, in time order
        found[rid] = LedgerHold(
            reservation_id=rid,
            amount_uecu=int(amount),
            t0_ms=t0,
            deadline_ms=max(int(deadline), int(ext_deadline or 0)),
            ttl_ms=max(0, int(deadline) - t0),
            sequence=int(ext_sequence or 0),
            team=team,
            project=project,
            user=user,
            job_type=job,
            model=model,
            rate_card_version=str(fields.get("rcv") or ""),
            job_id=str(fields.get("job_id") or ""),
        )
    return list(found.values())


def _notices(tx: Tx, org: str, generation: int) -> list[tuple[str, int | None]]:
    """(kind, reference) of the notifications recorded for this generation (the crossing id
    the outbox's notify events carry)."""
    return [
        (kind, ref)
        for kind, ref in tx.rows(
            "SELECT kind, reference_uecu FROM notifications "
            "WHERE org_id = ? AND crossing_id = ? ORDER BY kind",
            (org, str(generation)),
        )
    ]
