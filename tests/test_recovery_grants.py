"""Two-phase ledger-first grants, reconciliation that isolates each organization, and a ledger
that is down answering UNAVAILABLE (issue 14, items 1, 7 and 10): real Redis, and the ledger
on SQLite and on PostgreSQL.

A grant Redis refuses leaves no credit anywhere: not in the ledger's totals, its conservation
query or the state a rebuild takes, and a later reconciliation leaves every organization
reconciled.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest
import pytest_asyncio

from ecu_sidecar import errors
from ecu_sidecar.api.v1 import quota_pb2 as pb
from ecu_sidecar.api.v1 import quota_pb2_grpc
from ecu_sidecar.engine import QuotaEngine
from ecu_sidecar.ledger import (
    MIGRATIONS,
    GrantExpired,
    GrantLimit,
    GrantStatus,
    Ledger,
    open_configured,
    open_ledger,
)
from ecu_sidecar.model import MAX_GRANTED_UECU, MAX_REQUEST_UECU, GrantKind
from ecu_sidecar.server import SidecarServer
from ecu_sidecar.store import RedisStore
from tests.conftest import (
    ADMIN_METADATA,
    PG_URL,
    Database,
    drop_keys,
    make_settings,
    require_postgres,
    require_redis,
)
from tests.tcp_proxy import TcpProxy
from tests.test_flusher import Stack as FlusherStack

#: How long a call may take before the test calls it hung (far above every bound in play).
HUNG_S = 30


class Stack(FlusherStack):
    """Real Redis, a ledger, an engine writing grants ledger-first, and a flusher."""

    async def call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)


@pytest_asyncio.fixture
async def stack(database: Database) -> AsyncIterator[Stack]:
    require_redis()
    settings = make_settings(
        "redis", ledger_url=database.url, flusher_claim_idle_ms=0, flusher_discovery_interval_ms=0
    )
    ledger = open_ledger(database.url)
    ledger.migrate()
    s = Stack(settings, ledger)
    yield s
    await drop_keys(settings)
    await s.store.close()
    await s.direct.aclose()
    ledger.close()


def org_id() -> str:
    return "org-" + uuid.uuid4().hex[:8]


async def assert_credit(s: Stack, org: str, granted: int) -> None:
    """The ledger counts exactly ``granted`` for ``org`` everywhere: its totals, the sums its
    conservation query checks them against, and the state a rebuild takes (nothing pending)."""
    acct = await s.call(s.ledger.account, org)
    assert acct is not None and acct.granted_uecu == granted
    assert sum(g.amount_uecu for g in acct.grants if g.confirmed) == granted
    cons = await s.call(s.ledger.conservation, org)
    assert cons is not None and cons.ok, cons
    assert cons.granted_uecu == cons.grants_sum_uecu == granted
    rebuild = await s.call(s.ledger.ledger_account, org)
    assert rebuild is not None
    assert (rebuild.granted_uecu, rebuild.unconfirmed_grants) == (granted, [])
    assert rebuild.generation == sum(1 for g in acct.grants if g.confirmed)


async def assert_reconciled(s: Stack, orgs: list[str]) -> None:
    """After a drain, a reconciliation pass checks every organization and finds no drift; Redis
    and the ledger agree."""
    await s.flusher.drain()
    assert await s.flusher.reconcile() == {org: 0 for org in orgs}
    for org in orgs:
        b = await s.engine.balance(org)
        cons = await s.call(s.ledger.conservation, org)
        assert cons is not None and cons.ok
        assert (b.granted_uecu, b.balance_uecu) == (cons.granted_uecu, cons.balance_uecu)
    assert s.metric("ecu_flusher_reconcile_errors_total") == 0


# ---------------------------------------------------------------------- refused grants


async def test_grant_expired_by_the_scripts_clock_leaves_no_credit(stack: Stack) -> None:
    org = org_id()
    await stack.engine.grant(org, "g1", 1_000, GrantKind.TOP_UP)
    soon = await stack.store.now_ms() + 60_000
    first = await stack.engine.grant(org, "starter", 400, GrantKind.STARTER, soon)
    await stack.flusher.drain()  # both confirmed
    # Expired by the scripts' clock (Redis TIME + the offset the tests step), not the host's.
    stack.store.clock_offset_ms = 3_600_000
    expires = await stack.store.now_ms() - 1_000  # an hour ahead of the wall clock
    with pytest.raises(errors.GrantAlreadyExpired, match="is not after now") as e:
        await stack.engine.grant(org, "late", 500, GrantKind.STARTER, expires)
    assert e.value.metadata == {"expires_at": str(expires)}
    acct = await stack.call(stack.ledger.account, org)
    assert [g.grant_id for g in acct.grants] == ["g1", "starter"]  # nothing written for "late"
    # A replay of a grant applied before its expiry still answers the original outcome.
    again = await stack.engine.grant(org, "starter", 400, GrantKind.STARTER, soon)
    assert again.replayed and again.balance_uecu == first.balance_uecu
    assert (await stack.engine.balance(org)).granted_uecu == 1_400
    await assert_credit(stack, org, 1_400)
    await assert_reconciled(stack, [org])
    await assert_credit(stack, org, 1_400)


async def test_grant_past_the_balance_limit_leaves_no_credit(stack: Stack) -> None:
    org = org_id()
    step = MAX_REQUEST_UECU  # 4 of them stay under 2^52, a fifth does not
    for i in range(3):
        await stack.engine.grant(org, f"big-{i}", step, GrantKind.ENTERPRISE)
    await stack.flusher.drain()
    # A fourth written ledger-first whose Redis side is not done yet still counts toward the
    # limit (Redis may apply it any moment), though it is in no total.
    assert await stack.call(stack.ledger.grant, org, "big-3", step, "enterprise", 0)
    with pytest.raises(errors.BalanceLimit, match="uECU total an account may be granted") as e:
        await stack.engine.grant(org, "big-4", step, GrantKind.ENTERPRISE)
    assert e.value.metadata == {"limit": str(MAX_GRANTED_UECU)}
    acct = await stack.call(stack.ledger.account, org)
    assert {g.grant_id: g.state for g in acct.grants} == {
        "big-0": GrantStatus.CONFIRMED,
        "big-1": GrantStatus.CONFIRMED,
        "big-2": GrantStatus.CONFIRMED,
        "big-3": GrantStatus.PENDING,
    }
    assert acct.granted_uecu == 3 * step
    # The flusher finishes the pending one (Redis applies it) and everything agrees.
    assert await stack.flusher.reconcile() == {}
    await assert_reconciled(stack, [org])
    await assert_credit(stack, org, 4 * step)
    # Now Redis itself would refuse a fifth: the ledger refuses it first, with Redis's error.
    with pytest.raises(errors.BalanceLimit):
        await stack.engine.grant(org, "big-4", step, GrantKind.ENTERPRISE)
    await assert_credit(stack, org, 4 * step)


async def test_grant_redis_refuses_past_the_limit_is_voided(stack: Stack) -> None:
    """Redis holds grants the ledger has not seen yet (their events are still in the outbox):
    the ledger's check passes, Redis refuses, and the pending grant is voided at once."""
    org = org_id()
    without_ledger = QuotaEngine(stack.store, stack.settings)  # a sidecar with no ledger
    for i in range(4):
        await without_ledger.grant(org, f"big-{i}", MAX_REQUEST_UECU, GrantKind.ENTERPRISE)
    with pytest.raises(errors.BalanceLimit):
        await stack.engine.grant(org, "one-more", MAX_REQUEST_UECU, GrantKind.ENTERPRISE)
    acct = await stack.call(stack.ledger.account, org)
    assert [(g.grant_id, g.state) for g in acct.grants] == [("one-more", GrantStatus.VOID)]
    await assert_credit(stack, org, 0)
    await assert_reconciled(stack, [org])
    await assert_credit(stack, org, 4 * MAX_REQUEST_UECU)
    assert stack.metric("ecu_flusher_grants_voided_total") == 0  # the engine voided it


