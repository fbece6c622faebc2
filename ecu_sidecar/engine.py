"""The reservation engine: validates every request, then makes exactly one store call.

The engine is what the gRPC service and the CLI call; it knows nothing of gRPC or Redis.
It also remembers which organizations it has seen recently, so the background sweeper can
expire their overdue holds even when no request touches them again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any, Protocol, TypeVar

from ecu_sidecar.degraded import Journal, LocalHold, RemoteCommit, bounded_commit
from ecu_sidecar.degraded import now_ms as degraded_now_ms
from ecu_sidecar.errors import (
    AccountNotFound,
    BalanceLimit,
    EcuError,
    GrantAlreadyExpired,
    HoldCommitted,
    HoldNotFound,
    HoldReleased,
    IdempotencyConflict,
    InsufficientEcu,
    InvalidArgument,
    OrganizationNotAllowed,
    RateCardMismatch,
    Rebuilding,
    ReplicationUnconfirmed,
    StoreUnavailable,
)
from ecu_sidecar.ledger.types import LedgerUnavailable
from ecu_sidecar.model import (
    MAX_GRANTED_UECU,
    MAX_REQUEST_UECU,
    AccountRef,
    Balance,
    CommitBatchOutcome,
    CommitItem,
    CommitOutcome,
    ExtendOutcome,
    GrantKind,
    GrantOutcome,
    HoldState,
    HoldView,
    JobType,
    KnownHold,
    LedgerAccount,
    LedgerReservation,
    ReleaseOutcome,
    ReserveItem,
    ReserveOutcome,
    ScopeUsage,
    Usage,
)
from ecu_sidecar.pricing import (
    GepaSpec,
    InferenceSpec,
    JobSpec,
    JudgeSpec,
    Quote,
    RateCard,
    RateCardRegistry,
    TraceEvalSpec,
    preview,
    price_usage,
)
from ecu_sidecar.pricing.registry import NoRateCard
from ecu_sidecar.settings import Settings
from ecu_sidecar.store import RedisStore
from ecu_sidecar.validation import (
    CALLER_ID_MAX,
    ID_PATTERN,
    MAX_COUNT,
    MODEL_MAX,
    MODEL_PATTERN,
    check_amount,
    check_count,
    check_id,
    check_model,
    check_optional_id,
)

#: An organization nobody touches is swept at least every this many sweep intervals.
SWEEP_IDLE_INTERVALS = 30
#: Most organizations remembered as unknown to the ledger (ECU_LEDGER_NEGATIVE_TTL_MS).
UNKNOWN_ORGS_MAX = 10_000

__all__ = ["LedgerPort", "QuotaEngine"]

T = TypeVar("T")

log = logging.getLogger(__name__)


class LedgerPort(Protocol):
    """What the engine needs of the ledger repository (ecu_sidecar.ledger): durable two-phase
    grants and the state to rebuild an organization from. Blocking; an unreachable database
    raises ecu_sidecar.ledger.LedgerUnavailable."""

    def grant(
        self,
        org: str,
        grant_id: str,
        amount_uecu: int,
        kind: str,
        expires_at_ms: int,
        *,
        now_ms: int | None = None,
        limit_uecu: int | None = None,
    ) -> bool: ...

    def void_grant(self, org: str, grant_id: str) -> bool: ...

    def ledger_account(self, org: str) -> LedgerAccount | None: ...

    def reservation(self, org: str, reservation_id: str) -> LedgerReservation | None: ...


_MODEL_REQUIRED = frozenset({JobType.INFERENCE, JobType.JUDGE})
#: Job specs with more prompt text than this are priced on a worker thread.
_INLINE_PRICING_CHARS = 16_384
_JOB_TYPE_OF_ITEM = {
    InferenceSpec: JobType.INFERENCE,
    JudgeSpec: JobType.JUDGE,
    GepaSpec: JobType.GEPA,
    TraceEvalSpec: JobType.TRACE_EVAL,
}


def _text_size(job: Any) -> int:
    """Characters of prompt text in a job spec (to decide where to tokenize it)."""
    if isinstance(job, (list, tuple)):
        return sum(_text_size(x) for x in job)
    if isinstance(job, (InferenceSpec, JudgeSpec)):
        size = len(job.prompt_text or "")
        for m in job.messages or ():
            size += len(m["content"] if isinstance(m, dict) else m.content)
        return size
    if isinstance(job, GepaSpec):
        return _text_size(list(job.per_iteration))
    if isinstance(job, TraceEvalSpec):
        return _text_size(list(job.judges))
    return 0


def _from_quote(item: ReserveItem, quote: Quote) -> ReserveItem:
    """The item holding a quote's total: job type and model derived when not given."""
    job_type = item.job_type
    if not isinstance(job_type, JobType):
        first = item.job[0] if item.job else None
        job_type = _JOB_TYPE_OF_ITEM.get(type(first), JobType.ENGINE)
    models = {line.model for line in quote.lines if line.model}
    model = item.model or (models.pop() if len(models) == 1 else "")
    return replace(
        item,
        amount_uecu=quote.total_uecu,
        job_type=job_type,
        model=model,
        rate_card_version=quote.rate_card_version,
    )


