"""The PostgreSQL backend's bulk insert (Tx.insert: one array per column, unnest), against the
real server: what PostgreSQL reads back is what was inserted, in order, and what it refuses is
refused with its own error."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from ecu_sidecar.ledger.backends import PostgresBackend
from tests.conftest import PG_URL, require_postgres


@pytest.fixture
def backend() -> Iterator[tuple[PostgresBackend, str]]:
    require_postgres()
    import psycopg

    schema = "ledger_insert_test_" + uuid.uuid4().hex[:12]
    with psycopg.connect(PG_URL, autocommit=True) as c:
        c.execute(f"CREATE SCHEMA {schema}")
        c.execute(f"CREATE TABLE {schema}.t (k TEXT PRIMARY KEY, n BIGINT, b BOOLEAN, j JSONB)")
    sep = "&" if "?" in PG_URL else "?"
    db = PostgresBackend(f"{PG_URL}{sep}options=-csearch_path%3D{schema}", pool_size=1, timeout_s=5)
    try:
        yield db, schema
    finally:
        db.close()
        with psycopg.connect(PG_URL, autocommit=True) as c:
            c.execute(f"DROP SCHEMA {schema} CASCADE")


COLUMNS = (("k", "text"), ("n", "bigint"), ("b", "bool"), ("j", "json"))


def test_backend_insert_writes_every_column_kind(backend: tuple[PostgresBackend, str]) -> None:
    db, _ = backend
    rows = [("a", 2**53, True, '{"x": [1, "é"]}'), ("b", None, None, None), ("c", -1, False, "[]")]
    with db.transaction(write=True) as tx:
        back = tx.insert("t", COLUMNS, rows, returning="k")
    assert back == [("a",), ("b",), ("c",)]
    with db.transaction(write=False) as tx:
        got = tx.rows("SELECT k, n, b, j FROM t ORDER BY k")
    assert got == [
        ("a", 2**53, True, {"x": [1, "é"]}),
        ("b", None, None, None),
        ("c", -1, False, []),
    ]


def test_backend_insert_a_value_the_column_cannot_hold_is_refused_by_the_database(
    backend: tuple[PostgresBackend, str],
) -> None:
    """2**63 does not fit int8: PostgreSQL refuses it with its own error (what the ledger's
    refusal handling expects), and nothing is written."""
    import psycopg

    db, _ = backend
    with pytest.raises(psycopg.DataError), db.transaction(write=True) as tx:
        tx.insert("t", COLUMNS, [("a", 1, True, "{}"), ("b", 2**63, False, "{}")])
    with db.transaction(write=False) as tx:
        assert tx.rows("SELECT count(*) FROM t") == [(0,)]


def test_backend_insert_columns_of_only_nulls_and_the_rows_in_order(
    backend: tuple[PostgresBackend, str],
) -> None:
    db, _ = backend
    rows = [(f"k{i:03d}", None, None, None) for i in range(300, 0, -1)]
    with db.transaction(write=True) as tx:
        back = tx.insert("t", COLUMNS, rows, conflict="ON CONFLICT (k) DO NOTHING", returning="k")
        again = tx.insert(
            "t", COLUMNS, rows[:2], conflict="ON CONFLICT (k) DO NOTHING", returning="k"
        )
    assert back == [(r[0],) for r in rows]
    assert again == []
    with db.transaction(write=False) as tx:
        assert tx.rows("SELECT count(*), count(n), count(b), count(j) FROM t") == [(300, 0, 0, 0)]