async def test_same_grant_id_with_other_parameters_leaves_no_credit(stack: Stack) -> None:
    org = org_id()
    await stack.engine.grant(org, "g0", 100, GrantKind.TOP_UP)
    # Redis applied "dup" for 700 (a sidecar without a ledger); the ledger has not seen it.
    await QuotaEngine(stack.store, stack.settings).grant(org, "dup", 700, GrantKind.TOP_UP)
    with pytest.raises(errors.IdempotencyConflict):
        await stack.engine.grant(org, "dup", 5_000, GrantKind.TOP_UP)
    acct = await stack.call(stack.ledger.account, org)
    assert {g.grant_id: g.state for g in acct.grants} == {
        "g0": GrantStatus.PENDING,  # not flushed yet
        "dup": GrantStatus.VOID,
    }
    assert (await stack.engine.balance(org)).granted_uecu == 800
    # Redis's grant event confirms the void row with what Redis applied: 700, not 5,000.
    await assert_reconciled(stack, [org])
    await assert_credit(stack, org, 800)
    acct = await stack.call(stack.ledger.account, org)
    dup = next(g for g in acct.grants if g.grant_id == "dup")
    assert (dup.amount_uecu, dup.state) == (700, GrantStatus.CONFIRMED)
    # Once the ledger has it, the other parameters are refused before Redis is asked.
    with pytest.raises(errors.IdempotencyConflict):
        await stack.engine.grant(org, "dup", 5_000, GrantKind.TOP_UP)
    await assert_credit(stack, org, 800)