def _plain_commit(it: CommitItem) -> bool:
    """A commit of a caller's amount (no usage lines, no rate card version) whose amount and
    counts the checks of ``commit_batch`` would pass: the common case, recognized in one
    expression. False sends the commit through the checks, which name what is wrong."""
    actual, u = it.actual_uecu, it.usage
    return (
        not it.usage_lines
        and not it.rate_card_version
        and type(actual) is int
        and 0 <= actual <= MAX_REQUEST_UECU
        and type(u.tokens_in) is int
        and 0 <= u.tokens_in <= MAX_COUNT
        and type(u.tokens_out) is int
        and 0 <= u.tokens_out <= MAX_COUNT
        and type(u.calls) is int
        and 0 <= u.calls <= MAX_COUNT
    )


def _priced_commit(item: CommitItem, quote: Quote) -> CommitItem:
    """The item committing a usage quote's total, its usage summed from the lines."""
    lines = item.usage_lines
    usage = Usage(
        tokens_in=sum(u.tokens_in for u in lines),
        tokens_out=sum(u.tokens_out for u in lines),
        calls=sum(u.calls for u in lines),
    )
    breakdown = json.dumps(
        [
            [x.description, x.quantity, str(x.unit), x.rate_uecu, x.per, x.subtotal_uecu, x.model]
            for x in quote.lines
        ],
        separators=(",", ":"),
    )
    return replace(
        item, actual_uecu=quote.total_uecu, usage=usage, breakdown=breakdown, usage_lines=None
    )


#: Latest expiry a grant may carry (year 9999), so it stays a sane epoch in milliseconds.
_MAX_EPOCH_MS = 253_402_300_799_000


