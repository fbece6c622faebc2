"""The ledger repository on SQLite (a file in tmp_path) and on a real PostgreSQL.

Each PostgreSQL test runs in a schema of its own, created and dropped by the fixture. Without
PostgreSQL on 127.0.0.1:5432 those tests skip, unless ECU_REQUIRE_SERVICES is set: then they
fail. Expected figures are computed here, from the generated events, without the ledger.
"""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import random
import threading
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from ecu_sidecar.errors import IdempotencyConflict
from ecu_sidecar.ledger import (
    DAY_MS,
    MIGRATIONS,
    AutoTopup,
    GrantConflict,
    Ledger,
    LedgerArgumentError,
    LedgerUnavailable,
    Migration,
    SchemaAhead,
    SchemaBehind,
    SchemaModified,
    WriteResult,
    open_ledger,
)
from ecu_sidecar.model import JobType, LedgerAccount
from tests.conftest import (  # noqa: F401
    PG_URL,
    Database,
    own_pg_database,
    pg_read_only,
    require_postgres,
)

#: 2024-12-29 00:00 UTC: generated traffic crosses a month and a year boundary.
T0 = int(dt.datetime(2024, 12, 29, tzinfo=dt.UTC).timestamp() * 1000)
OVERAGE_PCT = 20


class Clock:
    """A frozen clock in ms; tests move it by hand."""

    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ledger(database: Database, clock: Clock) -> Iterator[Ledger]:
    led = open_ledger(database.url, clock=clock, pool_size=8)
    led.migrate()
    yield led
    led.close()


# ---------------------------------------------------------------------- traffic generator


