"""What callers record directly, not through the outbox: ledger-first grants (and their
voiding when Redis refused them), notifications, auto-top-up settings and reconciliation
snapshots; and their reads."""

from __future__ import annotations

from ecu_sidecar.ledger.backends import Tx
from ecu_sidecar.ledger.db import Database, check_id, check_int, check_limit, ensure_org
from ecu_sidecar.ledger.events import MAX_VALUE
from ecu_sidecar.ledger.handlers import insert_notification, set_auto_topup
from ecu_sidecar.ledger.types import (
    AutoTopup,
    GrantConflict,
    GrantExpired,
    GrantLimit,
    GrantStatus,
    LedgerArgumentError,
    Notification,
    NotificationKind,
    Snapshot,
)
from ecu_sidecar.model import GrantKind
from ecu_sidecar.validation import CALLER_ID_MAX, SCOPE_ID_MAX

__all__ = ["Records"]


class Records:
    """Direct writes of grants, notifications, auto-top-up and snapshots, and their reads."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def grant(
        self,
        org: str,
        grant_id: str,
        amount_uecu: int,
        kind: GrantKind | str,
        expires_at_ms: int | None = None,
        *,
        at_ms: int | None = None,
        now_ms: int | None = None,
        limit_uecu: int | None = None,
    ) -> bool:
        """Record a grant durably, as *pending*, before Redis sees it (the ledger-first path).

        A pending grant is not counted anywhere (totals, conservation, burn order, rebuild):
        its grant event, arriving from the outbox once Redis applied it, confirms it and counts
        it; ``void_grant`` marks it void when Redis refused it. Returns True when recorded now
        (or a void grant is pending again: Redis decides again), False when the same grant was
        already recorded pending or confirmed (a replay). The same id with another amount, kind
        or expiry raises GrantConflict. ``expires_at_ms`` None or 0: never expires.

        What Redis would refuse is refused here first, recording nothing, for a grant not
        recorded yet (or void): never for a replay, which Redis answers with its original
        outcome. ``now_ms``: raise GrantExpired when the expiry is not after it (pass Redis's
        clock). ``limit_uecu``: raise GrantLimit when the organization's confirmed grants plus
        its pending ones plus this one would exceed it (the limit Redis enforces on its
        granted total), checked under the organization's row lock.
        """
        check_id("org", org, SCOPE_ID_MAX)
        check_id("grant_id", grant_id, CALLER_ID_MAX)
        check_int("amount_uecu", amount_uecu, low=1)
        kind = str(kind)
        if kind not in {k.value for k in GrantKind}:
            raise LedgerArgumentError(f"kind: expected one of {[k.value for k in GrantKind]}")
        if expires_at_ms is not None:
            check_int("expires_at_ms", expires_at_ms)
        if limit_uecu is not None:
            check_int("limit_uecu", limit_uecu)
        if now_ms is not None:
            check_int("now_ms", now_ms)
        expires = expires_at_ms or None
        at = self._db.clock() if at_ms is None else at_ms

        def run(tx: Tx) -> bool:
            ensure_org(tx, org, at)
            if not tx.rows(
                "INSERT INTO grants (org_id, grant_id, kind, amount_uecu, granted_at_ms, "
                "expires_at_ms, source, state) VALUES (?, ?, ?, ?, ?, ?, 'ledger', 'pending') "
                "ON CONFLICT (org_id, grant_id) DO NOTHING RETURNING grant_id",
                (org, grant_id, kind, amount_uecu, at, expires),
            ):
                amount, stored_kind, stored_expires, state = tx.rows(
                    "SELECT amount_uecu, kind, expires_at_ms, state FROM grants "
                    "WHERE org_id = ? AND grant_id = ?",
                    (org, grant_id),
                )[0]
                if (amount, stored_kind, stored_expires) != (amount_uecu, kind, expires):
                    raise GrantConflict(
                        f"grant_id {grant_id} of {org} was already recorded with amount "
                        f"{amount}, kind {stored_kind}, expires_at_ms {stored_expires or 0}",
                        grant_id=grant_id,
                    )
                if state != GrantStatus.VOID:
                    return False
                # Redis refused it before; the caller asks again: pending until Redis answers.
                tx.run(
                    "UPDATE grants SET state = 'pending', granted_at_ms = ? "
                    "WHERE org_id = ? AND grant_id = ? AND state = 'void'",
                    (at, org, grant_id),
                )
            # Raising rolls the transaction back: nothing of this grant is written.
            if now_ms is not None and expires is not None and expires <= now_ms:
                raise GrantExpired(
                    # Redis's words (grant.lua): the caller sees one error whoever refused.
                    f"grant {grant_id} expires at {expires} ms, which is not after now ({now_ms})",
                    expires_at=expires,
                )
            if limit_uecu is not None:
                _check_grant_limit(tx, org, limit_uecu)
            return True

        return self._db.write(run)

    def void_grant(self, org: str, grant_id: str) -> bool:
        """Mark a pending ledger-first grant void: Redis refused it (expired, balance limit,
        grant id used with other parameters), so it never counts. True when it was pending;
        False for a confirmed grant (Redis applied it: it stays), a void one, or an unknown id.
        A grant event arriving later for a void grant still confirms it (Redis is the truth
        of what was applied)."""
        check_id("org", org, SCOPE_ID_MAX)
        check_id("grant_id", grant_id, CALLER_ID_MAX)
        return bool(
            self._db.write(
                lambda tx: tx.run(
                    "UPDATE grants SET state = 'void' "
                    "WHERE org_id = ? AND grant_id = ? AND state = 'pending'",
                    (org, grant_id),
                )
            )
        )

    def record_snapshot(
        self,
        org: str,
        ledger_balance_uecu: int,
        redis_balance_uecu: int,
        *,
        at_ms: int | None = None,
    ) -> None:
        """Record one reconciliation measurement (drift = redis − ledger)."""
        check_id("org", org, SCOPE_ID_MAX)
        check_int("ledger_balance_uecu", ledger_balance_uecu, low=-MAX_VALUE)
        check_int("redis_balance_uecu", redis_balance_uecu, low=-MAX_VALUE)
        at = self._db.clock() if at_ms is None else at_ms

        def run(tx: Tx) -> None:
            ensure_org(tx, org, at)
            tx.run(
                "INSERT INTO balance_snapshots (org_id, taken_at_ms, ledger_balance_uecu, "
                "redis_balance_uecu, drift_uecu) VALUES (?, ?, ?, ?, ?)",
                (
                    org,
                    at,
                    ledger_balance_uecu,
                    redis_balance_uecu,
                    redis_balance_uecu - ledger_balance_uecu,
                ),
            )

        self._db.write(run)

    def prune_snapshots(self, older_than_ms: int, *, limit: int) -> int:
        """Delete balance snapshots taken more than ``older_than_ms`` ago (the ledger's clock),
        at most ``limit`` of them, oldest written first: among the ``limit`` first rows in
        insertion order, so that the statement reads no more than that through the primary
        key. Returns how many went."""
        check_int("older_than_ms", older_than_ms, low=0)
        cutoff = self._db.clock() - older_than_ms
        return self._db.write(
            lambda tx: tx.run(
                "DELETE FROM balance_snapshots WHERE id IN "
                "(SELECT id FROM balance_snapshots ORDER BY id LIMIT ?) AND taken_at_ms < ?",
                (check_limit(limit), cutoff),
            )
        )

    def snapshots(self, org: str, *, limit: int = 100) -> list[Snapshot]:
        """The latest snapshots of an organization, newest first."""
        rows = self._db.read(
            lambda tx: tx.rows(
                "SELECT taken_at_ms, ledger_balance_uecu, redis_balance_uecu "
                "FROM balance_snapshots WHERE org_id = ? ORDER BY taken_at_ms DESC, id DESC "
                "LIMIT ?",
                (org, check_limit(limit)),
            )
        )
        return [Snapshot(org, r[0], r[1], r[2]) for r in rows]

    def add_notification(
        self,
        org: str,
        kind: NotificationKind | str,
        crossing_id: str | int,
        *,
        available_uecu: int,
        threshold_uecu: int | None = None,
        reference_uecu: int | None = None,
        topup_amount_uecu: int | None = None,
        at_ms: int | None = None,
    ) -> bool:
        """Write a notification once per (organization, kind, crossing id); True when new.

        The outbox's notify events land in the same table, with the event's ``generation``
        (or, without one, its event id) as the crossing id.
        """
        check_id("org", org, SCOPE_ID_MAX)
        kind = str(kind)
        if kind not in {k.value for k in NotificationKind}:
            raise LedgerArgumentError(
                f"kind: expected one of {[k.value for k in NotificationKind]}, got {kind!r}"
            )
        crossing = str(crossing_id)
        if not crossing or len(crossing) > 256:
            raise LedgerArgumentError("crossing_id: expected 1-256 characters")
        check_int("available_uecu", available_uecu, low=-MAX_VALUE)
        at = self._db.clock() if at_ms is None else at_ms

        def run(tx: Tx) -> bool:
            ensure_org(tx, org, at)
            return insert_notification(
                tx,
                org,
                kind,
                crossing,
                available_uecu,
                threshold_uecu,
                reference_uecu,
                topup_amount_uecu,
                at,
                None,
            )

        return self._db.write(run)

    def notifications(
        self, org: str, *, since_ms: int | None = None, limit: int = 1000
    ) -> list[Notification]:
        """An organization's notifications, oldest first."""
        rows = self._db.read(
            lambda tx: tx.rows(
                "SELECT kind, crossing_id, available_uecu, threshold_uecu, reference_uecu, "
                "topup_amount_uecu, created_at_ms, event_id FROM notifications "
                "WHERE org_id = ? AND created_at_ms >= ? "
                "ORDER BY created_at_ms, kind, crossing_id LIMIT ?",
                (org, since_ms if since_ms is not None else -MAX_VALUE, check_limit(limit)),
            )
        )
        return [Notification(org, *r) for r in rows]

    def set_auto_topup(
        self, org: str, threshold_uecu: int | None, amount_uecu: int | None = None
    ) -> None:
        """Set an organization's auto-top-up (threshold and amount), or clear it with None."""
        check_id("org", org, SCOPE_ID_MAX)
        if threshold_uecu is None:
            values: tuple[int | None, int | None] = (None, None)
        else:
            check_int("threshold_uecu", threshold_uecu, low=1)
            if amount_uecu is None:
                raise LedgerArgumentError("amount_uecu: required with a threshold")
            check_int("amount_uecu", amount_uecu, low=1)
            values = (threshold_uecu, amount_uecu)
        at = self._db.clock()

        def run(tx: Tx) -> None:
            ensure_org(tx, org, at)
            set_auto_topup(tx, org, *values, at, 0, "")

        self._db.write(run)

    def auto_topup(self, org: str) -> AutoTopup | None:
        """An organization's auto-top-up setting, or None."""
        rows = self._db.read(
            lambda tx: tx.rows(
                "SELECT auto_topup_threshold_uecu, auto_topup_amount_uecu FROM organizations "
                "WHERE org_id = ?",
                (org,),
            )
        )
        if not rows or rows[0][0] is None:
            return None
        return AutoTopup(rows[0][0], rows[0][1])


def _check_grant_limit(tx: Tx, org: str, limit: int) -> None:
    """Raise GrantLimit (the transaction rolls back) when the organization's confirmed grants
    plus its pending ones (this one included) exceed ``limit``. The organization's row is
    locked first, so concurrent ledger-first grants of one organization are checked one after
    the other (a grants row, then the organization's: the order every writer takes)."""
    tx.run("UPDATE organizations SET granted_uecu = granted_uecu WHERE org_id = ?", (org,))
    total = tx.rows(
        "SELECT o.granted_uecu + (SELECT COALESCE(SUM(g.amount_uecu), 0) FROM grants g "
        "WHERE g.org_id = o.org_id AND g.state = 'pending') FROM organizations o "
        "WHERE o.org_id = ?",
        (org,),
    )[0][0]
    if int(total) > limit:
        raise GrantLimit(
            # Redis's words (grant.lua): the caller sees one error whoever refused.
            f"grant would take organization {org} past the {limit} uECU total an account may "
            "be granted",
            limit=limit,
        )
