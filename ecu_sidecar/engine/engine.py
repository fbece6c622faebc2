"""The reservation engine: validates every request, then makes exactly one store call.

The engine is what the gRPC service and the CLI call; it knows nothing of gRPC or Redis.
Around that one call: an organization Redis lost is rebuilt from the ledger (hydrator), grants
go to the ledger first (grants), Redis unreachable may be answered locally (degraded), and
every organization served is scheduled for the background sweeper (sweep).
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from ecu_sidecar.engine.degraded import DegradedMode
from ecu_sidecar.engine.grants import GrantLedger, grant_ledger_first
from ecu_sidecar.engine.hydrator import Hydrator
from ecu_sidecar.engine.jobs import JobDesk, job_type_of
from ecu_sidecar.engine.journal import Journal
from ecu_sidecar.engine.sweep import SweepSchedule
from ecu_sidecar.errors import (
    AccountNotFound,
    HoldNotFound,
    RateCardMismatch,
    Rebuilding,
    ReplicationUnconfirmed,
    StoreUnavailable,
)
from ecu_sidecar.jobs import JobAccuracy, JobApproval, JobView
from ecu_sidecar.model import (
    AccountRef,
    Balance,
    CommitBatchOutcome,
    CommitItem,
    CommitOutcome,
    ExtendOutcome,
    GrantKind,
    GrantOutcome,
    JobType,
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
from ecu_sidecar.store import Store
from ecu_sidecar.validation import (
    CALLER_ID_MAX,
    check_account,
    check_amount,
    check_batch_size,
    check_cap,
    check_commit,
    check_expiry,
    check_grant_kind,
    check_id,
    check_optional_id,
    check_org,
    check_reservation_id,
    check_scope,
    check_sequence,
    check_step,
    check_total,
    check_ttl,
    check_usage_lines,
    field_path,
)

__all__ = ["QuotaEngine"]

#: Job specs with more prompt text than this are priced on a worker thread.
_INLINE_PRICING_CHARS = 16_384


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
    """The item holding a quote's total (the job spec priced, so not passed on): job type and
    model derived when not given."""
    job_type = item.job_type
    if not isinstance(job_type, JobType):
        job_type = job_type_of(item.job)
    models = {line.model for line in quote.lines if line.model}
    model = item.model or (models.pop() if len(models) == 1 else "")
    return ReserveItem(
        item.reservation_id,
        quote.total_uecu,
        job_type,
        model,
        item.ttl_ms,
        quote.rate_card_version,
        item.fingerprint,
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


class QuotaEngine:
    """Reserve, commit, release, extend, grant: validated, one script call each."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        ledger: GrantLedger | None = None,
        rates: RateCardRegistry | None = None,
        journal: Journal | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.settings = settings
        self.rates = rates
        """The rate cards that price job specs and usage (None: amounts only)."""
        self.journal = journal
        """Degraded mode's journal (None: fail closed while Redis is unreachable)."""
        self.ledger = ledger
        """With a ledger, grants are written to it first, and an organization Redis has lost is
        rebuilt from it on first use."""
        self.hydrator = Hydrator(store, settings, ledger, clock)
        self.pricing_executor = ThreadPoolExecutor(
            settings.tokenizer_threads, thread_name_prefix="ecu-pricing"
        )
        """Long prompts are priced on these threads (ECU_TOKENIZER_THREADS), apart from the
        ledger's and the default executor the in-process flusher uses."""
        """Rebuilds from the ledger (with its deadline and negative cache)."""
        self.degraded = (
            DegradedMode(journal, store, settings, self.hydrator) if journal is not None else None
        )
        """Local decisions while Redis is unreachable, and their replay (None: fail closed)."""
        self.sweeps = SweepSchedule(settings.sweep_interval_ms, settings.sweep_max_orgs, clock)
        """The organizations served recently, for the background sweeper."""
        self.jobs = JobDesk(self)
        """Approved jobs, and the rate card versions their steps are priced with."""

    def close(self) -> None:
        """Let the engine's threads (pricing, ledger) end once their work is done."""
        self.pricing_executor.shutdown(wait=False)
        self.hydrator.executor.shutdown(wait=False)

    async def replay_degraded(self) -> int:
        """Replay degraded mode's journal into Redis (DegradedMode.replay); entries replayed."""
        return 0 if self.degraded is None else await self.degraded.replay()

    def recent_organizations(self) -> list[str]:
        """Organizations this process served recently (for the background sweeper)."""
        return self.sweeps.organizations()

    async def sweep_recent(self) -> int:
        """Expire overdue holds of the recently served organizations whose next hold deadline
        or grant expiry has come (SweepSchedule.run); returns how many holds expired."""
        return await self.sweeps.run(self.store.sweep)

    # -- operations ---------------------------------------------------------------------------

    async def reserve(
        self,
        account: AccountRef,
        items: Sequence[ReserveItem],
        *,
        batch: bool = False,
        job_id: str = "",
    ) -> ReserveOutcome:
        """Hold each item's worst case against the account (and its caps), all or nothing; with
        ``job_id``, against that approved job's room (never in degraded mode). An item with a
        job spec holds exactly the spec's preview total, pinned to the card (a job's steps: to
        the job's card, engine/jobs.py)."""
        settings = self.settings
        check_account(account, settings.allowed_org_set)
        check_optional_id("job_id", job_id, CALLER_ID_MAX)
        if batch:
            check_batch_size(len(items), settings.max_batch_items)
        org = account.organization
        version = self.jobs.pinned(org, job_id)
        resolved, quotes, priced = await self._resolve(org, items, batch, version)
        default_ttl = settings.default_ttl_ms

        def hold() -> Awaitable[ReserveOutcome]:
            # Reads ``resolved`` when called: a retry holds the items as priced again.
            return self.store.reserve(account, resolved, default_ttl_ms=default_ttl, job_id=job_id)

        try:
            try:
                outcome = await self.hydrator.hydrating(org, hold)
            except RateCardMismatch as exc:
                version = self.jobs.repin(org, job_id, exc, bool(priced))
                resolved, quotes, priced = await self._resolve(org, items, batch, version)
                outcome = await self.hydrator.hydrating(org, hold)
        except (ReplicationUnconfirmed, Rebuilding):
            # Redis answered: the primary ran it (a local decision as well would count it
            # twice), or it is fenced for a moment (a retry is served): nothing to degrade.
            raise
        except StoreUnavailable as exc:
            if self.degraded is None or len(resolved) != 1 or job_id:
                raise  # a job's steps draw from its room, which only Redis holds
            item = resolved[0]
            if not item.ttl_ms:
                item = replace(item, ttl_ms=default_ttl)
            return replace(self.degraded.reserve(account, item, exc), quotes=quotes)
        self.sweeps.seen(org, min(it.ttl_ms or default_ttl for it in resolved))
        # A replay of a hold priced before a rate card reload keeps its pinned price: answer
        # the quote of the version it pinned, which is the one its commit must name.
        for i in priced:
            hold_view, quote = outcome.holds[i], quotes[i]
            if quote and hold_view.rate_card_version != quote.rate_card_version:
                pinned = self.card(hold_view.rate_card_version)
                quotes[i] = preview(pinned, org, items[i].job, field="job")
        return replace(outcome, quotes=quotes)

    async def _resolve(
        self, org: str, items: Sequence[ReserveItem], batch: bool, version: str | None
    ) -> tuple[list[ReserveItem], list[Quote | None], list[int]]:
        """The items checked, those with a job spec priced with ``version`` (None: the current
        card); their quotes, and where the priced ones are."""
        min_ttl, max_ttl = self.settings.min_ttl_ms, self.settings.max_ttl_ms
        resolved = []
        quotes: list[Quote | None] = []
        priced: list[int] = []
        seen: set[str] = set()
        for i, it in enumerate(items):
            at = i if batch else None
            check_reservation_id(it.reservation_id, seen, item=at)
            check_step(it, min_ttl, max_ttl, item=at)
            quote = None
            if it.job is not None:
                quote = await self.price_job(org, it.job, field_path(at, "job"), version)
                it = check_step(_from_quote(it, quote), min_ttl, max_ttl, priced=True, item=at)
                priced.append(i)
            resolved.append(it)
            quotes.append(quote)
        check_total(it.amount_uecu for it in resolved)
        return resolved, quotes, priced

    async def preview(
        self, account: AccountRef, job: JobSpec
    ) -> tuple[Quote, int | None, JobAccuracy | None]:
        """The worst case of ``job`` for the account, its available balance (None when the
        organization has no account) and the accuracy of its closed jobs of the job's type
        (None: none closed yet), for the expected cost. No side effects beyond sweeping
        overdue holds."""
        check_account(account, self.settings.allowed_org_set)
        quote = await self.price_job(account.organization, job, "job")
        try:
            balance = await self.hydrator.hydrating(
                account.organization, lambda: self.store.balance(account.organization)
            )
        except AccountNotFound:
            return quote, None, None
        accuracy = balance.job_accuracy.get(job_type_of(job).value)
        return quote, balance.available_uecu, accuracy if accuracy and accuracy.jobs else None

    def card(self, version: str | None = None) -> RateCard:
        """The rate card of ``version`` (None: the current one)."""
        if self.rates is None:
            raise NoRateCard("no rate card is configured (set ECU_RATE_CARD_FILE)")
        return self.rates.current if version is None else self.rates.get(version)

    async def price_job(
        self, org: str, job: JobSpec, field: str, version: str | None = None
    ) -> Quote:
        """The worst case of ``job`` under the card of ``version`` (None: the current one)."""
        card = self.card(version)
        if _text_size(job) > _INLINE_PRICING_CHARS:
            # tiktoken releases the GIL: a long prompt is counted off the event loop.
            call = functools.partial(preview, card, org, job, field=field)
            return await asyncio.get_running_loop().run_in_executor(self.pricing_executor, call)
        return preview(card, org, job, field=field)

    async def approve_job(self, account: AccountRef, approval: JobApproval) -> JobView:
        """Open an approved job holding its amount (JobDesk.approve); idempotent on its id."""
        return await self.jobs.approve(account, approval)

    async def job(self, org: str, job_id: str, op: str = "get") -> JobView:
        """``get``, ``touch`` (heartbeat) or ``close`` a job (JobDesk.run)."""
        return await self.jobs.run(org, job_id, op)

    async def commit(
        self, org: str, items: Sequence[CommitItem], *, batch: bool = False
    ) -> list[CommitOutcome]:
        """Settle holds with their actual costs; each item succeeds or fails on its own."""
        return (await self.commit_batch(org, items, batch=batch)).outcomes

    async def commit_batch(
        self, org: str, items: Sequence[CommitItem], *, batch: bool = True
    ) -> CommitBatchOutcome:
        """Like commit, also answering the available balance after the whole batch."""
        settings = self.settings
        check_org("organization", org, settings.allowed_org_set)
        if batch:
            check_batch_size(len(items), settings.max_batch_items)
        resolved: list[CommitItem] = []
        quotes: list[Quote | None] = []
        seen: set[str] = set()
        for i, it in enumerate(items):
            at = i if batch else None
            check_reservation_id(it.reservation_id, seen, item=at)
            quote = None
            if it.usage_lines is not None:
                check_usage_lines(it, item=at)
                card = self.card(it.rate_card_version)
                quote = price_usage(card, org, it.usage_lines, field=field_path(at, "usage_lines"))
                it = check_commit(_priced_commit(it, quote), priced=True, item=at)
            else:
                check_commit(it, item=at)
            resolved.append(it)
            quotes.append(quote)
        items = resolved
        check_total(it.actual_uecu for it in items)
        pct = self.settings.overage_max_percent
        try:
            outcome = await self.hydrator.hydrating(org, lambda: self.store.commit(org, items, pct))
        except (ReplicationUnconfirmed, Rebuilding):
            # Redis answered: the primary ran it (a local decision as well would count it
            # twice), or it is fenced for a moment (a retry is served): nothing to degrade.
            raise
        except StoreUnavailable:
            if self.degraded is None:
                raise
            outcome = self.degraded.commit(org, items)
        else:
            if any(isinstance(o.error, HoldNotFound) for o in outcome.outcomes):
                outcome = await self._commit_unknown(org, items, outcome)
        self.sweeps.seen(org)
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
        settled by the ledger's record (Hydrator.settle_commits)."""
        if self.degraded is not None:
            outcome = self.degraded.commit_unreplayed(org, items, outcome)
        if self.ledger is not None and any(
            isinstance(o.error, HoldNotFound) for o in outcome.outcomes
        ):
            outcome = await self.hydrator.settle_commits(org, items, outcome)
        return outcome

    async def release(self, org: str, reservation_id: str) -> ReleaseOutcome:
        """Void a hold; its amount returns to available."""
        check_org("organization", org, self.settings.allowed_org_set)
        check_id("reservation_id", reservation_id, CALLER_ID_MAX)
        try:
            return await self.hydrator.hydrating(
                org, lambda: self.store.release(org, reservation_id)
            )
        except (ReplicationUnconfirmed, Rebuilding):
            # Redis answered: the primary ran it (a local decision as well would count it
            # twice), or it is fenced for a moment (a retry is served): nothing to degrade.
            raise
        except (StoreUnavailable, HoldNotFound):
            # Redis down, or up again before this local hold was replayed: the journal has it.
            local = self.degraded.release(org, reservation_id) if self.degraded else None
            if local is None:
                raise  # a hold that lives in Redis expires there if nobody releases it
            return local

    async def extend(
        self, org: str, reservation_id: str, ttl_ms: int, sequence: int
    ) -> ExtendOutcome:
        """Push a live hold's deadline to now + ttl (heartbeat number ``sequence``)."""
        check_org("organization", org, self.settings.allowed_org_set)
        check_id("reservation_id", reservation_id, CALLER_ID_MAX)
        settings = self.settings
        ttl = check_ttl("ttl_ms", ttl_ms, settings.min_ttl_ms, settings.max_ttl_ms)
        check_sequence(sequence)
        outcome = await self.hydrator.hydrating(
            org, lambda: self.store.extend(org, reservation_id, ttl, sequence)
        )
        self.sweeps.seen(org)
        return outcome

    async def balance(self, org: str) -> Balance:
        """The organization's wallet, hold counters and caps."""
        check_org("organization", org, self.settings.allowed_org_set)
        return await self.hydrator.hydrating(org, lambda: self.store.balance(org))

    async def grant(
        self, org: str, grant_id: str, amount_uecu: int, kind: GrantKind, expires_at_ms: int = 0
    ) -> GrantOutcome:
        """Credit an organization with a caller-chosen, idempotent grant id."""
        check_org("organization", org, self.settings.allowed_org_set)
        check_id("grant_id", grant_id, CALLER_ID_MAX)
        check_amount("amount_uecu", amount_uecu)
        check_grant_kind(kind)
        check_expiry(expires_at_ms)
        if self.ledger is None:
            return await self.store.grant(org, grant_id, amount_uecu, kind, expires_at_ms)
        return await grant_ledger_first(
            self.store, self.ledger, self.hydrator, org, grant_id, amount_uecu, kind, expires_at_ms
        )

    async def set_cap(
        self, org: str, scope: str, scope_id: str, cap_uecu: int | None
    ) -> ScopeUsage:
        """Set (or with None clear) a team or project cap."""
        check_org("organization", org, self.settings.allowed_org_set)
        check_scope(scope)
        check_id("id", scope_id)
        check_cap(cap_uecu)
        return await self.hydrator.hydrating(
            org, lambda: self.store.set_cap(org, scope, scope_id, cap_uecu)
        )

    async def set_auto_topup(self, org: str, threshold_uecu: int | None, amount_uecu: int) -> None:
        """Configure (None: turn off) when an auto_topup_requested notification fires, and for
        how much."""
        check_org("organization", org, self.settings.allowed_org_set)
        if threshold_uecu is not None:
            check_amount("threshold_uecu", threshold_uecu)
            check_amount("amount_uecu", amount_uecu)
        await self.hydrator.hydrating(
            org, lambda: self.store.set_auto_topup(org, threshold_uecu, amount_uecu)
        )