@dataclass
class Sim:
    """Seeded random outbox traffic of a few organizations, as the Lua scripts emit it,
    including the burn order and grant expiry (simulated commit by commit)."""

    seed: int
    orgs: tuple[str, ...] = ("acme", "globex", "initech")
    now: int = T0
    events: list[dict[str, str]] = field(default_factory=list)
    rests: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(dict))
    expiries: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(dict))
    caps: dict[tuple[str, str, str], int | None] = field(default_factory=dict)
    n: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def emit(self, org: str, etype: str, eid: str, **fields: Any) -> None:
        self.sweep(org)
        ev = {"type": etype, "eid": eid, "org": org, "ts": str(self.now)}
        ev.update({k: str(v) for k, v in fields.items()})
        self.events.append(ev)
        self.now += self.rng.randrange(1, 3 * 3_600_000)

    def sweep(self, org: str) -> None:
        for gid, exp in sorted(self.expiries[org].items(), key=lambda x: (x[1], x[0])):
            if exp <= self.now:
                rest = self.rests[org].pop(gid, 0)
                del self.expiries[org][gid]
                if rest > 0:
                    ev = {"type": "grant_expire", "eid": f"grant_expire:{gid}", "org": org,
                          "ts": str(self.now), "grant_id": gid, "amount": str(rest)}  # fmt: skip
                    self.events.append(ev)

    def grant(self, org: str, amount: int, kind: str = "top_up", ttl_ms: int = 0) -> None:
        self.n += 1
        gid = f"g{self.n}"
        expires = self.now + ttl_ms if ttl_ms else 0
        self.emit(org, "grant", f"grant:{gid}", grant_id=gid, amount=amount, kind=kind,
                  expires_at=expires)  # fmt: skip
        if expires:
            self.rests[org][gid] = amount
            self.expiries[org][gid] = expires

    def burn(self, org: str, amount: int) -> None:
        for gid, _ in sorted(self.expiries[org].items(), key=lambda x: (x[1], x[0])):
            take = min(self.rests[org][gid], amount)
            self.rests[org][gid] -= take
            amount -= take
            if self.rests[org][gid] == 0:
                del self.rests[org][gid]
                del self.expiries[org][gid]
            if amount == 0:
                return

    def attribution(self) -> dict[str, str]:
        r = self.rng
        return {
            "team": r.choice(["research", "eval", ""]),
            "project": r.choice(["p1", "p2", "p3", ""]),
            "user": r.choice(["ann", "bob", "cy"]),
            "job": r.choice([j.value for j in JobType]),
            "model": r.choice(["gpt-4o", "claude-3", "llama-3"]),
        }

    def hold_cycle(self, org: str) -> None:
        r = self.rng
        self.n += 1
        rid = f"r{self.n}"
        hold = r.randrange(1, 5_000_000)
        attr = self.attribution()
        self.emit(org, "reserve", f"reserve:{rid}", rid=rid, amount=hold,
                  deadline=self.now + 60_000, **attr)  # fmt: skip
        what = r.random()
        if what < 0.08:
            self.emit(org, "release", f"release:{rid}", rid=rid, amount=hold, **attr)
            return
        if what < 0.12:
            return  # outstanding
        if r.random() < 0.2:
            self.emit(org, "extend", f"extend:{rid}:1", rid=rid, deadline=self.now + 90_000,
                      sequence=1)  # fmt: skip
        late = what < 0.2
        if late:
            self.emit(org, "expire", f"expire:{rid}", rid=rid, amount=hold, **attr)
        actual = r.randrange(0, hold * 3 // 2 + 1)
        billed = min(actual, hold + hold * OVERAGE_PCT // 100)
        fields = {
            "rid": rid,
            "amount": hold,
            "actual": actual,
            "committed": billed,
            "released": 0 if late else hold - min(billed, hold),
            "overage": 0 if late else max(0, billed - hold),
            "unbilled": actual - billed,
            "late": int(late),
            "tokens_in": r.randrange(0, 100_000),
            "tokens_out": r.randrange(0, 20_000),
            "calls": r.randrange(0, 5),
            **attr,
        }
        if r.random() < 0.3:
            fields["rcv"] = "2025-01"
            fields["lines"] = json.dumps([{"kind": "tokens_in", "uecu": billed}])
        self.emit(org, "commit", f"commit:{rid}", **fields)
        self.burn(org, billed)

    def run(self, steps: int, starter: int = 20_000_000, starter_days: int = 20) -> Sim:
        for org in self.orgs:
            ttl = self.rng.randrange(5, starter_days) * DAY_MS
            self.grant(org, starter, "starter", ttl_ms=ttl)
            self.grant(org, 200_000_000)
        return self.steps(steps)

    def steps(self, steps: int) -> Sim:
        for _ in range(steps):
            org = self.rng.choice(self.orgs)
            x = self.rng.random()
            if x < 0.03:
                self.grant(org, self.rng.randrange(1, 50_000_000), "top_up")
            elif x < 0.06:
                self.grant(org, 30_000_000, "adjustment", ttl_ms=self.rng.randrange(1, 6) * DAY_MS)
            elif x < 0.08:
                scope = self.rng.choice(["team", "project"])
                sid = self.rng.choice(["research", "eval"] if scope == "team" else ["p1", "p2"])
                cap = self.rng.choice(["", str(self.rng.randrange(1, 10**9))])
                self.n += 1
                self.emit(org, "cap", f"cap:{scope[0]}:{sid}:{self.now}:{self.n}", scope=scope,
                          scope_id=sid, cap=cap)  # fmt: skip
                self.caps[(org, scope, sid)] = int(cap) if cap else None
            else:
                self.hold_cycle(org)
        return self


def expected_totals(events: list[dict[str, str]], org: str) -> dict[str, int]:
    """Money figures of one organization, straight from the event dicts."""
    out = {"granted": 0, "expired": 0, "committed": 0, "events": 0}
    for e in events:
        if e["org"] != org:
            continue
        out["events"] += 1
        if e["type"] == "grant":
            out["granted"] += int(e["amount"])
        elif e["type"] == "grant_expire":
            out["expired"] += int(e["amount"])
        elif e["type"] == "commit":
            out["committed"] += int(e["committed"])
    out["balance"] = out["granted"] - out["expired"] - out["committed"]
    return out


def windows(events: list[dict[str, str]], size: int, step: int) -> list[list[dict[str, str]]]:
    """Overlapping batches: [0:size], [step:step+size], … covering every event."""
    return [events[i : i + size] for i in range(0, len(events), step)]


def assert_matches(ledger: Ledger, sim: Sim) -> None:
    for org in sim.orgs:
        exp = expected_totals(sim.events, org)
        acct = ledger.account(org)
        assert acct is not None
        got = (acct.granted_uecu, acct.expired_grants_uecu, acct.committed_uecu)
        assert got == (exp["granted"], exp["expired"], exp["committed"])
        assert acct.balance_uecu == exp["balance"] == ledger.balance(org)
        cons = ledger.conservation(org)
        assert cons is not None and cons.ok, cons


def count_rows(ledger: Ledger, table: str) -> int:
    with ledger.backend.transaction(write=False) as tx:
        return tx.rows(f"SELECT COUNT(*) FROM {table}")[0][0]


# ---------------------------------------------------------------------- migrations


def test_migrations_apply_once_and_are_idempotent(database: Database) -> None:
    with open_ledger(database.url) as led:
        assert led.schema_version() == 0
        with pytest.raises(SchemaBehind, match="no schema"):
            led.check_schema()
        assert led.migrate() == [m.version for m in MIGRATIONS]
        assert led.migrate() == []
        led.check_schema()
        assert led.schema_version() == len(MIGRATIONS)


def test_check_schema_detects_missing_unknown_and_edited_migrations(database: Database) -> None:
    extra = Migration(len(MIGRATIONS) + 1, "test extra", ("CREATE TABLE extra_t (x BIGINT)",))
    with (
        open_ledger(database.url) as old,
        open_ledger(database.url, migrations=(*MIGRATIONS, extra)) as new,
    ):
        old.migrate()
        with pytest.raises(
            SchemaBehind, match=f"migration\\(s\\) {extra.version} not applied"
        ) as e:
            new.check_schema()
        assert e.value.versions == (extra.version,)
        assert new.migrate() == [extra.version]
        new.check_schema()
        with pytest.raises(SchemaAhead, match="does not know"):
            old.check_schema()
        with pytest.raises(SchemaAhead):
            old.migrate()
    edited = Migration(extra.version, "test extra", ("CREATE TABLE extra_t (y BIGINT)",))
    with open_ledger(database.url, migrations=(*MIGRATIONS, edited)) as led:
        with pytest.raises(SchemaModified, match="checksum"):
            led.check_schema()
    database.execute("DELETE FROM schema_migrations WHERE version = 1")
    with open_ledger(database.url, migrations=(*MIGRATIONS, extra)) as led:
        with pytest.raises(SchemaBehind) as e:
            led.check_schema()
    assert e.value.versions == (1,)


def test_concurrent_migrate_applies_each_migration_once(database: Database) -> None:
    ledgers = [open_ledger(database.url, timeout_s=30) for _ in range(4)]
    barrier = threading.Barrier(len(ledgers))
    results: list[list[int]] = []
    errors: list[BaseException] = []

    def run(led: Ledger) -> None:
        barrier.wait()
        try:
            results.append(led.migrate())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(led,)) for led in ledgers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for led in ledgers:
        led.close()
    assert not errors
    assert sorted(results) == [[], [], [], [m.version for m in MIGRATIONS]]


# ---------------------------------------------------------------------- exactly once


def test_same_batch_twice_is_applied_once(ledger: Ledger) -> None:
    sim = Sim(seed=1).run(150)
    first = ledger.write_events(sim.events)
    assert first == WriteResult(inserted=len(sim.events), duplicates=0, quarantined=0)
    again = ledger.write_events(sim.events)
    assert again == WriteResult(inserted=0, duplicates=len(sim.events), quarantined=0)
    assert count_rows(ledger, "events") == len(sim.events)
    commits = [e for e in sim.events if e["type"] == "commit"]
    assert count_rows(ledger, "usage_entries") == len(commits)
    assert_matches(ledger, sim)


def test_a_batch_larger_than_any_statement_chunk_is_applied_once(ledger: Ledger) -> None:
    """Thousands of events in one call: one bulk statement per table on PostgreSQL, several
    multi-row statements on SQLite; the same rows either way, and once."""
    sim = Sim(seed=11).run(1_500)
    assert len(sim.events) > 2_000
    first = ledger.write_events(sim.events)
    assert first == WriteResult(inserted=len(sim.events), duplicates=0, quarantined=0)
    assert ledger.write_events(sim.events[::-1]).duplicates == len(sim.events)
    assert count_rows(ledger, "events") == len(sim.events)
    holds = [e for e in sim.events if e["type"] in ("reserve", "extend", "release", "expire")]
    assert count_rows(ledger, "hold_events") == len(holds)
    assert_matches(ledger, sim)


def test_events_validated_ahead_write_as_the_entries_would(ledger: Ledger) -> None:
    """parse_events validates a batch without the database (the flusher does it while the
    previous batch is written); write_events takes the result as it takes the entries."""
    sim = Sim(seed=12).run(120)
    bad = [{"type": "refund", "eid": "refund:1", "org": "acme", "ts": "13"}]
    half = len(sim.events) // 2
    parsed = ledger.parse_events(sim.events[:half] + bad)
    assert len(parsed) == half + 1
    assert ledger.write_events(parsed) == WriteResult(half, 0, 1)
    assert ledger.write_events(parsed) == WriteResult(0, half, 1)
    assert ledger.write_events(sim.events) == WriteResult(len(sim.events) - half, half, 0)
    assert ledger.write_events(ledger.parse_events([])) == WriteResult(0, 0, 0)
    assert_matches(ledger, sim)


def test_overlapping_batches_in_any_order_give_the_same_ledger(ledger: Ledger) -> None:
    sim = Sim(seed=2).run(200)
    batches = windows(sim.events, size=40, step=25)
    random.Random(2).shuffle(batches)
    results = [ledger.write_events(b) for b in batches]
    assert sum(r.inserted for r in results) == len(sim.events)
    assert sum(r.duplicates for r in results) == sum(len(b) for b in batches) - len(sim.events)
    assert_matches(ledger, sim)


def _write_all(url: str, batches: list[list[dict[str, str]]], barrier: Any) -> WriteResult:
    with open_ledger(url, timeout_s=60) as led:
        barrier.wait()
        results = [led.write_events(b) for b in batches]
    return WriteResult(
        sum(r.inserted for r in results),
        sum(r.duplicates for r in results),
        sum(r.quarantined for r in results),
    )


def test_concurrent_writers_on_threads_apply_each_event_once(
    database: Database, ledger: Ledger
) -> None:
    sim = Sim(seed=3).run(400)
    # Four flushers: overlapping windows, in different orders, all at once.
    plans = []
    for k in range(4):
        batches = windows(sim.events, size=30 + 7 * k, step=20 + 3 * k)
        random.Random(k).shuffle(batches)
        plans.append(batches)
    barrier = threading.Barrier(len(plans))
    results: list[WriteResult] = []
    errors: list[BaseException] = []

    def run(batches: list[list[dict[str, str]]]) -> None:
        try:
            results.append(_write_all(database.url, batches, barrier))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(p,)) for p in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sum(r.inserted for r in results) == len(sim.events)
    assert sum(r.quarantined for r in results) == 0
    submitted = sum(len(b) for p in plans for b in p)
    assert sum(r.duplicates for r in results) == submitted - len(sim.events)
    assert count_rows(ledger, "events") == len(sim.events)
    assert_matches(ledger, sim)