async def test_a_pending_grant_that_expired_meanwhile_is_voided_by_the_flusher(
    stack: Stack,
) -> None:
    """The caller wrote the ledger and died; when the flusher finishes the grant, Redis says it
    has expired meanwhile: the flusher voids it (counted), and the organization reconciles."""
    org = org_id()
    await stack.engine.grant(org, "g1", 1_000, GrantKind.TOP_UP)
    expires = await stack.store.now_ms() + 60_000
    await stack.call(stack.ledger.grant, org, "starter", 400, "starter", expires)
    stack.store.clock_offset_ms = 60_001
    await stack.flusher.drain()
    assert await stack.flusher.reconcile() == {}  # voids it; compares next pass
    assert stack.metric("ecu_flusher_grants_voided_total") == 1
    assert stack.metric("ecu_flusher_reconcile_errors_total") == 0
    await assert_credit(stack, org, 1_000)
    await assert_reconciled(stack, [org])
    # The caller retrying the grant (same id, same parameters) is refused by the engine's own
    # check before the ledger is written: it stays void.
    with pytest.raises(errors.GrantAlreadyExpired):
        await stack.engine.grant(org, "starter", 400, GrantKind.STARTER, expires)
    await assert_credit(stack, org, 1_000)


async def test_a_retried_grant_after_unavailable_is_confirmed_once(stack: Stack) -> None:
    """Pending while the outcome is unknown; the retry with the same id applies it once."""
    org = org_id()
    assert await stack.call(stack.ledger.grant, org, "g", 2_500, "top_up", 0)  # then "died"
    rebuild = await stack.call(stack.ledger.ledger_account, org)
    assert (rebuild.granted_uecu, rebuild.unconfirmed_grants) == (0, [("g", 2_500, "top_up", 0)])
    out = await stack.engine.grant(org, "g", 2_500, GrantKind.TOP_UP)
    assert (out.replayed, out.balance_uecu) == (False, 2_500)
    again = await stack.engine.grant(org, "g", 2_500, GrantKind.TOP_UP)
    assert again.replayed
    await assert_reconciled(stack, [org])
    await assert_credit(stack, org, 2_500)


# ---------------------------------------------------------------------- reconcile isolation


