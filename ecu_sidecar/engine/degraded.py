"""Opt-in degraded mode: a bounded local allowance while Redis is unreachable, replayed later.

The default is fail-closed: with Redis down every call answers UNAVAILABLE. With
ECU_DEGRADED_ALLOWANCE_UECU > 0 a sidecar may instead *grant locally*, per organization, at
most that many µECU of holds while Redis is unreachable — the explicit, configured bound of
overspend per sidecar and organization. A local commit is bounded like any commit of a hold:
it bills at most the hold plus its overage bound (ECU_OVERAGE_MAX_PERCENT), the rest is
recorded unbilled. Every local decision goes to the journal (ecu_sidecar.engine.journal),
fsynced before it is answered.

When Redis answers again, the journal is replayed oldest first (``DegradedMode.replay``),
each entry on its own:

- a local hold that was committed → the commit script with the local hold as its known hold
  (kind ``degraded``): it settles the real hold if the reserve reached Redis after all (it
  timed out but ran), otherwise it bills min(actual, hold + bound) flagged orphan, under the
  event id ``commit:<rid>:<t0>`` (t0: when the local hold was granted), which the ledger
  deduplicates;
- a local hold that was released → a release in Redis (settles a reserve that landed; a hold
  Redis never had is nothing to settle);
- a local hold still open → reserved in Redis with the original request's parameters, so a
  reserve that had landed answers as a replay (if Redis cannot cover it, it stays local until
  its commit or release is replayed, or its deadline passes: then it expired, nothing to bill);
- a commit of a hold that lives in Redis (made before the outage) → the normal commit script.

An entry Redis cannot take now (StoreUnavailable) stays for the next pass; an entry Redis
definitely refuses (the id exists there with other parameters, the hold was settled the other
way) is marked **failed**: logged, counted (``ecu_degraded_replay_failures_total``) and kept in
the journal for the operator, never replayed again. Neither blocks any other entry. Replays are
idempotent (reservation ids, event ids), so a crash during replay only repeats work.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace

from ecu_sidecar.engine.hydrator import Hydrator
from ecu_sidecar.engine.journal import Journal, LocalHold, RemoteCommit
from ecu_sidecar.errors import (
    AccountNotFound,
    EcuError,
    HoldCommitted,
    HoldNotFound,
    HoldReleased,
    IdempotencyConflict,
    InsufficientEcu,
    RateCardMismatch,
    StoreUnavailable,
)
from ecu_sidecar.model import (
    AccountRef,
    CommitBatchOutcome,
    CommitItem,
    CommitOutcome,
    HoldState,
    HoldView,
    JobType,
    KnownHold,
    ReleaseOutcome,
    ReserveItem,
    ReserveOutcome,
    Usage,
)
from ecu_sidecar.settings import Settings
from ecu_sidecar.store import Store

__all__ = ["DegradedMode", "bounded_commit", "now_ms"]

log = logging.getLogger(__name__)


def bounded_commit(amount_uecu: int, actual_uecu: int, overage_max_percent: int) -> int:
    """What a commit of a hold of ``amount_uecu`` bills: min(actual, hold + bound), with
    bound = floor(hold × pct / 100) computed exactly (Python integers)."""
    return min(actual_uecu, amount_uecu + amount_uecu * overage_max_percent // 100)


def now_ms() -> int:
    """The sidecar's own clock (Redis's is unreachable in degraded mode)."""
    return time.time_ns() // 1_000_000


class DegradedMode:
    """Local decisions while Redis is unreachable, journaled; and their replay into Redis."""

    def __init__(
        self, journal: Journal, store: Store, settings: Settings, hydrator: Hydrator
    ) -> None:
        self.journal = journal
        self.store = store
        self.settings = settings
        self.hydrator = hydrator
        """Rebuilds an organization a replay finds missing, and settles commits of holds
        Redis lost by the ledger's record (as any commit is)."""

    def available(self, org: str) -> int:
        """What is left of the organization's local allowance."""
        return self.journal.allowance_uecu - self.journal.used(org)

    def holds_locally(self, org: str, reservation_id: str) -> bool:
        """Whether a local hold of that id waits for its replay."""
        hold = self.journal.holds.get((org, reservation_id))
        return hold is not None and not hold.done

    # -- local decisions ----------------------------------------------------------------------

    def reserve(
        self, account: AccountRef, item: ReserveItem, cause: StoreUnavailable
    ) -> ReserveOutcome:
        """Grant one validated step (its TTL resolved) locally, within the allowance; raises
        StoreUnavailable (``cause``) when the allowance is used up."""
        now = now_ms()
        asked = LocalHold(
            account.organization,
            item.reservation_id,
            item.amount_uecu,
            account.team,
            account.project,
            account.user,
            item.job_type.value,
            item.model,
            now + item.ttl_ms,
            t0_ms=now,
            ttl_ms=item.ttl_ms,
            rate_card_version=item.rate_card_version,
            fingerprint=item.fingerprint,
        )
        hold = self.journal.reserve(asked)
        if hold is None:
            raise StoreUnavailable(
                f"{cause.message}; the degraded allowance of organization "
                f"{account.organization} ({self.journal.allowance_uecu} uECU) is used up"
            )
        log.warning(
            "Redis unreachable: hold %s of %s granted locally (%d uECU)",
            item.reservation_id,
            account.organization,
            item.amount_uecu,
        )
        view = HoldView(
            hold.reservation_id,
            hold.amount_uecu,
            hold.deadline_ms,
            HoldState.ACTIVE,
            item.rate_card_version,
        )
        return ReserveOutcome(
            [view], self.available(account.organization), replayed=hold is not asked, degraded=True
        )

    def commit(self, org: str, items: Sequence[CommitItem]) -> CommitBatchOutcome:
        """Journal each commit: usage is never dropped, even while Redis is down. A local
        hold's commit is bounded as in Redis: it bills min(actual, hold + overage bound) and
        records the rest unbilled; a commit of a hold that lives in Redis is journaled as asked
        (its replay runs the commit script, which bounds it)."""
        journal = self.journal
        pct = self.settings.overage_max_percent
        outs: list[CommitOutcome] = []
        for it in items:
            rid = it.reservation_id
            usage = (it.usage.tokens_in, it.usage.tokens_out, it.usage.calls)
            rcv, lines = it.rate_card_version, it.breakdown
            local = journal.holds.get((org, rid))
            if local is None or local.done:
                journal.remote_commit(org, rid, it.actual_uecu, usage, rcv, lines)
                outs.append(CommitOutcome(rid, committed_uecu=it.actual_uecu, degraded=True))
                continue
            if rcv and local.state == "A" and rcv != local.rate_card_version:
                error: Exception = RateCardMismatch(
                    f"hold {rid} was priced with rate card version '{local.rate_card_version}'; "
                    f"its usage must be priced with that version, not '{rcv}'",
                    reservation_id=rid,
                )
                outs.append(CommitOutcome(rid, error=error, degraded=True))
                continue
            billed = bounded_commit(local.amount_uecu, it.actual_uecu, pct)
            hold, settled = journal.settle(
                org, rid, "commit", it.actual_uecu, usage, billed, rcv, lines
            )
            assert hold is not None
            if not settled and hold.state == "R":
                error = HoldReleased(
                    f"hold {rid} was released; it cannot be committed", reservation_id=rid
                )
                outs.append(CommitOutcome(rid, error=error, degraded=True))
                continue
            if not settled and (hold.actual_uecu, hold.usage) != (it.actual_uecu, usage):
                error = IdempotencyConflict(
                    f"hold {rid} was already committed with actual {hold.actual_uecu} uECU and "
                    "other usage or amount",
                    reservation_id=rid,
                )
                outs.append(CommitOutcome(rid, error=error, degraded=True))
                continue
            amount, billed = hold.amount_uecu, hold.billed_uecu
            outs.append(
                CommitOutcome(
                    rid,
                    committed_uecu=billed,
                    released_uecu=max(0, amount - billed),
                    overage_uecu=max(0, billed - amount),
                    unbilled_overage_uecu=hold.actual_uecu - billed,
                    replayed=not settled,
                    degraded=True,
                )
            )
        available = self.available(org)
        return CommitBatchOutcome([replace(o, available_uecu=available) for o in outs], available)

    def commit_unreplayed(
        self, org: str, items: Sequence[CommitItem], outcome: CommitBatchOutcome
    ) -> CommitBatchOutcome:
        """Commits Redis answered HOLD_NOT_FOUND whose hold was granted locally and is not
        replayed yet: journaled against that hold (its replay bills it)."""
        local = [
            i
            for i, o in enumerate(outcome.outcomes)
            if isinstance(o.error, HoldNotFound)
            and self.holds_locally(org, items[i].reservation_id)
        ]
        if not local:
            return outcome
        journaled = self.commit(org, [items[i] for i in local])
        outs = list(outcome.outcomes)
        for i, o in zip(local, journaled.outcomes, strict=True):
            outs[i] = o
        return replace(outcome, outcomes=outs)

    def release(self, org: str, reservation_id: str) -> ReleaseOutcome | None:
        """Release a local hold not replayed yet; None when there is none (a hold that lives
        in Redis expires there if nobody releases it)."""
        if not self.holds_locally(org, reservation_id):
            return None
        hold, settled = self.journal.settle(org, reservation_id, "release")
        assert hold is not None
        if hold.state == "C":
            raise HoldCommitted(
                f"hold {reservation_id} was committed; it cannot be released",
                reservation_id=reservation_id,
            ) from None
        return ReleaseOutcome(
            reservation_id,
            hold.amount_uecu,
            HoldState.RELEASED,
            self.available(org),
            replayed=not settled,
            degraded=True,
        )

    # -- replay -------------------------------------------------------------------------------

    async def replay(self) -> int:
        """Move what degraded mode decided into Redis, oldest first; returns entries replayed.

        Each entry is tried on its own: one Redis cannot take now (StoreUnavailable) waits for
        the next call, with the rest of its organization's entries (another organization may
        live on a reachable node); one Redis definitely refuses is marked failed in the journal
        (logged, counted, kept for the operator) and the next entries go on."""
        journal = self.journal
        if journal.pending() == 0:
            return 0
        done = 0
        unreachable: set[str] = set()
        for entry in journal.pending_entries():
            if entry.org in unreachable:
                continue
            state = entry.state if isinstance(entry, LocalHold) else ""
            try:
                settled = await self._replay_entry(entry)
            except StoreUnavailable:
                unreachable.add(entry.org)
                continue
            except EcuError as exc:
                log.error(
                    "degraded-mode %s %s of %s refused by Redis (%s: %s); marked failed in the "
                    "journal %s",
                    "hold" if isinstance(entry, LocalHold) else "commit",
                    entry.rid,
                    entry.org,
                    exc.reason,
                    exc.message,
                    journal.path,
                )
                journal.mark_failed(entry, exc.reason, exc.message)
                continue
            except Exception:
                log.exception(
                    "degraded-mode replay of %s of %s failed; retrying next pass",
                    entry.rid,
                    entry.org,
                )
                continue
            if isinstance(entry, LocalHold) and entry.state != state:
                continue  # settled locally meanwhile (Redis went again): replayed next pass
            if settled:
                journal.mark_done(entry)
                done += 1
        return done

    async def _commit(
        self, org: str, items: list[CommitItem], known: dict[str, KnownHold] | None = None
    ) -> CommitBatchOutcome:
        pct = self.settings.overage_max_percent
        store = self.store
        return await self.hydrator.hydrating(
            org, lambda: store.commit(org, items, pct, known=known)
        )

    async def _replay_entry(self, entry: LocalHold | RemoteCommit) -> bool:
        """Replay one journal entry into Redis; False when it stays local (an open hold Redis
        cannot cover yet). Raises what Redis answered (StoreUnavailable: try again later; any
        other EcuError: a definite refusal)."""
        org, rid = entry.org, entry.rid
        has_ledger = self.hydrator.ledger is not None
        if isinstance(entry, RemoteCommit):
            usage = Usage(*entry.usage)
            items = [
                CommitItem(rid, entry.actual_uecu, usage, entry.rate_card_version, entry.breakdown)
            ]
            out = await self._commit(org, items)
            if has_ledger and isinstance(out.outcomes[0].error, HoldNotFound):
                out = await self.hydrator.settle_commits(org, items, out)  # the rule of any commit
            if out.outcomes[0].error is not None:
                raise out.outcomes[0].error
            return True
        hold = entry
        if hold.state == "A":
            return await self._replay_open(hold)
        if hold.state == "R":
            try:
                await self.hydrator.hydrating(org, lambda: self.store.release(org, rid))
            except (HoldNotFound, AccountNotFound):
                pass  # the reserve never reached Redis: nothing is held there
            return True
        # Committed: the commit script settles the real hold if the reserve reached Redis,
        # otherwise bills the local hold (the known hold, kind degraded) under its own event id.
        items = [
            CommitItem(rid, hold.actual_uecu, Usage(*hold.usage), hold.commit_rcv, hold.breakdown)
        ]
        if has_ledger:
            # First as any commit: the real hold, or the ledger's record of it (a landed
            # reserve whose tombstone was purged since: its commit's event id has Redis's t0,
            # which the journal does not know).
            out = await self._commit(org, items)
            if isinstance(out.outcomes[0].error, HoldNotFound):
                out = await self.hydrator.settle_commits(org, items, out)
            if not isinstance(out.outcomes[0].error, HoldNotFound):
                if out.outcomes[0].error is not None:
                    raise out.outcomes[0].error
                return True
        known = {
            rid: KnownHold(
                amount_uecu=hold.amount_uecu,
                t0_ms=hold.t0_ms,
                kind="degraded",
                team=hold.team,
                project=hold.project,
                user=hold.user,
                job_type=hold.job,
                model=hold.model,
            )
        }
        out = await self._commit(org, items, known)
        if out.outcomes[0].error is not None:
            raise out.outcomes[0].error
        return True

    async def _replay_open(self, hold: LocalHold) -> bool:
        """Reserve an open local hold in Redis with the original request's parameters: a
        reserve that reached Redis after all (it timed out but ran) is answered as a replay of
        that real hold. False when Redis cannot cover it yet."""
        org, rid = hold.org, hold.rid
        ttl = hold.ttl_ms
        if not ttl:  # journals written before the TTL was recorded
            ttl = max(self.settings.min_ttl_ms, hold.deadline_ms - now_ms())
            ttl = min(ttl, self.settings.max_ttl_ms)
        acct = AccountRef(org, hold.team, hold.project, hold.user)
        step = ReserveItem(
            rid,
            hold.amount_uecu,
            JobType(hold.job),
            hold.model,
            ttl,
            hold.rate_card_version,
            hold.fingerprint,
        )
        try:
            await self.hydrator.hydrating(org, lambda: self.store.reserve(acct, [step]))
        except InsufficientEcu:
            if hold.deadline_ms <= now_ms():
                log.warning(
                    "degraded-mode hold %s of %s expired before Redis could cover it", rid, org
                )
                return True  # expired locally: nothing is held or billed
            return False  # stays local until its commit or release is replayed
        return True
