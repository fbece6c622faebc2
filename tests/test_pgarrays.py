"""ecu_sidecar.ledger.pgarrays: binary arrays for the PostgreSQL bulk inserts, checked against
the real server (what PostgreSQL reads back is what was packed), and the values it leaves to
psycopg."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ecu_sidecar.ledger import pgarrays
from ecu_sidecar.ledger.backends import PostgresBackend
from tests.conftest import PG_URL, require_postgres

INT8 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
# Any text PostgreSQL's text type holds: valid UTF-8 without NUL.
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))
SQL_TYPE = {"text": "text[]", "json": "jsonb[]", "bigint": "int8[]", "bool": "boolean[]"}


@pytest.fixture(scope="module")
def conn() -> Iterator[Any]:
    require_postgres()
    import psycopg

    with psycopg.connect(PG_URL, autocommit=True) as c:
        pgarrays.register(c.adapters)
        yield c


def _read_back(conn: Any, kind: str, array: pgarrays.Packed) -> list[Any]:
    row = conn.execute(f"SELECT %b::{SQL_TYPE[kind]}", [array]).fetchone()
    return row[0]


def _values(elements: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    return st.lists(st.one_of(st.none(), elements), min_size=1, max_size=40) | st.lists(
        elements, min_size=1, max_size=40
    )


PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


ELEMENTS = {"bigint": INT8, "text": TEXT, "bool": st.booleans()}


@pytest.mark.parametrize("kind", sorted(ELEMENTS))
@PROPERTY
@given(data=st.data())
def test_arrays_read_back_as_packed(conn: Any, kind: str, data: st.DataObject) -> None:
    values = data.draw(_values(ELEMENTS[kind]))
    array = pgarrays.packed(kind, values)
    assert array is not None
    assert _read_back(conn, kind, array) == values


@PROPERTY
@given(
    values=_values(
        st.dictionaries(TEXT, st.one_of(INT8, TEXT, st.booleans(), st.none()), max_size=4)
    )
)
def test_json_arrays_are_text_cast_by_the_sql(conn: Any, values: list[Any]) -> None:
    import json

    texts = [None if v is None else json.dumps(v) for v in values]
    array = pgarrays.packed("json", texts)
    assert array is not None
    assert _read_back(conn, "json", array) == values


def test_the_same_bytes_as_postgresql_sends(conn: Any) -> None:
    """array_send's own output for the same arrays (PostgreSQL writes what it would read)."""
    low, high = -(2**63), 2**63 - 1
    cases = {
        "bigint": ([1, low, None, high], f"ARRAY[1, {low}, NULL, {high}]::int8[]"),
        "text": (["a", "", None, 'é,"{}\\'], "ARRAY['a', '', NULL, 'é,\"{}\\']::text[]"),
        "bool": ([True, None, False], "'{t,NULL,f}'::boolean[]"),
    }
    for kind, (values, literal) in cases.items():
        array = pgarrays.packed(kind, values)
        assert array is not None
        sent = conn.execute(f"SELECT array_send({literal})").fetchone()[0]
        assert array.data == sent, kind


@pytest.mark.parametrize(
    ("kind", "values"),
    [
        ("bigint", [1, 2**63]),  # beyond int8
        ("bigint", [-(2**63) - 1]),
        ("bigint", [1, 1.5]),
        ("bigint", ["1"]),
        ("text", ["ok", "\udc80"]),  # a lone surrogate: not UTF-8
        ("text", ["ok", 7]),
        ("json", [b"{}"]),
        ("bool", [True, "yes"]),
        ("bool", [2]),
        ("bool", [True, 1]),
    ],
)
def test_values_that_do_not_fit_are_left_to_psycopg(kind: str, values: list[Any]) -> None:
    assert pgarrays.packed(kind, values) is None


@pytest.fixture
def backend() -> Iterator[tuple[PostgresBackend, str]]:
    require_postgres()
    import psycopg

    schema = "pgarrays_test_" + uuid.uuid4().hex[:12]
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


def test_backend_insert_writes_packed_columns(backend: tuple[PostgresBackend, str]) -> None:
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


def test_backend_insert_a_column_pgarrays_declines_is_refused_by_the_database(
    backend: tuple[PostgresBackend, str],
) -> None:
    """2**63 does not fit int8: psycopg dumps the column, PostgreSQL refuses it with its own
    error (what the ledger's refusal handling expects), and nothing is written."""
    import psycopg

    db, _ = backend
    with pytest.raises(psycopg.DataError), db.transaction(write=True) as tx:
        tx.insert("t", COLUMNS, [("a", 1, True, "{}"), ("b", 2**63, False, "{}")])
    with db.transaction(write=False) as tx:
        assert tx.rows("SELECT count(*) FROM t") == [(0,)]