async def test_one_organization_failing_does_not_stop_the_others_repairs(stack: Stack) -> None:
    orgs = [f"iso-{c}-{uuid.uuid4().hex[:6]}" for c in "abcde"]
    for org in orgs:
        await stack.engine.grant(org, "g", 1_000_000, GrantKind.TOP_UP)
    limited, broken, *healthy = orgs
    for i in range(4):
        await stack.engine.grant(limited, f"big-{i}", MAX_REQUEST_UECU, GrantKind.ENTERPRISE)
    await stack.flusher.drain()
    # limited: a pending grant Redis refuses for the 2^52 limit (written without the check,
    # as a sidecar before this version did).
    await stack.call(stack.ledger.grant, limited, "over", MAX_REQUEST_UECU, "enterprise", 0)
    # broken: its account is not a hash any more: every script fails on it.
    acct_key = stack.store.acct_key(broken)
    await stack.direct.delete(acct_key)
    await stack.direct.set(acct_key, "not a hash")
    # The healthy ones drifted: the pass must still repair them.
    for org in healthy:
        await stack.direct.hincrby(stack.store.acct_key(org), "balance", 77)

    drifts = await asyncio.wait_for(stack.flusher.reconcile(), HUNG_S)
    assert drifts == {org: 77 for org in healthy}
    assert stack.metric("ecu_flusher_reconcile_errors_total") == 1  # broken
    assert stack.metric("ecu_flusher_grants_voided_total") == 1  # limited's refused grant
    assert stack.metric("ecu_reconcile_repairs_total") == len(healthy)
    over = await stack.call(stack.ledger.account, limited)
    assert {g.grant_id: g.state for g in over.grants}["over"] == GrantStatus.VOID
    await assert_credit(stack, limited, 1_000_000 + 4 * MAX_REQUEST_UECU)

    # The next pass: the broken one fails again (counted again), the rest is reconciled.
    await stack.flusher.drain()
    drifts = await stack.flusher.reconcile()
    assert drifts == {org: 0 for org in [limited, *healthy]}
    assert stack.metric("ecu_flusher_reconcile_errors_total") == 2


# ---------------------------------------------------------------------- migration v2


def test_migration_v2_takes_pending_grants_out_of_the_totals(database: Database) -> None:
    """A ledger at version 1 counted a ledger-first grant at once; version 2 marks the ones
    with no event pending and subtracts them from the totals they were counted in."""
    with open_ledger(database.url, migrations=MIGRATIONS[:1]) as v1:
        assert v1.migrate() == [1]
    # What version 1 wrote: one grant through the outbox, one ledger-first not confirmed.
    database.execute(
        "INSERT INTO organizations (org_id, created_at_ms, granted_uecu, balance_uecu) "
        "VALUES ('acme', 1, 1500, 1500), ('globex', 1, 40, 40)"
    )
    database.execute(
        "INSERT INTO events (org_id, event_id, event_type, occurred_at_ms, recorded_at_ms, "
        "fingerprint, payload) VALUES ('acme', 'grant:g1', 'grant', 5, 5, 'x', '{}')"
    )
    database.execute(
        "INSERT INTO grants (org_id, grant_id, kind, amount_uecu, granted_at_ms, source, "
        "event_id) VALUES ('acme', 'g1', 'top_up', 1000, 5, 'event', 'grant:g1'), "
        "('acme', 'g2', 'top_up', 500, 6, 'ledger', NULL), "
        "('globex', 'g3', 'starter', 40, 7, 'ledger', NULL)"
    )
    with open_ledger(database.url) as v2:
        assert v2.migrate() == [m.version for m in MIGRATIONS[1:]]
        v2.check_schema()
        for org, granted in (("acme", 1000), ("globex", 0)):
            cons = v2.conservation(org)
            assert cons is not None and cons.ok and cons.granted_uecu == granted
            assert v2.balance(org) == granted
        acct = v2.account("acme")
        assert acct is not None
        assert {g.grant_id: g.state for g in acct.grants} == {
            "g1": GrantStatus.CONFIRMED,
            "g2": GrantStatus.PENDING,
        }
        rebuild = v2.ledger_account("acme")
        assert rebuild is not None and rebuild.unconfirmed_grants == [("g2", 500, "top_up", 0)]
        # Its grant event confirms it and counts it, once.
        ev = {"type": "grant", "eid": "grant:g2", "org": "acme", "ts": "9", "grant_id": "g2",
              "amount": "500", "kind": "top_up", "expires_at": "0"}  # fmt: skip
        assert v2.write_events([ev]).inserted == 1
        assert v2.write_events([ev]).duplicates == 1
        assert v2.balance("acme") == 1500 and v2.conservation("acme").ok  # type: ignore[union-attr]