def _process_writer(url: str, batches: list[list[dict[str, str]]], barrier: Any, out: Any) -> None:
    out.put(_write_all(url, batches, barrier))


def test_concurrent_writers_in_processes_apply_each_event_once(
    database: Database, ledger: Ledger
) -> None:
    sim = Sim(seed=4).run(300)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    out = ctx.Queue()
    plans = [windows(sim.events, 50, 30), list(reversed(windows(sim.events, 45, 20)))]
    procs = [
        ctx.Process(target=_process_writer, args=(database.url, p, barrier, out)) for p in plans
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert sum(r.inserted for r in results) == len(sim.events)
    assert_matches(ledger, sim)


# ---------------------------------------------------------------------- conservation


def test_conservation_holds_and_detects_injected_inconsistencies(
    database: Database, ledger: Ledger
) -> None:
    sim = Sim(seed=5).run(200)
    ledger.write_events(sim.events)
    # Pending (ledger-first, Redis has not applied it): counted nowhere, not even in the sums
    # the conservation query checks the totals against.
    ledger.grant("acme", "ledger-first", 1_000, "adjustment")
    for org in sim.orgs:
        cons = ledger.conservation(org)
        assert cons is not None and cons.ok
        exp = expected_totals(sim.events, org)
        assert cons.granted_uecu == cons.grants_sum_uecu == exp["granted"]
        assert cons.expired_grants_uecu == exp["expired"]
        assert cons.committed_uecu == cons.usage_sum_uecu == exp["committed"]
        assert cons.balance_uecu == exp["balance"]
        assert cons.granted_uecu - cons.expired_grants_uecu == (
            cons.committed_uecu + cons.balance_uecu
        )
    assert ledger.conservation("nobody") is None

    database.execute(
        "UPDATE usage_entries SET amount_uecu = amount_uecu + 7 WHERE org_id = ? AND event_id = ?",
        (
            "acme",
            next(e["eid"] for e in sim.events if e["org"] == "acme" and e["type"] == "commit"),
        ),
    )
    cons = ledger.conservation("acme")
    assert cons is not None and not cons.ok
    assert cons.usage_difference_uecu == 7 and cons.balance_difference_uecu == 0

    database.execute("UPDATE organizations SET balance_uecu = balance_uecu - 3 WHERE org_id = ?",
                     ("globex",))  # fmt: skip
    cons = ledger.conservation("globex")
    assert cons is not None and not cons.ok and cons.balance_difference_uecu == 3

    database.execute("DELETE FROM grant_expiries WHERE org_id = ?", ("initech",))
    cons = ledger.conservation("initech")
    exp = expected_totals(sim.events, "initech")
    assert cons is not None and cons.expiries_difference_uecu == -exp["expired"]
    assert cons.ok is (exp["expired"] == 0)


# ---------------------------------------------------------------------- reports


def _period_start(ts: int, period: str) -> int:
    d = dt.datetime.fromtimestamp(ts / 1000, tz=dt.UTC)
    d = d.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "month":
        d = d.replace(day=1)
    return int(d.timestamp() * 1000)


@pytest.mark.parametrize("period", ["day", "month"])
@pytest.mark.parametrize("by", [None, "team", "project", "user", "model", "job_type"])
def test_consumption_equals_sums_computed_from_the_events(
    ledger: Ledger, by: str | None, period: str
) -> None:
    sim = Sim(seed=6).run(300)
    ledger.write_events(sim.events)
    key_field = {None: None, "user": "user", "job_type": "job"}.get(by, by)
    commits = [e for e in sim.events if e["type"] == "commit" and e["org"] == "globex"]
    start = T0 + 10 * DAY_MS
    end = T0 + 40 * DAY_MS
    for lo, hi in ((None, None), (start, end)):
        expected: dict[tuple[int, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
        for e in commits:
            ts = int(e["ts"])
            if (lo is not None and ts < lo) or (hi is not None and ts >= hi):
                continue
            row = expected[(_period_start(ts, period), e[key_field] if key_field else "")]
            for i, f in enumerate(("committed", "tokens_in", "tokens_out", "calls")):
                row[i] += int(e[f])
            row[4] += 1
        rows = ledger.consumption("globex", by=by, period=period, start_ms=lo, end_ms=hi)
        got = {
            (r.period_start_ms, r.key): [
                r.amount_uecu,
                r.tokens_in,
                r.tokens_out,
                r.calls,
                r.events,
            ]
            for r in rows
        }
        assert got == dict(expected)
        assert [(r.period_start_ms, r.key) for r in rows] == sorted(expected)
    if period == "month":
        months = {r.period_start_ms for r in ledger.consumption("globex", period="month")}
        assert _period_start(T0, "month") in months and len(months) >= 2


def test_top_consumers_balance_and_forecast(ledger: Ledger, clock: Clock) -> None:
    sim = Sim(seed=7).run(300)
    ledger.write_events(sim.events)
    commits = [e for e in sim.events if e["type"] == "commit" and e["org"] == "acme"]
    per_model: dict[str, int] = defaultdict(int)
    for e in commits:
        per_model[e["model"]] += int(e["committed"])
    top = ledger.top_consumers("acme", by="model", limit=2)
    expected = sorted(per_model.items(), key=lambda kv: (-kv[1], kv[0]))[:2]
    assert [(r.key, r.amount_uecu) for r in top] == expected
    assert len(ledger.top_consumers("acme", by="job-type", limit=100)) == len(
        {e["job"] for e in commits}
    )

    balance = expected_totals(sim.events, "acme")["balance"]
    assert ledger.balance("acme") == balance
    now = int(sim.events[-1]["ts"]) + 1
    used = sum(int(e["committed"]) for e in commits if now - 7 * DAY_MS <= int(e["ts"]) < now)
    fc = ledger.forecast("acme", trailing_days=7, now_ms=now)
    assert fc.balance_uecu == balance
    assert fc.daily_rate_uecu == used // 7
    assert fc.runs_out_at_ms == now + balance * DAY_MS // (used // 7)
    clock.now = now + 365 * DAY_MS  # nothing consumed in the window: no forecast
    assert ledger.forecast("acme").runs_out_at_ms is None
    assert ledger.forecast("nobody", now_ms=now).runs_out_at_ms == now  # balance 0: out now


def test_report_arguments_are_checked(ledger: Ledger) -> None:
    with pytest.raises(LedgerArgumentError, match="by: expected one of"):
        ledger.consumption("acme", by="org; DROP TABLE events")
    with pytest.raises(LedgerArgumentError, match="period"):
        ledger.consumption("acme", period="week")
    with pytest.raises(LedgerArgumentError, match="limit"):
        ledger.top_consumers("acme", by="team", limit=0)
    assert ledger.consumption("nobody") == []


# ---------------------------------------------------------------------- hydration data


def test_account_has_what_redis_needs(ledger: Ledger) -> None:
    sim = Sim(seed=8).run(0, starter=300_000_000, starter_days=60)
    written = 0
    saw_rests = saw_expiries = 0
    for _ in range(4):  # check the hydration data at several points of the traffic
        sim.steps(120)
        batches = windows(sim.events[written:], 60, 60)
        random.Random(written).shuffle(batches)  # caps come out newest-wins in any order
        for b in batches:
            ledger.write_events(b)
        written = len(sim.events)
        for org in sim.orgs:
            acct = ledger.account(org)
            assert acct is not None
            # The burn order replayed by the ledger equals the commit-by-commit simulation.
            rests = [(g, sim.expiries[org][g], r) for g, r in sim.rests[org].items() if r]
            assert acct.expiring_grants == sorted(rests, key=lambda t: (t[1], t[0]))
            saw_rests += len(rests)
            saw_expiries += sum(g.expired_uecu is not None for g in acct.grants)
    assert saw_rests > 3 and saw_expiries > 3  # the scenario did exercise the burn order
    ledger.set_auto_topup("acme", 1_000_000, 50_000_000)
    assert set(ledger.organizations()) == set(sim.orgs)
    for org in sim.orgs:
        acct = ledger.account(org)
        assert acct is not None
        org_events = [e for e in sim.events if e["org"] == org]
        assert acct.generation == sum(e["type"] == "grant" for e in org_events)
        assert acct.last_event_at_ms == max(int(e["ts"]) for e in org_events)
        caps = {(s.scope, s.scope_id): s.cap_uecu for s in acct.scopes}
        for (o, scope, sid), cap in sim.caps.items():
            if o == org:
                assert caps[(scope, sid)] == cap
        used: dict[tuple[str, str], int] = defaultdict(int)
        for e in org_events:
            if e["type"] == "commit":
                for scope in ("team", "project"):
                    if e[scope]:
                        used[(scope, e[scope])] += int(e["committed"])
        assert {k: s.used_uecu for s in acct.scopes if (k := (s.scope, s.scope_id)) in used} == (
            used
        )
        h = acct.holds
        reserved = sum(int(e["amount"]) for e in org_events if e["type"] == "reserve")
        assert h.reserved_uecu == reserved
        assert h.expired_holds == sum(e["type"] == "expire" for e in org_events)
        settled = {e["rid"] for e in org_events if e["type"] in ("release", "commit", "expire")}
        assert h.outstanding_uecu == sum(
            int(e["amount"])
            for e in org_events
            if e["type"] == "reserve" and e["rid"] not in settled
        )
    assert ledger.auto_topup("acme") is not None
    assert ledger.account("acme").auto_topup.amount_uecu == 50_000_000  # type: ignore[union-attr]
    ledger.set_auto_topup("acme", None)
    assert ledger.auto_topup("acme") is None
    assert ledger.account("nobody") is None and ledger.balance("nobody") == 0


def test_ledger_account_is_the_rebuild_state_of_the_engine_and_flusher(ledger: Ledger) -> None:
    sim = Sim(seed=10).run(0, starter=300_000_000, starter_days=60).steps(150)
    ledger.write_events(sim.events)
    ledger.set_auto_topup("acme", 1_000_000, 50_000_000)
    assert ledger.grant("acme", "pending-1", 7, "top_up") is True  # Redis has not seen it yet
    acct = ledger.account("acme")
    rebuild = ledger.ledger_account("acme")
    assert acct is not None and isinstance(rebuild, LedgerAccount)
    # The grant Redis has not confirmed stays out of the rebuild, listed apart.
    assert rebuild.unconfirmed_grants == [("pending-1", 7, "top_up", 0)]
    assert rebuild.balance_uecu == acct.balance_uecu == ledger.balance("acme")
    assert rebuild.generation == acct.generation
    assert rebuild.expiring_grants == acct.expiring_grants
    assert rebuild.scopes == [(s.scope, s.scope_id, s.cap_uecu, s.used_uecu) for s in acct.scopes]
    assert (rebuild.auto_topup_threshold_uecu, rebuild.auto_topup_amount_uecu) == (
        1_000_000,
        50_000_000,
    )
    grants = {e["grant_id"]: e for e in sim.events if e["type"] == "grant" and e["org"] == "acme"}
    assert {g[0] for g in rebuild.recent_grants} == set(grants)
    for gid, amount, kind, expires in rebuild.recent_grants:
        if gid in grants:
            assert (amount, kind, expires) == (
                int(grants[gid]["amount"]),
                grants[gid]["kind"],
                int(grants[gid]["expires_at"]),
            )
    assert [(g.grant_id, g.state) for g in acct.grants if not g.confirmed] == [
        ("pending-1", "pending")
    ]
    # The holds the ledger records as outstanding are the ones the rebuild restores.
    org_events = [e for e in sim.events if e["org"] == "acme"]
    settled = {e["rid"] for e in org_events if e["type"] in ("release", "commit", "expire")}
    outstanding = {
        e["rid"]: int(e["amount"])
        for e in org_events
        if e["type"] == "reserve" and e["rid"] not in settled
    }
    assert outstanding, "the scenario leaves holds outstanding"
    assert {h.reservation_id: h.amount_uecu for h in rebuild.active_holds} == outstanding
    assert sum(outstanding.values()) == acct.holds.outstanding_uecu
    assert ledger.ledger_account("nobody") is None


def test_balances_are_what_ledger_account_reports_for_many_organizations(
    ledger: Ledger,
) -> None:
    # Grants of every kind, expiries, commits (late ones too), releases and hold expiries.
    sim = Sim(seed=11).run(0, starter=300_000_000, starter_days=60).steps(200)
    ledger.write_events(sim.events)
    assert ledger.grant("acme", "pending-1", 7, "top_up") is True  # Redis has not seen it
    assert ledger.grant("globex", "pending-2", 9, "top_up") is True
    assert ledger.void_grant("globex", "pending-2") is True  # Redis refused it: not pending
    assert ledger.grant("fresh", "only-pending", 5, "top_up") is True  # nothing confirmed
    assert {e["type"] for e in sim.events} >= {"grant_expire", "commit", "release", "expire"}
    assert any(e["type"] == "commit" and e["late"] == "1" for e in sim.events)
    orgs = [*sim.orgs, "fresh", "nobody"]
    got = ledger.balances(orgs)
    assert set(got) == {*sim.orgs, "fresh"}  # an unknown organization is absent
    for org, balance in got.items():
        account = ledger.ledger_account(org)
        assert account is not None
        assert type(balance.balance_uecu) is int
        assert balance.balance_uecu == account.balance_uecu == ledger.balance(org)
        assert balance.unconfirmed_grants is bool(account.unconfirmed_grants)
    assert {o for o, b in got.items() if b.unconfirmed_grants} == {"acme", "fresh"}
    assert got["acme"].balance_uecu > 0
    # Many organizations at once: past one chunk of the IN list.
    many = [f"org-{i:04d}" for i in range(1_200)]
    ledger.write_events(
        [
            {
                "type": "grant",
                "eid": f"grant:{o}",
                "org": o,
                "ts": "10",
                "grant_id": "g",
                "amount": str(1_000 + i),
                "kind": "top_up",
                "expires_at": "0",
            }
            for i, o in enumerate(many)
        ]
    )
    wide = ledger.balances([*many, "acme"])
    assert len(wide) == 1_201 and wide["acme"] == got["acme"]
    assert all(wide[o].balance_uecu == 1_000 + i for i, o in enumerate(many))


def test_a_balance_snapshot_is_due_once_a_day(ledger: Ledger, clock: Clock) -> None:
    ledger.write_events(
        [
            {
                "type": "grant",
                "eid": "grant:g1",
                "org": "acme",
                "ts": "10",
                "grant_id": "g1",
                "amount": "1000",
                "kind": "top_up",
                "expires_at": "0",
            }
        ]
    )
    assert ledger.balances(["acme"])["acme"].snapshot_due is True  # none yet
    ledger.record_snapshot("acme", 1_000, 1_000)
    clock.now += 86_400_000
    assert ledger.balances(["acme"])["acme"].snapshot_due is False  # a day old, not older
    clock.now += 1
    assert ledger.balances(["acme"])["acme"].snapshot_due is True


def test_old_snapshots_are_pruned_in_bounded_batches(ledger: Ledger, clock: Clock) -> None:
    day = 86_400_000
    for org, ago in [("a", 100), ("b", 95), ("a", 91), ("b", 3), ("a", 0)]:
        ledger.record_snapshot(org, 10, 10 + ago, at_ms=clock.now - ago * day)
    assert ledger.prune_snapshots(90 * day, limit=2) == 2  # the batch bounds it
    assert ledger.prune_snapshots(90 * day, limit=2) == 1  # the last old one
    assert ledger.prune_snapshots(90 * day, limit=2) == 0
    kept = sorted((s.organization, s.taken_at_ms) for o in "ab" for s in ledger.snapshots(o))
    assert kept == [("a", clock.now), ("b", clock.now - 3 * day)]
    clock.now += 2 * day
    assert ledger.prune_snapshots(4 * day, limit=100) == 1
    assert ledger.snapshots("b") == []


# ---------------------------------------------------------------------- quarantine


def test_malformed_events_are_quarantined_without_blocking_the_batch(
    database: Database, ledger: Ledger
) -> None:
    good = [
        {"type": "grant", "eid": "grant:g1", "org": "acme", "ts": "10", "grant_id": "g1",
         "amount": "1000", "kind": "top_up", "expires_at": "0"},
        {"type": "reserve", "eid": "reserve:r1", "org": "acme", "ts": "11", "rid": "r1",
         "amount": "100", "team": "", "project": "", "user": "", "job": "gepa", "model": "",
         "deadline": "99"},
    ]  # fmt: skip
    bad = [
        {"type": "grant", "eid": "grant:g2", "org": "acme", "ts": "12", "grant_id": "g2",
         "amount": "ten", "kind": "top_up", "expires_at": "0"},
        {"type": "refund", "eid": "refund:1", "org": "acme", "ts": "13"},
        {"eid": "x", "org": "acme", "ts": "14"},
        {"type": "grant_expire", "eid": "grant_expire:g1", "org": "acme", "ts": "15",
         "grant_id": "g1", "amount": "5"},
        {"type": "reserve", "eid": "reserve:r1", "org": "acme", "ts": "16", "rid": "r1",
         "amount": "999", "team": "", "project": "", "user": "", "job": "gepa", "model": "",
         "deadline": "99"},
    ]  # fmt: skip
    result = ledger.write_events(good + bad)
    assert result == WriteResult(inserted=2, duplicates=0, quarantined=len(bad))
    reasons = [q.reason for q in ledger.quarantined()]
    assert any("'amount': expected an integer" in r for r in reasons)
    assert any("unknown event type 'refund'" in r for r in reasons)
    assert any("'type' is required" in r for r in reasons)
    assert any("grant g1, which never expires" in r for r in reasons)
    assert any("repeated in the batch with other content" in r for r in reasons)
    assert ledger.balance("acme") == 1000

    # Redelivered: counted again, stored once.
    assert ledger.write_events(bad).quarantined == len(bad)
    assert len(ledger.quarantined()) == len(bad)
    # An id already recorded, arriving with other content, is not a duplicate.
    reused = {**good[1], "amount": "5", "ts": "20"}
    assert ledger.write_events([reused]) == WriteResult(0, 0, 1)
    assert "already recorded with different content" in ledger.quarantined()[-1].reason

    # An event an older version refused (say, of a type it did not know yet) is applied when
    # the quarantine is retried; what still fails stays, once.
    expire = {"type": "grant_expire", "eid": "grant_expire:g9", "org": "acme", "ts": "30",
              "grant_id": "g9", "amount": "5"}  # fmt: skip
    payload = json.dumps(expire, sort_keys=True)
    database.execute(
        "INSERT INTO quarantine (org_id, event_id, event_type, fingerprint, reason, payload, "
        "quarantined_at_ms) VALUES ('acme', 'grant_expire:g9', 'grant_expire', 'x', "
        "'unknown event type', ?, 1)",
        (payload,),
    )
    retried = ledger.retry_quarantined()
    assert retried == WriteResult(inserted=1, duplicates=0, quarantined=len(bad) + 1)
    assert ledger.balance("acme") == 1000 - 5
    assert not any(q.event_id == "grant_expire:g9" for q in ledger.quarantined())
    assert len(ledger.quarantined()) == len(bad) + 1
    assert ledger.conservation("acme").ok  # type: ignore[union-attr]


def test_text_postgres_cannot_store_is_quarantined_losslessly(ledger: Ledger) -> None:
    raw = {b"type": b"reserve", b"eid": b"reserve:r", b"org": b"acme", b"ts": b"1",
           b"rid": b"r", b"amount": b"1", b"team": b"", b"project": b"", b"user": b"\x00",
           b"job": b"\xff", b"model": b"", b"deadline": b"5"}  # fmt: skip
    assert ledger.write_events([raw]) == WriteResult(0, 0, 1)
    q = ledger.quarantined()[0]
    assert q.fields["user"] == "\x00" and q.event_type == "reserve"
    worse = {**raw, b"org": b"ac\x00me", b"eid": b"\xc3\xa9\x00"}
    assert ledger.write_events([worse]) == WriteResult(0, 0, 1)
    q = ledger.quarantined()[1]
    assert q.organization == "ac\\u0000me" and q.fields["org"] == "ac\x00me"


def test_a_row_the_database_refuses_is_isolated_and_quarantined(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ecu_sidecar.ledger import handlers

    refusal = ledger.backend.refusals[0]
    on_hold = handlers.HANDLERS["reserve"]

    def poisoned(tx: Any, ev: Any, fx: Any) -> str | None:
        if ev.values["rid"] == victim:
            raise refusal("value out of range (injected)")
        return on_hold(tx, ev, fx)

    sim = Sim(seed=11).run(40)
    victim = next(e["rid"] for e in sim.events if e["type"] == "reserve")
    monkeypatch.setitem(handlers.HANDLERS, "reserve", poisoned)
    batch = [*sim.events, {"type": "nope", "eid": "x", "org": "acme", "ts": "1"}]
    result = ledger.write_events(batch)
    assert result.quarantined == 2 and result.inserted == len(sim.events) - 1
    assert ledger.write_events(batch) == WriteResult(0, len(sim.events) - 1, 2)
    q = ledger.quarantined()
    assert any(x.event_id == f"reserve:{victim}" and "refused it" in x.reason for x in q)
    assert_matches(ledger, sim)


# ---------------------------------------------------------------------- grants, notifications


def test_grant_is_idempotent_and_refuses_other_parameters(ledger: Ledger) -> None:
    assert ledger.grant("acme", "welcome-1", 25_000_000, "starter", T0 + DAY_MS) is True
    assert ledger.grant("acme", "welcome-1", 25_000_000, "starter", T0 + DAY_MS) is False
    with pytest.raises(GrantConflict, match="already recorded with amount 25000000") as e:
        ledger.grant("acme", "welcome-1", 1, "starter", T0 + DAY_MS)
    assert isinstance(e.value, IdempotencyConflict)
    with pytest.raises(GrantConflict):
        ledger.grant("acme", "welcome-1", 25_000_000, "top_up", T0 + DAY_MS)
    with pytest.raises(GrantConflict):
        ledger.grant("acme", "welcome-1", 25_000_000, "starter")
    assert ledger.balance("acme") == 0  # pending: Redis has not applied it yet

    # The grant arriving through the outbox (Redis applied it) confirms it and counts it, once.
    ev = {"type": "grant", "eid": "grant:welcome-1", "org": "acme", "ts": str(T0 + 5),
          "grant_id": "welcome-1", "amount": "25000000", "kind": "starter",
          "expires_at": str(T0 + DAY_MS)}  # fmt: skip
    assert ledger.write_events([ev]) == WriteResult(1, 0, 0)
    assert ledger.balance("acme") == 25_000_000
    assert ledger.write_events([ev]) == WriteResult(0, 1, 0)
    assert ledger.balance("acme") == 25_000_000
    acct = ledger.account("acme")
    assert acct is not None and acct.grants[0].granted_at_ms == T0 + 5  # Redis's time
    assert acct.grants[0].state == "confirmed"
    assert ledger.void_grant("acme", "welcome-1") is False  # what Redis applied stays
    assert ledger.grant("acme", "welcome-1", 25_000_000, "starter", T0 + DAY_MS) is False
    assert ledger.balance("acme") == 25_000_000
    other = {**ev, "eid": "grant:welcome-1", "org": "globex"}
    assert ledger.write_events([other]).inserted == 1  # ids are per organization
    # Redis applied the grant id with other parameters than the pending row's: Redis is the
    # truth of what was applied, the row takes the event's parameters.
    conflicting = {**ev, "org": "initech"}
    ledger.grant("initech", "welcome-1", 1, "starter")
    assert ledger.write_events([conflicting]).inserted == 1
    assert ledger.balance("initech") == 25_000_000
    (g,) = ledger.account("initech").grants  # type: ignore[union-attr]
    assert (g.amount_uecu, g.expires_at_ms, g.state) == (25_000_000, T0 + DAY_MS, "confirmed")
    # A confirmed grant's id arriving again in another event with other content: refused.
    again = {**ev, "eid": "grant:welcome-1-again", "amount": "5"}
    assert ledger.write_events([again]).quarantined == 1
    assert ledger.balance("acme") == 25_000_000
    with pytest.raises(LedgerArgumentError):
        ledger.grant("acme", "bad id", 5, "top_up")
    with pytest.raises(LedgerArgumentError):
        ledger.grant("acme", "g", 0, "top_up")
    with pytest.raises(LedgerArgumentError):
        ledger.grant("acme", "g", 5, "gift")


def test_notifications_are_written_once_per_crossing(ledger: Ledger) -> None:
    assert ledger.add_notification(
        "acme", "low_balance_20", 1, available_uecu=19, reference_uecu=100
    )
    assert not ledger.add_notification("acme", "low_balance_20", 1, available_uecu=18)
    assert ledger.add_notification("acme", "low_balance_5", 1, available_uecu=4)
    assert ledger.add_notification("acme", "low_balance_20", 2, available_uecu=10)
    notify = {"type": "notify", "eid": "notify:low_balance_20:2", "org": "acme", "ts": "7",
              "kind": "low_balance_20", "available": "10", "generation": "2",
              "reference": "60"}  # fmt: skip
    auto = {"type": "notify", "eid": "notify:auto_topup_requested:2", "org": "acme", "ts": "8",
            "kind": "auto_topup_requested", "available": "10", "generation": "2",
            "threshold": "50", "amount": "1000"}  # fmt: skip
    assert ledger.write_events([notify, auto, notify]) == WriteResult(2, 1, 0)
    got = [(n.kind, n.crossing_id) for n in ledger.notifications("acme")]
    assert sorted(got) == sorted(
        [("low_balance_20", "1"), ("low_balance_5", "1"), ("low_balance_20", "2"),
         ("auto_topup_requested", "2")]
    )  # fmt: skip
    req = next(n for n in ledger.notifications("acme") if n.kind == "auto_topup_requested")
    assert (req.threshold_uecu, req.topup_amount_uecu, req.event_id) == (50, 1000, auto["eid"])
    with pytest.raises(LedgerArgumentError):
        ledger.add_notification("acme", "low_balance_50", 1, available_uecu=1)


def test_auto_topup_events_keep_the_newest_setting_in_any_order(ledger: Ledger) -> None:
    def change(ts: int, n: int, threshold: str, amount: str) -> dict[str, str]:
        return {"type": "autotopup", "eid": f"autotopup:{ts}:{n}", "org": "acme",
                "ts": str(ts), "threshold": threshold, "amount": amount}  # fmt: skip

    first, second, off = (
        change(10, 1, "500", "9000"),
        change(20, 2, "700", "8000"),
        change(20, 3, "", "0"),
    )
    assert ledger.write_events([second]).inserted == 1
    assert ledger.write_events([first]).inserted == 1  # older: recorded, not applied
    assert ledger.auto_topup("acme") == AutoTopup(700, 8000)
    ledger.write_events([off, first])
    assert ledger.auto_topup("acme") is None
    ledger.set_auto_topup("acme", 100, 200)  # a direct setting now (ledger clock) wins
    assert ledger.auto_topup("acme") == AutoTopup(100, 200)


def test_snapshots_record_drift(ledger: Ledger, clock: Clock) -> None:
    ledger.record_snapshot("acme", 1_000, 1_250)
    clock.now += 1
    ledger.record_snapshot("acme", 1_000, 900)
    snaps = ledger.snapshots("acme")
    assert [s.drift_uecu for s in snaps] == [-100, 250]


# ---------------------------------------------------------------------- engines


def test_sqlite_runs_wal_full_sync_with_foreign_keys(tmp_path: Any) -> None:
    with open_ledger(f"sqlite://{tmp_path}/l.db?busy_timeout_ms=1234") as led:
        led.migrate()
        with led.backend.transaction(write=False) as tx:
            assert tx.rows("PRAGMA journal_mode")[0][0] == "wal"
            assert tx.rows("PRAGMA synchronous")[0][0] == 2  # FULL
            assert tx.rows("PRAGMA foreign_keys")[0][0] == 1
            assert tx.rows("PRAGMA busy_timeout")[0][0] == 1234
    with open_ledger("sqlite://:memory:") as led:
        assert led.migrate() == [m.version for m in MIGRATIONS]
        assert led.write_events(Sim(seed=9).run(20).events).inserted > 0


def test_sqlite_writers_of_one_process_queue_and_only_another_process_times_out(
    tmp_path: Any,
) -> None:
    """The reconciler writes from 16 threads at once. Each write transaction here holds the
    database for 20 ms, 20 times the busy timeout: in one process they take turns and all
    succeed; a hold from outside (another connection: another process, an outage) is still
    refused after the busy timeout."""
    import sqlite3
    import time

    path = tmp_path / "ledger.db"
    with open_ledger(f"sqlite://{path}") as led:
        led.migrate()
    with open_ledger(f"sqlite://{path}?busy_timeout_ms=1") as led:
        outcome: list[Any] = []

        def write(i: int) -> None:
            try:
                with led.backend.transaction(write=True) as tx:
                    tx.rows("SELECT 1")
                    time.sleep(0.02)
                outcome.append(i)
            except Exception as exc:
                outcome.append(exc)

        threads = [threading.Thread(target=write, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(outcome, key=str) == sorted(range(16), key=str), outcome
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(LedgerUnavailable, match="locked"):
                with led.backend.transaction(write=True):
                    pass
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()


def test_bad_urls_are_refused() -> None:
    with pytest.raises(LedgerArgumentError, match="expected postgresql"):
        open_ledger("mysql://x/y")
    with pytest.raises(LedgerArgumentError, match="busy_timeout_ms"):
        open_ledger("sqlite:///tmp/x.db?journal=off")


def test_an_unreachable_postgres_is_unavailable_not_a_hang() -> None:
    with open_ledger("postgresql://postgres@127.0.0.1:9/test", timeout_s=1) as led:
        with pytest.raises(LedgerUnavailable):
            led.balance("acme")


def test_a_session_left_read_only_is_replaced_once_the_database_writes_again() -> None:
    """A pooled PostgreSQL session opened read-only (on a standby, or while the database had
    default_transaction_read_only on) refuses every write even after the database recovered:
    the pool discards it on that refusal, so writes resume on a fresh session, no restart."""
    events = Sim(seed=4).run(40).events
    with own_pg_database() as (name, url), open_ledger(url, pool_size=1) as led:
        led.migrate()
        assert led.write_events(events[:10]).inserted == 10
        pg_read_only(name, True)
        for _ in range(3):
            with pytest.raises(LedgerUnavailable, match="read-only transaction"):
                led.write_events(events[10:20])
        pg_read_only(name, False)
        # The pool may have opened its replacement session before the database recovered:
        # that one is refused once more and discarded too (one slot: at most one such).
        for attempt in range(2):
            try:
                assert led.write_events(events[10:20]).inserted == 10
                break
            except LedgerUnavailable:
                assert attempt == 0
        assert led.write_events(events[20:]).inserted == len(events) - 20


def test_closing_a_sqlite_ledger_never_closes_a_connection_in_use(tmp_path: Any) -> None:
    """The engine stops waiting for a ledger call past ECU_LEDGER_TIMEOUT_MS, but its thread
    runs on; a shutdown that closed that thread's connection under it crashed the process
    (a segfault in sqlite3). A connection in use now closes when its thread returns it."""
    import sqlite3

    path = tmp_path / "ledger.db"
    with open_ledger(f"sqlite://{path}") as led:
        led.migrate()
    ledger = open_ledger(f"sqlite://{path}?busy_timeout_ms=3000")
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    outcome: list[Any] = []

    def grant() -> None:
        try:
            outcome.append(ledger.grant("acme", "g", 5, "top_up"))
        except Exception as exc:
            outcome.append(exc)

    worker = threading.Thread(target=grant)
    worker.start()
    worker.join(0.3)
    assert worker.is_alive(), "the grant waits for the write lock"
    ledger.close()  # while the grant's statement waits on its connection
    blocker.execute("ROLLBACK")
    blocker.close()
    worker.join(10)
    assert not worker.is_alive()
    assert outcome == [True], "the grant finished on its own connection, then it closed"
    with open_ledger(f"sqlite://{path}") as again:
        assert again.schema_version() >= 1


# -- after a failover: events emitted again, and one outcome per hold --------------------------


def _hold_event(kind: str, rid: str, t0: int, ts: int, amount: int = 300) -> dict[str, str]:
    ev = {"type": kind, "eid": f"{kind}:{rid}:{t0}", "org": "acme", "ts": str(ts), "rid": rid,
          "amount": str(amount), "team": "", "project": "", "user": "", "job": "inference",
          "model": "gpt-4o"}  # fmt: skip
    if kind == "reserve":
        ev["deadline"] = str(t0 + 60_000)
    return ev


def _commit_event(rid: str, t0: int, ts: int, committed: int, late: bool = False) -> dict[str, str]:
    return {"type": "commit", "eid": f"commit:{rid}:{t0}", "org": "acme", "ts": str(ts),
            "rid": rid, "amount": "300", "actual": str(committed), "committed": str(committed),
            "released": "0" if late else str(300 - committed), "overage": "0", "unbilled": "0",
            "late": "1" if late else "0", "team": "", "project": "", "user": "",
            "job": "inference", "model": "gpt-4o", "tokens_in": "1", "tokens_out": "1",
            "calls": "1"}  # fmt: skip


def _grant(gid: str = "g1", amount: int = 10_000) -> dict[str, str]:
    return {"type": "grant", "eid": f"grant:{gid}", "org": "acme", "ts": "1", "grant_id": gid,
            "amount": str(amount), "kind": "top_up", "expires_at": "0"}  # fmt: skip


def _holds_ended(ledger: Ledger, rid: str) -> list[str]:
    """How the ledger says the hold ended: its commit, and its expiry or release rows."""
    with ledger.backend.transaction(write=False) as tx:
        rows = tx.rows(
            "SELECT kind FROM hold_events WHERE org_id = 'acme' AND reservation_id = ? "
            "AND kind IN ('expire', 'release') UNION ALL SELECT 'commit' FROM usage_entries "
            "WHERE org_id = 'acme' AND reservation_id = ?",
            (rid, rid),
        )
    return sorted(str(r[0]) for r in rows)


def test_an_event_emitted_again_at_another_time_is_a_duplicate(ledger: Ledger) -> None:
    """A failover took the first emission back out of Redis, which emitted the same change
    again later: the same id and money, another time. Not a conflict; the first stands. The
    same id with other money is still quarantined."""
    first = _commit_event("r1", 100, 200, 250)
    assert (
        ledger.write_events([_grant(), _hold_event("reserve", "r1", 100, 100), first]).inserted == 3
    )
    again = {**first, "ts": "900"}
    assert ledger.write_events([again]) == WriteResult(0, 1, 0)
    assert ledger.write_events([first, again]) == WriteResult(0, 2, 0)  # also in one batch
    other = {**first, "ts": "900", "committed": "260", "actual": "260", "released": "40"}
    assert ledger.write_events([other]).quarantined == 1
    # A notice and an extension carry no money: their first emission stands, whatever the
    # balance or the clock said the second time.
    notice = {"type": "notify", "eid": "notify:low_balance_20:1", "org": "acme", "ts": "300",
              "kind": "low_balance_20", "available": "1900", "generation": "1",
              "reference": "10000"}  # fmt: skip
    extend = {"type": "extend", "eid": "extend:r1:100:1", "org": "acme", "ts": "300",
              "rid": "r1", "deadline": "70000", "sequence": "1"}  # fmt: skip
    assert ledger.write_events([notice, extend]).inserted == 2
    later = [
        {**notice, "ts": "950", "available": "1700"},
        {**extend, "ts": "950", "deadline": "90000"},
    ]
    assert ledger.write_events(later) == WriteResult(0, 2, 0)
    assert ledger.quarantined(org="acme")[0].reason.startswith("event id already recorded")
    assert len(ledger.quarantined(org="acme")) == 1
    account = ledger.ledger_account("acme")
    assert account is not None and account.committed_uecu == 250


@pytest.mark.parametrize("order", ["expiry first", "commit first", "one batch"])
def test_a_hold_ends_once_after_a_failover(ledger: Ledger, order: str) -> None:
    """Redis expired (or released) a hold in a history a failover discarded, and committed it
    in the one that went on, or the other way round: the ledger keeps the commit alone, in
    any order the events land. A late commit follows its expiry: both are kept."""
    ledger.write_events([_grant(), *(_hold_event("reserve", r, 100, 100) for r in "abc")])
    ends = [_hold_event("expire", "a", 100, 500), _hold_event("release", "b", 100, 500)]
    commits = [_commit_event("a", 100, 600, 200), _commit_event("b", 100, 600, 100)]
    if order == "expiry first":
        batches = [ends, commits]
    elif order == "commit first":
        batches = [commits, ends]
    else:
        batches = [ends + commits]
    for batch in batches:
        assert ledger.write_events(batch).quarantined == 0
    assert _holds_ended(ledger, "a") == ["commit"]
    assert _holds_ended(ledger, "b") == ["commit"]
    # Late: expired at its deadline, then billed late, as Redis did.
    ledger.write_events([_hold_event("expire", "c", 100, 500)])
    ledger.write_events([_commit_event("c", 100, 700, 50, late=True)])
    assert _holds_ended(ledger, "c") == ["commit", "expire"]
    account = ledger.ledger_account("acme")
    assert account is not None and account.committed_uecu == 350
    assert account.active_holds == []
    assert ledger.reservation("acme", "a").state == "committed"  # type: ignore[union-attr]
    c = ledger.conservation("acme")
    assert c is not None and c.ok, c
