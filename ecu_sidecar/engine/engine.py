"""The reservation engine: validates every request, then makes exactly one store call.

The engine is what the gRPC service and the CLI call; it knows nothing of gRPC or Redis.
Around that one call: an organization Redis lost is rebuilt from the ledger (hydrator), grants
go to the ledger first (grants), Redis unreachable may be answered locally (degraded), and
every organization served is scheduled for the background sweeper (sweep).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any

from ecu_sidecar.engine.degraded import DegradedMode
from ecu_sidecar.engine.grants import GrantLedger, grant_ledger_first
from ecu_sidecar.engine.hydrator import Hydrator
from ecu_sidecar.engine.journal import Journal
from ecu_sidecar.engine.sweep import SweepSchedule
from ecu_sidecar.errors import (
    AccountNotFound,
    HoldNotFound,
    InvalidArgument,
    OrganizationNotAllowed,
    Rebuilding,
    ReplicationUnconfirmed,
    StoreUnavailable,
)
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

__all__ = ["QuotaEngine"]

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
        """Rebuilds from the ledger (with its deadline and negative cache)."""
        self.degraded = (
            DegradedMode(journal, store, settings, self.hydrator) if journal is not None else None
        )
        """Local decisions while Redis is unreachable, and their replay (None: fail closed)."""
        self.sweeps = SweepSchedule(settings.sweep_interval_ms, settings.sweep_max_orgs, clock)
        """The organizations served recently, for the background sweeper."""

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
            outcome = await self.hydrator.hydrating(
                account.organization,
                lambda: self.store.reserve(account, resolved, default_ttl_ms=default_ttl),
            )
        except (ReplicationUnconfirmed, Rebuilding):
            # Redis answered: the primary ran it (a local decision as well would count it
            # twice), or it is fenced for a moment (a retry is served): nothing to degrade.
            raise
        except StoreUnavailable as exc:
            if self.degraded is None or len(resolved) != 1:
                raise
            item = resolved[0]
            if not item.ttl_ms:
                item = replace(item, ttl_ms=default_ttl)
            return replace(self.degraded.reserve(account, item, exc), quotes=quotes)
        self.sweeps.seen(account.organization, min(it.ttl_ms or default_ttl for it in resolved))
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
            balance = await self.hydrator.hydrating(
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
        self._org("organization", org)
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
        outcome = await self.hydrator.hydrating(
            org, lambda: self.store.extend(org, reservation_id, ttl, sequence)
        )
        self.sweeps.seen(org)
        return outcome

    async def balance(self, org: str) -> Balance:
        """The organization's wallet, hold counters and caps."""
        self._org("organization", org)
        return await self.hydrator.hydrating(org, lambda: self.store.balance(org))

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
        return await grant_ledger_first(
            self.store, self.ledger, self.hydrator, org, grant_id, amount_uecu, kind, expires_at_ms
        )

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
        return await self.hydrator.hydrating(
            org, lambda: self.store.set_cap(org, scope, scope_id, cap_uecu)
        )

    async def set_auto_topup(self, org: str, threshold_uecu: int | None, amount_uecu: int) -> None:
        """Configure (None: turn off) when an auto_topup_requested notification fires, and for
        how much."""
        self._org("organization", org)
        if threshold_uecu is not None:
            check_amount("threshold_uecu", threshold_uecu)
            check_amount("amount_uecu", amount_uecu)
        await self.hydrator.hydrating(
            org, lambda: self.store.set_auto_topup(org, threshold_uecu, amount_uecu)
        )