# ---------------------------------------------------------------------- a one-event refusal


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
async def test_a_one_event_batch_the_database_refuses_is_quarantined(stack: Stack) -> None:
    """PostgreSQL refuses a value validation lets through (a JSON number past NUMERIC's range
    in a commit's usage lines): alone in its batch, the event is quarantined with the
    database's reason, and the flusher moves on instead of retrying it for ever."""
    org = org_id()
    await stack.engine.grant(org, "g", 1_000, GrantKind.TOP_UP)
    await stack.flusher.drain()
    await stack.direct.xadd(
        stack.store.outbox_key(org),
        {"type": "commit", "eid": "commit:odd:1", "org": org, "ts": "10", "rid": "odd",
         "amount": "5", "actual": "5", "committed": "5", "released": "0", "overage": "0",
         "unbilled": "0", "late": "0", "team": "", "project": "", "user": "", "job": "engine",
         "model": "", "tokens_in": "0", "tokens_out": "0", "calls": "0",
         "lines": "[1e1000000]"},
    )  # fmt: skip
    assert await asyncio.wait_for(stack.flusher.flush_once(), HUNG_S) == 1
    assert await stack.flusher.flush_once() == 0  # nothing left behind, nothing retried
    (bad,) = await stack.call(lambda: stack.ledger.quarantined(org=org))
    assert bad.event_id == "commit:odd:1"
    assert "the database refused it" in bad.reason and "numeric" in bad.reason
    state = await stack.flusher.reader.state(org)
    assert state.fully_flushed and state.length == 0
    assert stack.metric("ecu_flusher_write_errors_total") == 0
    await assert_credit(stack, org, 1_000)


# ---------------------------------------------------------------------- ledger down


async def test_grant_and_rebuild_answer_unavailable_when_the_ledger_is_down() -> None:
    """PostgreSQL behind a proxy that stops answering: Grant and a call that needs a rebuild
    answer UNAVAILABLE (not INTERNAL), bounded by ECU_LEDGER_TIMEOUT_MS, not hung."""
    require_redis()
    require_postgres()
    import psycopg

    pg = urlsplit(PG_URL)
    schema = "ledger_test_" + uuid.uuid4().hex[:12]
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    proxy = TcpProxy(pg.port or 5432)
    url = (
        f"postgresql://{pg.username}@127.0.0.1:{proxy.port}{pg.path}"
        f"?options=-csearch_path%3D{schema}"
    )
    try:
        with open_ledger(url) as led:
            led.migrate()
            ev = {"type": "grant", "eid": "grant:g1", "org": "acme", "ts": "1", "grant_id": "g1",
                  "amount": "100", "kind": "top_up", "expires_at": "0"}  # fmt: skip
            assert led.write_events([ev]).inserted == 1  # Redis does not have "acme"
        settings = make_settings("redis", ledger_url=url, ledger_timeout_ms=500)
        server = SidecarServer(settings)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                stub = quota_pb2_grpc.QuotaStub(ch)
                for mode in ("refuse", "blackhole"):
                    proxy.mode = mode
                    proxy.cut()
                    calls = {
                        "Grant": stub.Grant(
                            pb.GrantRequest(
                                grant_id=f"g-{mode}",
                                organization="acme",
                                amount_uecu=5,
                                kind=pb.GRANT_KIND_TOP_UP,
                            ),
                            metadata=ADMIN_METADATA,
                        ),
                        "GetBalance (rebuild)": stub.GetBalance(
                            pb.GetBalanceRequest(organization="acme")
                        ),
                    }
                    for name, call in calls.items():
                        with pytest.raises(grpc.aio.AioRpcError) as e:
                            await asyncio.wait_for(call, HUNG_S)
                        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, (mode, name)
                        assert "ledger" in (e.value.details() or ""), (mode, name)
                proxy.heal()
                # Back: the rebuild goes through (once the pool has reconnected: each attempt
                # is bounded, and answers UNAVAILABLE until then).
                for _ in range(60):
                    try:
                        b = await asyncio.wait_for(
                            stub.GetBalance(pb.GetBalanceRequest(organization="acme")), HUNG_S
                        )
                        break
                    except grpc.aio.AioRpcError as exc:
                        assert exc.code() == grpc.StatusCode.UNAVAILABLE
                assert b.balance.balance_uecu == 100
        finally:
            await drop_keys(settings)
            await server.stop(grace=0)
    finally:
        proxy.close()
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