class QuotaEngine:
    """Reserve, commit, release, extend, grant: validated, one script call each."""

    def __init__(
        self,
        store: RedisStore,
        settings: Settings,
        ledger: LedgerPort | None = None,
        rates: RateCardRegistry | None = None,
        journal: Journal | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self._clock = clock
        """Monotonic seconds for the sweeper's due times and the negative cache (injected so
        tests step time instead of sleeping)."""
        self.settings = settings
        self.rates = rates
        """The rate cards that price job specs and usage (None: amounts only)."""
        self.journal = journal
        """Degraded mode's journal (None: fail closed while Redis is unreachable)."""
        self.ledger = ledger
        """With a ledger, grants are written to it first, and an organization Redis has lost is
        rebuilt from it on first use."""
        self._recent: OrderedDict[str, float] = OrderedDict()
        """Organizations served recently (least recent first) -> when (``clock``) the
        background sweeper next has work there."""
        self._unknown: OrderedDict[str, float] = OrderedDict()
        """Organizations the ledger did not know (oldest first) -> until when
        (``clock``) that answer stands (ECU_LEDGER_NEGATIVE_TTL_MS)."""

    # -- validation helpers -------------------------------------------------------------------

    def _org(self, field: str, org: str) -> str:
        """A valid organization id this sidecar may act for (ECU_ALLOWED_ORGS)."""
        check_id(field, org)
        allowed = self.settings.allowed_org_set
        if allowed and org not in allowed:
            raise OrganizationNotAllowed(
                f"{field}: organization {org} is not one this sidecar may act for", field=field
            )
        return org

    def _account(self, field: str, account: AccountRef) -> AccountRef:
        self._org(f"{field}.organization", account.organization)
        check_optional_id(f"{field}.team", account.team)
        check_optional_id(f"{field}.project", account.project)
        check_optional_id(f"{field}.user", account.user)
        return account

    def _ttl(self, field: str, ttl_ms: int, *, zero_means: int) -> int:
        if isinstance(ttl_ms, bool) or not isinstance(ttl_ms, int):
            raise InvalidArgument(field, "must be an integer number of milliseconds")
        if ttl_ms == 0:
            return zero_means
        lo, hi = self.settings.min_ttl_ms, self.settings.max_ttl_ms
        if not lo <= ttl_ms <= hi:
            raise InvalidArgument(
                field, f"must be 0 (default) or between {lo} and {hi} ms, got {ttl_ms}"
            )
        return ttl_ms

    def _batch_size(self, field: str, n: int) -> None:
        if n == 0:
            raise InvalidArgument(field, "must hold at least one item")
        if n > self.settings.max_batch_items:
            raise InvalidArgument(
                field, f"must hold at most {self.settings.max_batch_items} items, got {n}"
            )

    def _seen(self, org: str, due_within_ms: int | None = None) -> None:
        """Track ``org`` for the background sweeper; ``due_within_ms``: a hold made now falls
        due then, so sweep no later than that."""
        recent = self._recent
        due = recent.get(org)
        if due is None:
            wait_ms = self.settings.sweep_interval_ms if due_within_ms is None else due_within_ms
            recent[org] = self._clock() + wait_ms / 1000
            if len(recent) > self.settings.sweep_max_orgs:
                recent.popitem(last=False)
            return
        recent.move_to_end(org)
        if due_within_ms is not None:
            at = self._clock() + due_within_ms / 1000
            if at < due:
                recent[org] = at

    async def _ledger_call(self, what: str, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Run a blocking ledger call on a thread, bounded by ECU_LEDGER_TIMEOUT_MS. The ledger
        unreachable, or slower than that, raises StoreUnavailable (UNAVAILABLE: an unknown
        outcome the caller's retry settles). The thread itself is bounded by the ledger's own
        connect, pool-wait and statement timeouts (open_configured(bounded=True)), so threads
        of calls given up on do not pile up."""
        timeout_ms = self.settings.ledger_timeout_ms
        try:
            async with asyncio.timeout(timeout_ms / 1000):
                return await asyncio.to_thread(fn, *args, **kw)
        except TimeoutError:
            raise StoreUnavailable(
                f"the ledger did not answer within {timeout_ms} ms ({what})"
            ) from None
        except LedgerUnavailable as exc:
            raise StoreUnavailable(f"the ledger is unavailable ({what}): {exc}") from None

    def _known_unknown(self, org: str) -> bool:
        """Whether the ledger said recently (ECU_LEDGER_NEGATIVE_TTL_MS) it does not know org."""
        until = self._unknown.get(org)
        if until is None:
            return False
        if self._clock() < until:
            return True
        del self._unknown[org]
        return False

    def _remember_unknown(self, org: str) -> None:
        ttl_ms = self.settings.ledger_negative_ttl_ms
        if not ttl_ms:
            return
        self._unknown.pop(org, None)
        self._unknown[org] = self._clock() + ttl_ms / 1000
        if len(self._unknown) > UNKNOWN_ORGS_MAX:
            self._unknown.popitem(last=False)

    async def hydrate(self, org: str) -> bool:
        """Rebuild ``org`` in Redis from the ledger if Redis lacks it; False if the ledger does
        not know it either (or there is no ledger). An organization the ledger did not know is
        not asked about again for ECU_LEDGER_NEGATIVE_TTL_MS. Raises StoreUnavailable when the
        ledger cannot answer within ECU_LEDGER_TIMEOUT_MS."""
        if self.ledger is None or self._known_unknown(org):
            return False
        if not await self.store.missing_accounts([org]):
            return True  # Grant asks every time: no ledger read while the account is there
        # The outbox position first: only a position seen fully flushed before the ledger read
        # proves that read holds every event, and the script rebuilds only if nothing moved
        # since ('' never matches: StoreUnavailable, the flusher drains first).
        outbox = await self.store.outbox_state(org)
        account = await self._ledger_call("rebuild", self.ledger.ledger_account, org)
        if account is None:
            self._remember_unknown(org)
            return False
        # A no-op if another sidecar got there first.
        await self.store.hydrate(account, flushed_id=outbox.last_id if outbox.fully_flushed else "")
        return True

    async def _hydrating(self, org: str, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call()
        except AccountNotFound:
            if not await self.hydrate(org):
                raise
            return await call()

    # -- degraded mode (ecu_sidecar.degraded) --------------------------------------------------

    def _local_available(self, org: str) -> int:
        assert self.journal is not None
        return self.journal.allowance_uecu - self.journal.used(org)

    def _reserve_locally(
        self, account: AccountRef, item: ReserveItem, cause: StoreUnavailable
    ) -> ReserveOutcome:
        assert self.journal is not None
        now = degraded_now_ms()
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
            [view],
            self._local_available(account.organization),
            replayed=hold is not asked,
            degraded=True,
        )

    def _commit_locally(self, org: str, items: Sequence[CommitItem]) -> CommitBatchOutcome:
        """Journal each commit: usage is never dropped, even while Redis is down. A local
        hold's commit is bounded as in Redis: it bills min(actual, hold + overage bound) and
        records the rest unbilled; a commit of a hold that lives in Redis is journaled as asked
        (its replay runs the commit script, which bounds it)."""
        journal = self.journal
        assert journal is not None
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
        available = self._local_available(org)
        return CommitBatchOutcome([replace(o, available_uecu=available) for o in outs], available)

    async def replay_degraded(self) -> int:
        """Move what degraded mode decided into Redis, oldest first; returns entries replayed.

        Each entry is tried on its own: one Redis cannot take now (StoreUnavailable) waits for
        the next call, with the rest of its organization's entries (another organization may
        live on a reachable node); one Redis definitely refuses is marked failed in the journal
        (logged, counted, kept for the operator) and the next entries go on."""
        journal = self.journal
        if journal is None or journal.pending() == 0:
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

    async def _replay_entry(self, entry: LocalHold | RemoteCommit) -> bool:
        """Replay one journal entry into Redis; False when it stays local (an open hold Redis
        cannot cover yet). Raises what Redis answered (StoreUnavailable: try again later; any
        other EcuError: a definite refusal)."""
        org, rid = entry.org, entry.rid
        pct = self.settings.overage_max_percent
        if isinstance(entry, RemoteCommit):
            items = [
                CommitItem(
                    rid,
                    entry.actual_uecu,
                    Usage(*entry.usage),
                    entry.rate_card_version,
                    entry.breakdown,
                )
            ]
            out = await self._hydrating(org, lambda: self.store.commit(org, items, pct))
            if self.ledger is not None and isinstance(out.outcomes[0].error, HoldNotFound):
                out = await self._commit_known(org, items, out)  # the rule of any commit
            if out.outcomes[0].error is not None:
                raise out.outcomes[0].error
            return True
        hold = entry
        if hold.state == "A":
            # The original request's parameters: a reserve that reached Redis after all (it
            # timed out but ran) is answered as a replay of that real hold.
            ttl = hold.ttl_ms
            if not ttl:  # journals written before the TTL was recorded
                ttl = max(self.settings.min_ttl_ms, hold.deadline_ms - degraded_now_ms())
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
                await self._hydrating(org, lambda: self.store.reserve(acct, [step]))
            except InsufficientEcu:
                if hold.deadline_ms <= degraded_now_ms():
                    log.warning(
                        "degraded-mode hold %s of %s expired before Redis could cover it",
                        rid,
                        org,
                    )
                    return True  # expired locally: nothing is held or billed
                return False  # stays local until its commit or release is replayed
            return True
        if hold.state == "R":
            try:
                await self._hydrating(org, lambda: self.store.release(org, rid))
            except (HoldNotFound, AccountNotFound):
                pass  # the reserve never reached Redis: nothing is held there
            return True
        # Committed: the commit script settles the real hold if the reserve reached Redis,
        # otherwise bills the local hold (the known hold, kind degraded) under its own event id.
        items = [
            CommitItem(rid, hold.actual_uecu, Usage(*hold.usage), hold.commit_rcv, hold.breakdown)
        ]
        if self.ledger is not None:
            # First as any commit: the real hold, or the ledger's record of it (a landed
            # reserve whose tombstone was purged since: its commit's event id has Redis's t0,
            # which the journal does not know).
            out = await self._hydrating(org, lambda: self.store.commit(org, items, pct))
            if isinstance(out.outcomes[0].error, HoldNotFound):
                out = await self._commit_known(org, items, out)
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
        out = await self._hydrating(org, lambda: self.store.commit(org, items, pct, known=known))
        if out.outcomes[0].error is not None:
            raise out.outcomes[0].error
        return True

    def recent_organizations(self) -> list[str]:
        """Organizations this process served recently (for the background sweeper)."""
        return list(self._recent)

    def _items(self, items: Sequence[Any], batch: bool) -> Iterator[tuple[str, Any]]:
        """Check the batch size and that item ids are valid and distinct; yield (prefix, item)."""
        if batch:
            self._batch_size("items", len(items))
        seen: set[str] = set()
        for i, it in enumerate(items):
            f = f"items[{i}]." if batch else ""
            rid = it.reservation_id
            if not (0 < len(rid) <= CALLER_ID_MAX and ID_PATTERN.fullmatch(rid)):
                check_id(f"{f}reservation_id", rid, CALLER_ID_MAX)  # raises, naming the fault
            if rid in seen:
                raise InvalidArgument(f"{f}reservation_id", f"{rid} appears twice in the batch")
            seen.add(rid)
            yield f, it

    def _plain_step(self, it: ReserveItem) -> bool:
        """A step with a caller's amount and nothing the checks of ``reserve`` would refuse or
        change but a TTL of 0 (the default): the common case, recognized in one expression.
        False sends the step through the checks, which name what is wrong."""
        model, ttl, amount = it.model, it.ttl_ms, it.amount_uecu
        return (
            it.job is None
            and type(amount) is int
            and 0 < amount <= MAX_REQUEST_UECU
            and type(it.job_type) is JobType
            and (
                0 < len(model) <= MODEL_MAX and MODEL_PATTERN.fullmatch(model) is not None
                if model
                else it.job_type not in _MODEL_REQUIRED
            )
            and type(ttl) is int
            and (ttl == 0 or self.settings.min_ttl_ms <= ttl <= self.settings.max_ttl_ms)
        )

    async def _checked_step(
        self, org: str, f: str, it: ReserveItem
    ) -> tuple[ReserveItem, Quote | None]:
        """A step checked field by field (the first fault raised, named by its field path
        ``f``...), its job spec priced, its TTL resolved; and its quote, if priced."""
        quote = None
        if it.job is not None:
            if it.amount_uecu:
                raise InvalidArgument(f"{f}amount_uecu", "give amount_uecu or job, not both")
            quote = await self._price_job(org, it.job, f"{f}job")
            it = _from_quote(it, quote)
        else:
            check_amount(f"{f}amount_uecu", it.amount_uecu)
        if not isinstance(it.job_type, JobType):
            raise InvalidArgument(
                f"{f}job_type",
                f"must be one of {', '.join(j.wire_name for j in JobType)}, got {it.job_type}",
            )
        check_model(f"{f}model", it.model, it.job_type in _MODEL_REQUIRED and quote is None)
        ttl = self._ttl(f"{f}ttl_ms", it.ttl_ms, zero_means=self.settings.default_ttl_ms)
        if ttl != it.ttl_ms or it.job is not None:
            it = ReserveItem(
                it.reservation_id, it.amount_uecu, it.job_type, it.model, ttl,
                it.rate_card_version, it.fingerprint,
            )  # fmt: skip
        return it, quote

    def _checked_commit(self, org: str, f: str, it: CommitItem) -> tuple[CommitItem, Quote | None]:
        """A commit checked field by field (the first fault raised, named by its field path
        ``f``...), its usage lines priced; and its quote, if priced."""
        quote = None
        if it.usage_lines:
            if it.actual_uecu:
                raise InvalidArgument(
                    f"{f}actual_uecu", "give actual_uecu or usage_lines, not both"
                )
            if it.usage != Usage():
                raise InvalidArgument(
                    f"{f}usage", "give usage or usage_lines, not both (lines carry the usage)"
                )
            if not it.rate_card_version:
                raise InvalidArgument(
                    f"{f}rate_card_version",
                    "is required with usage_lines (the version the hold was priced with)",
                )
            card = self._card(it.rate_card_version)
            quote = price_usage(card, org, it.usage_lines, field=f"{f}usage_lines")
            it = _priced_commit(it, quote)
            for name in ("tokens_in", "tokens_out", "calls"):
                check_count(f"{f}usage_lines", getattr(it.usage, name))
        elif it.rate_card_version:
            raise InvalidArgument(f"{f}rate_card_version", "is only meaningful with usage_lines")
        check_amount(f"{f}actual_uecu", it.actual_uecu, allow_zero=True)
        check_count(f"{f}usage.tokens_in", it.usage.tokens_in)
        check_count(f"{f}usage.tokens_out", it.usage.tokens_out)
        check_count(f"{f}usage.calls", it.usage.calls)
        return it, quote

    @staticmethod
    def _total(amounts: Iterable[int]) -> None:
        total = sum(amounts)
        if total > MAX_REQUEST_UECU:
            raise InvalidArgument(
                "items", f"total amount must be at most {MAX_REQUEST_UECU} uECU, got {total}"
            )

    # -- operations ---------------------------------------------------------------------------

    async def reserve(
        self, account: AccountRef, items: Sequence[ReserveItem], *, batch: bool = False
    ) -> ReserveOutcome:
        """Hold each item's worst case against the account (and its caps), all or nothing.
        An item with a job spec holds exactly the spec's preview total, pinned to the card."""
        self._account("account", account)
        resolved = []
        quotes: list[Quote | None] = []
        priced: list[int] = []  # where the steps priced from a job spec are
        for f, it in self._items(items, batch):
            quote = None
            if not self._plain_step(it):
                it, quote = await self._checked_step(account.organization, f, it)
                if quote is not None:
                    priced.append(len(resolved))
            resolved.append(it)
            quotes.append(quote)
        self._total(it.amount_uecu for it in resolved)
        default_ttl = self.settings.default_ttl_ms
        try:
            outcome = await self._hydrating(
                account.organization,
                lambda: self.store.reserve(account, resolved, default_ttl_ms=default_ttl),
            )
        except (ReplicationUnconfirmed, Rebuilding):
            # Redis answered: the primary ran it (a local decision as well would count it
            # twice), or it is fenced for a moment (a retry is served): nothing to degrade.
            raise
        except StoreUnavailable as exc:
            if self.journal is None or len(resolved) != 1:
                raise
            item = resolved[0]
            if not item.ttl_ms:
                item = replace(item, ttl_ms=default_ttl)
            return replace(self._reserve_locally(account, item, exc), quotes=quotes)
        self._seen(account.organization, min(it.ttl_ms or default_ttl for it in resolved))
        # A replay of a hold priced before a rate card reload keeps its pinned price: answer
        # the quote of the version it pinned, which is the one its commit must name.
        for i in priced:
            hold, quote = outcome.holds[i], quotes[i]
            if quote and hold.rate_card_version != quote.rate_card_version:
                pinned = self._card(hold.rate_card_version)
                quotes[i] = preview(pinned, account.organization, items[i].job, field="job")
        # The constructor, not dataclasses.replace (twice its cost), on every reserve.
        return ReserveOutcome(
            outcome.holds, outcome.available_uecu, outcome.replayed, quotes, outcome.degraded
        )

    async def preview(self, account: AccountRef, job: JobSpec) -> tuple[Quote, int | None]:
        """The worst case of ``job`` for the account, and its available balance (None when the
        organization has no account). No side effects beyond sweeping overdue holds."""
        self._account("account", account)
        quote = await self._price_job(account.organization, job, "job")
        try:
            balance = await self._hydrating(
                account.organization, lambda: self.store.balance(account.organization)
            )
        except AccountNotFound:
            return quote, None
        return quote, balance.available_uecu

    def _card(self, version: str | None = None) -> RateCard:
        if self.rates is None:
            raise NoRateCard("no rate card is configured (set ECU_RATE_CARD_FILE)")
        return self.rates.current if version is None else self.rates.get(version)

    async def _price_job(self, org: str, job: JobSpec, field: str) -> Quote:
        card = self._card()
        if _text_size(job) > _INLINE_PRICING_CHARS:
            # tiktoken releases the GIL: a long prompt is counted off the event loop.
            return await asyncio.to_thread(preview, card, org, job, field=field)
        return preview(card, org, job, field=field)

    async def commit(
        self, org: str, items: Sequence[CommitItem], *, batch: bool = False
    ) -> list[CommitOutcome]:
        """Settle holds with their actual costs; each item succeeds or fails on its own."""
        return (await self.commit_batch(org, items, batch=batch)).outcomes

    async def commit_batch(
        self, org: str, items: Sequence[CommitItem], *, batch: bool = True
    ) -> CommitBatchOutcome:
        """Like commit, also answering the available balance after the whole batch."""
        self._org("organization", org)
        resolved: list[CommitItem] = []
        quotes: list[Quote | None] = []
        for f, it in self._items(items, batch):
            quote = None
            if not _plain_commit(it):
                it, quote = self._checked_commit(org, f, it)
            resolved.append(it)
            quotes.append(quote)
        items = resolved
        self._total(it.actual_uecu for it in items)
        pct = self.settings.overage_max_percent
        try:
            outcome = await self._hydrating(org, lambda: self.store.commit(org, items, pct))
        except (ReplicationUnconfirmed, Rebuilding):
            # Redis answered: the primary ran it (a local decision as well would count it
            # twice), or it is fenced for a moment (a retry is served): nothing to degrade.
            raise
        except StoreUnavailable:
            if self.journal is None:
                raise
            outcome = self._commit_locally(org, items)
        else:
            if any(isinstance(o.error, HoldNotFound) for o in outcome.outcomes):
                outcome = await self._commit_unknown(org, items, outcome)
        self._seen(org)
        if any(quotes):
            outs = [
                replace(o, quote=q) if q else o
                for o, q in zip(outcome.outcomes, quotes, strict=True)
            ]
            outcome = replace(outcome, outcomes=outs)
        return outcome

    async def _commit_unknown(
        self, org: str, items: Sequence[CommitItem], outcome: CommitBatchOutcome
    ) -> CommitBatchOutcome:
        """Commits of ids Redis has no record of: a hold degraded mode granted and has not
        replayed yet is journaled against that hold (its replay bills it); the others are
        settled by the ledger's record (_commit_known)."""
        journal = self.journal
        if journal is not None:
            local = [
                i
                for i, o in enumerate(outcome.outcomes)
                if isinstance(o.error, HoldNotFound)
                and (hold := journal.holds.get((org, items[i].reservation_id))) is not None
                and not hold.done
            ]
            if local:
                journaled = self._commit_locally(org, [items[i] for i in local])
                outs = list(outcome.outcomes)
                for i, o in zip(local, journaled.outcomes, strict=True):
                    outs[i] = o
                outcome = replace(outcome, outcomes=outs)
        if self.ledger is not None and any(
            isinstance(o.error, HoldNotFound) for o in outcome.outcomes
        ):
            outcome = await self._commit_known(org, items, outcome)
        return outcome

    async def _commit_known(
        self, org: str, items: Sequence[CommitItem], outcome: CommitBatchOutcome
    ) -> CommitBatchOutcome:
        """Commits of ids Redis has no record of, settled by what the ledger recorded of them
        (one rule before and after a rebuild or a tombstone purge): a committed hold answers
        its recorded outcome (a replay) or a conflict, a released one HOLD_RELEASED, an
        expired or outstanding one is billed as a late commit of that hold (bounded, under the
        commit event id the hold always had, so the ledger never bills it twice), and an id the
        ledger never saw stays HOLD_NOT_FOUND: a reservation id never reserved is never billed."""
        assert self.ledger is not None
        ledger = self.ledger
        outs = list(outcome.outcomes)
        retry: dict[int, KnownHold] = {}
        for i, (it, o) in enumerate(zip(items, outs, strict=True)):
            if not isinstance(o.error, HoldNotFound):
                continue
            rid = it.reservation_id
            rec = await self._ledger_call("reservation", ledger.reservation, org, rid)
            if rec is None:
                continue
            if rec.state == "committed":
                assert rec.outcome is not None
                if rec.actual_uecu == it.actual_uecu and rec.usage == it.usage:
                    outs[i] = replace(rec.outcome, available_uecu=outcome.available_uecu)
                else:
                    outs[i] = replace(
                        o,
                        error=IdempotencyConflict(
                            f"hold {rid} was already committed with actual {rec.actual_uecu} "
                            "uECU and other usage or amount",
                            reservation_id=rid,
                        ),
                    )
            elif rec.state == "released":
                outs[i] = replace(
                    o,
                    error=HoldReleased(
                        f"hold {rid} was released; it cannot be committed", reservation_id=rid
                    ),
                )
            else:
                retry[i] = rec.hold
        if retry:
            again = [items[i] for i in retry]
            known = {items[i].reservation_id: hold for i, hold in retry.items()}
            pct = self.settings.overage_max_percent
            second = await self.store.commit(org, again, pct, known=known)
            for i, o in zip(retry, second.outcomes, strict=True):
                outs[i] = o
            outcome = replace(outcome, available_uecu=second.available_uecu)
            if second.outcomes:
                log.warning(
                    "%d commit(s) of %s settled from the ledger's record of their holds",
                    len(retry),
                    org,
                )
        return replace(outcome, outcomes=outs)

    async def release(self, org: str, reservation_id: str) -> ReleaseOutcome:
        """Void a hold; its amount returns to available."""
        self._org("organization", org)
        check_id("reservation_id", reservation_id, CALLER_ID_MAX)
        try:
            return await self._hydrating(org, lambda: self.store.release(org, reservation_id))
        except (ReplicationUnconfirmed, Rebuilding):
            # Redis answered: the primary ran it (a local decision as well would count it
            # twice), or it is fenced for a moment (a retry is served): nothing to degrade.
            raise
        except (StoreUnavailable, HoldNotFound):
            # Redis down, or up again before this local hold was replayed: the journal has it.
            local = self.journal.holds.get((org, reservation_id)) if self.journal else None
            if local is None or local.done:
                raise  # a hold that lives in Redis expires there if nobody releases it
            assert self.journal is not None
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
                self._local_available(org),
                replayed=not settled,
                degraded=True,
            )

    async def extend(
        self, org: str, reservation_id: str, ttl_ms: int, sequence: int
    ) -> ExtendOutcome:
        """Push a live hold's deadline to now + ttl (heartbeat number ``sequence``)."""
        self._org("organization", org)
        check_id("reservation_id", reservation_id, CALLER_ID_MAX)
        ttl = self._ttl("ttl_ms", ttl_ms, zero_means=0)
        if (
            isinstance(sequence, bool)
            or not isinstance(sequence, int)
            or not 1 <= sequence <= 2**53 - 1
        ):
            raise InvalidArgument(
                "sequence", f"must be an integer from 1 to {2**53 - 1}, got {sequence}"
            )
        outcome = await self._hydrating(
            org, lambda: self.store.extend(org, reservation_id, ttl, sequence)
        )
        self._seen(org)
        return outcome

    async def balance(self, org: str) -> Balance:
        """The organization's wallet, hold counters and caps."""
        self._org("organization", org)
        return await self._hydrating(org, lambda: self.store.balance(org))

    async def grant(
        self, org: str, grant_id: str, amount_uecu: int, kind: GrantKind, expires_at_ms: int = 0
    ) -> GrantOutcome:
        """Credit an organization with a caller-chosen, idempotent grant id."""
        self._org("organization", org)
        check_id("grant_id", grant_id, CALLER_ID_MAX)
        check_amount("amount_uecu", amount_uecu)
        if not isinstance(kind, GrantKind):
            raise InvalidArgument(
                "kind", f"must be one of {', '.join(k.wire_name for k in GrantKind)}, got {kind}"
            )
        if (
            isinstance(expires_at_ms, bool)
            or not isinstance(expires_at_ms, int)
            or not 0 <= expires_at_ms <= _MAX_EPOCH_MS
        ):
            raise InvalidArgument(
                "expires_at_unix_ms",
                f"must be 0 (never) or a Unix time in ms up to {_MAX_EPOCH_MS}",
            )
        if self.ledger is None:
            return await self.store.grant(org, grant_id, amount_uecu, kind, expires_at_ms)
        # An organization Redis lost is rebuilt first (from what Redis had confirmed), so this
        # grant lands on its real balance. Then ledger first, as a *pending* grant, counted
        # nowhere until Redis's grant event confirms it; once the ledger holds it, it cannot
        # be lost. What Redis would refuse the ledger refuses first, in its transaction, before
        # anything is written (and never for a replay, which Redis answers as the original): an
        # expiry not after now by the scripts' clock (Redis TIME + offset, what grant.lua
        # decides with), and a grant taking the organization's confirmed plus pending grants
        # past the limit Redis enforces on its granted total.
        await self.hydrate(org)
        now = await self.store.now_ms() if expires_at_ms else None
        await self._ledger_call(
            "grant",
            self.ledger.grant,
            org,
            grant_id,
            amount_uecu,
            kind.value,
            expires_at_ms,
            now_ms=now,
            limit_uecu=MAX_GRANTED_UECU,
        )
        self._unknown.pop(org, None)  # the ledger knows it now
        try:
            return await self.store.grant(org, grant_id, amount_uecu, kind, expires_at_ms)
        except (GrantAlreadyExpired, BalanceLimit, IdempotencyConflict) as refusal:
            # Redis definitely did not apply it: void the pending grant. (On UNAVAILABLE the
            # outcome is unknown: it stays pending, and the caller's retry with the same id or
            # the flusher, which finishes pending grants once the outbox is flushed, settles
            # it.) A void that fails leaves it pending for the flusher to void.
            try:
                await self._ledger_call("void", self.ledger.void_grant, org, grant_id)
            except StoreUnavailable as exc:
                log.warning(
                    "grant %s of %s refused by Redis (%s) and not voided in the ledger yet (%s);"
                    " the flusher will",
                    grant_id,
                    org,
                    refusal.reason,
                    exc.message,
                )
            raise

    async def set_cap(
        self, org: str, scope: str, scope_id: str, cap_uecu: int | None
    ) -> ScopeUsage:
        """Set (or with None clear) a team or project cap."""
        self._org("organization", org)
        if scope not in ("team", "project"):
            raise InvalidArgument(
                "scope", f"must be CAP_SCOPE_TEAM or CAP_SCOPE_PROJECT, got {scope}"
            )
        check_id("id", scope_id)
        if cap_uecu is not None:
            if (
                isinstance(cap_uecu, bool)
                or not isinstance(cap_uecu, int)
                or not 0 <= cap_uecu <= MAX_GRANTED_UECU
            ):
                raise InvalidArgument(
                    "cap_uecu", f"must be between 0 and {MAX_GRANTED_UECU} uECU, got {cap_uecu}"
                )
        return await self._hydrating(
            org, lambda: self.store.set_cap(org, scope, scope_id, cap_uecu)
        )

    async def set_auto_topup(self, org: str, threshold_uecu: int | None, amount_uecu: int) -> None:
        """Configure (None: turn off) when an auto_topup_requested notification fires, and for
        how much."""
        self._org("organization", org)
        if threshold_uecu is not None:
            check_amount("threshold_uecu", threshold_uecu)
            check_amount("amount_uecu", amount_uecu)
        await self._hydrating(
            org, lambda: self.store.set_auto_topup(org, threshold_uecu, amount_uecu)
        )

    async def sweep_recent(self) -> int:
        """Expire overdue holds of every recently seen organization whose next hold deadline
        or grant expiry has come; returns how many holds expired.

        Every script sweeps its organization before deciding, so this pass only matters for
        organizations nobody touches. Each sweep says when that organization next has work;
        it is left alone until then, and at most SWEEP_IDLE_INTERVALS sweep intervals (holds
        made by other sidecar processes, which this one does not hear of)."""
        total = 0
        recent = self._recent
        interval_s = self.settings.sweep_interval_ms / 1000
        idle_s = interval_s * SWEEP_IDLE_INTERVALS
        now = self._clock()
        for org in [org for org, due in recent.items() if due <= now]:
            # While the script runs, a reserve may bring the due time forward: keep the earlier.
            recent[org] = math.inf
            try:
                out = await self.store.sweep(org)
            except BaseException:
                if recent.get(org) == math.inf:
                    recent[org] = now + interval_s
                raise
            total += out.expired
            if out.waiting:
                wait_s = 0.0  # more were due than one sweep handles: the next tick goes on
            elif out.next_due_ms is None:
                wait_s = idle_s
            else:
                wait_s = min(out.next_due_ms / 1000, idle_s)
            if org in recent:  # not evicted meanwhile
                recent[org] = min(recent[org], self._clock() + wait_s)
        return total