async def test_a_closed_ledger_port_is_unavailable_for_every_engine_ledger_call() -> None:
    require_redis()
    settings = make_settings("redis", ledger_timeout_ms=500)
    store = RedisStore.from_settings(settings)
    ledger = open_ledger(
        "postgresql://postgres@127.0.0.1:9/test", timeout_s=0.5, statement_timeout_ms=500
    )
    engine = QuotaEngine(store, settings, ledger=ledger)
    try:
        with pytest.raises(errors.StoreUnavailable, match="ledger"):
            await asyncio.wait_for(engine.grant("acme", "g", 5, GrantKind.TOP_UP), HUNG_S)
        with pytest.raises(errors.StoreUnavailable, match="ledger"):
            await asyncio.wait_for(engine.balance("acme"), HUNG_S)
        assert await store.missing_accounts(["acme"]) == ["acme"]  # nothing applied
    finally:
        ledger.close()
        await drop_keys(settings)
        await store.close()


async def test_an_organization_unknown_to_the_ledger_is_remembered(stack: Stack) -> None:
    """Within ECU_LEDGER_NEGATIVE_TTL_MS, an organization the ledger did not know costs no
    ledger transaction: a ledger that learns of it meanwhile is not asked again."""
    org = org_id()
    with pytest.raises(errors.AccountNotFound):
        await stack.engine.balance(org)
    # The ledger learns of it (Redis has nothing: a rebuild would find it now).
    ev = {"type": "grant", "eid": "grant:g", "org": org, "ts": "1", "grant_id": "g",
          "amount": "300", "kind": "top_up", "expires_at": "0"}  # fmt: skip
    assert (await stack.call(stack.ledger.write_events, [ev])).inserted == 1
    with pytest.raises(errors.AccountNotFound):
        await stack.engine.balance(org)  # remembered: the ledger was not asked
    # Without the memory (TTL 0), the ledger is asked each time and the rebuild happens.
    forgetful = QuotaEngine(
        stack.store,
        make_settings(
            "redis",
            key_prefix=stack.settings.key_prefix,
            ledger_url=stack.settings.ledger_url,
            ledger_negative_ttl_ms=0,
        ),
        ledger=stack.ledger,
    )
    assert (await forgetful.balance(org)).balance_uecu == 300
    # A grant through the remembering engine forgets the answer: the ledger knows it then.
    other = org_id()
    with pytest.raises(errors.AccountNotFound):
        await stack.engine.balance(other)
    await stack.engine.grant(other, "g", 10, GrantKind.TOP_UP)
    await stack.flusher.drain()
    await drop_keys(stack.settings)  # Redis loses both
    assert (await stack.engine.balance(other)).balance_uecu == 10


async def test_a_locked_sqlite_ledger_makes_grant_unavailable(tmp_path: Any) -> None:
    """Another writer holds the SQLite ledger's write lock past ECU_LEDGER_TIMEOUT_MS: Grant is
    UNAVAILABLE (nothing applied in Redis), and goes through once the lock is gone."""
    require_redis()
    path = tmp_path / "ledger.db"
    url = f"sqlite://{path}"
    # Long enough for the calls after the lock is gone, on a loaded machine.
    settings = make_settings("redis", ledger_url=url, ledger_timeout_ms=2_000)
    with open_ledger(url) as led:
        led.migrate()
    ledger = open_configured(settings, bounded=True)
    store = RedisStore.from_settings(settings)
    engine = QuotaEngine(store, settings, ledger=ledger)
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(errors.StoreUnavailable, match="ledger"):
            await asyncio.wait_for(engine.grant("acme", "g", 5, GrantKind.TOP_UP), HUNG_S)
        assert await store.missing_accounts(["acme"]) == ["acme"]
        blocker.execute("ROLLBACK")
        out = await asyncio.wait_for(engine.grant("acme", "g", 5, GrantKind.TOP_UP), HUNG_S)
        assert out.balance_uecu == 5
    finally:
        blocker.close()
        ledger.close()
        await drop_keys(settings)
        await store.close()


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_the_sidecars_ledger_bounds_every_statement(database: Database) -> None:
    settings = make_settings("redis", ledger_url=database.url, ledger_timeout_ms=1234)

    def statement_timeout(led: Ledger) -> str:
        with led.backend.transaction(write=False) as tx:
            return str(tx.rows("SHOW statement_timeout")[0][0])

    with open_configured(settings, check=False, bounded=True) as led:
        assert statement_timeout(led) == "1234ms"
    with open_configured(settings, check=False) as led:  # flush, migrate: no statement bound
        assert statement_timeout(led) == "0"


def test_the_ledger_refuses_what_redis_would_before_writing_never_a_replay(
    database: Database,
) -> None:
    with open_ledger(database.url) as led:
        led.migrate()
        with pytest.raises(GrantExpired, match="is not after now") as e:
            led.grant("acme", "late", 5, "starter", 1_000, now_ms=1_000)
        assert isinstance(e.value, errors.GrantAlreadyExpired)
        assert led.account("acme") is None  # not even the organization row
        with pytest.raises(GrantLimit) as limit:
            led.grant("acme", "big", 11, "top_up", limit_uecu=10)
        assert isinstance(limit.value, errors.BalanceLimit)
        assert led.account("acme") is None
        assert led.grant("acme", "g", 7, "starter", 5_000, now_ms=1_000, limit_uecu=10)
        # A replay is never refused: Redis answers it with the original outcome.
        assert led.grant("acme", "g", 7, "starter", 5_000, now_ms=9_000, limit_uecu=7) is False
        assert led.void_grant("acme", "g") is True
        assert led.void_grant("acme", "g") is False
        # A void grant asked again is new again: checked again (and still void when refused).
        with pytest.raises(GrantExpired):
            led.grant("acme", "g", 7, "starter", 5_000, now_ms=9_000)
        assert led.account("acme").grants[0].state == GrantStatus.VOID  # type: ignore[union-attr]
        assert led.grant("acme", "g", 7, "starter", 5_000, now_ms=1_000) is True
        assert led.account("acme").grants[0].state == GrantStatus.PENDING  # type: ignore[union-attr]
        assert led.balance("acme") == 0 and led.conservation("acme").ok  # type: ignore[union-attr]


def test_an_expiry_is_checked_against_confirmed_grants_only(database: Database) -> None:
    """The caller asked for a never-expiring grant that Redis refused (void); Redis had applied
    that id as an expiring grant, whose expiry lands before its grant event (two flushers):
    applied, not refused against the void row's parameters, and the grant event then confirms
    the row with Redis's parameters."""
    with open_ledger(database.url) as led:
        led.migrate()
        assert led.grant("acme", "g", 900, "top_up")
        assert led.void_grant("acme", "g")
        expire = {"type": "grant_expire", "eid": "grant_expire:g", "org": "acme", "ts": "20",
                  "grant_id": "g", "amount": "300"}  # fmt: skip
        assert led.write_events([expire]).inserted == 1
        grant = {"type": "grant", "eid": "grant:g", "org": "acme", "ts": "10", "grant_id": "g",
                 "amount": "500", "kind": "starter", "expires_at": "20"}  # fmt: skip
        assert led.write_events([grant]).inserted == 1
        cons = led.conservation("acme")
        assert cons is not None and cons.ok
        assert (cons.granted_uecu, cons.expired_grants_uecu, cons.balance_uecu) == (500, 300, 200)
        (g,) = led.account("acme").grants  # type: ignore[union-attr]
        assert (g.amount_uecu, g.expires_at_ms, g.state, g.expired_uecu) == (
            500,
            20,
            GrantStatus.CONFIRMED,
            300,
        )
