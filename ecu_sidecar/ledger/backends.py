"""Connections and transactions: PostgreSQL (psycopg 3 + psycopg_pool) and SQLite (stdlib).

The repository writes SQL once, with ``?`` placeholders, and runs it through ``Tx``; this module
holds every difference between the two engines: placeholders, transaction start, the migration
lock, the UTC month expression, and which driver errors mean "retry" or "unavailable".
"""

from __future__ import annotations

import contextlib
import functools
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from ecu_sidecar.ledger.types import LedgerArgumentError, LedgerUnavailable

__all__ = ["Backend", "PostgresBackend", "Retry", "SqliteBackend", "Tx", "backend_for_url"]

#: SQLite 3.35 brought RETURNING, which the repository uses on both engines.
SQLITE_MIN_VERSION = (3, 35, 0)
# Identifies the migration advisory lock (first key); the second is the schema's hash.
_MIGRATION_LOCK_CLASS = 0x45435531  # "ECU1"
#: The column kinds of a bulk insert (Tx.insert), as PostgreSQL array types.
_PG_ARRAYS = {"text": "text[]", "bigint": "bigint[]", "bool": "boolean[]", "json": "jsonb[]"}
#: Rows per multi-row INSERT on SQLite, and its limit of bound variables per statement.
_SQLITE_CHUNK = 500
_SQLITE_MAX_VARIABLES = 32_766


class Retry(Exception):
    """A transaction lost a race (deadlock, serialization failure): run it again."""


class Tx(Protocol):
    """An open transaction."""

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one statement, return its rows ([] when it returns none)."""
        ...

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement, return its row count."""
        ...

    def many(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        """Run one statement once per parameter row."""
        ...

    def insert(
        self,
        table: str,
        columns: tuple[tuple[str, str], ...],
        rows: Sequence[Sequence[Any]],
        *,
        conflict: str = "",
        returning: str = "",
    ) -> list[tuple[Any, ...]]:
        """Insert many rows in as few statements as the engine allows, in the order given.

        ``columns`` are (name, kind) pairs, kind one of text, bigint, bool, json; ``conflict``
        is an ON CONFLICT clause; ``returning`` the columns to return of each inserted row.
        """
        ...


class Backend(Protocol):
    """One database engine behind the repository."""

    dialect: str
    refusals: tuple[type[Exception], ...]
    """Driver errors meaning the database refused a row (data or constraint), not an outage."""

    def transaction(self, *, write: bool) -> contextlib.AbstractContextManager[Tx]:
        """A transaction: committed when the block ends, rolled back when it raises."""
        ...

    def lock_migrations(self, tx: Tx) -> None:
        """Serialize migrate() across processes for the rest of the transaction."""
        ...

    def table_exists(self, tx: Tx, name: str) -> bool:
        """Whether a table exists in the schema in use."""
        ...

    def month_start_ms(self, column: str) -> str:
        """SQL: the UTC start of the month of a ms timestamp column, in ms."""
        ...

    def close(self) -> None:
        """Close every connection."""
        ...


def backend_for_url(
    url: str, *, pool_size: int, timeout_s: float, statement_timeout_ms: int | None = None
) -> Backend:
    """The backend a URL names: postgresql:// | postgres:// | sqlite://PATH | sqlite://:memory:.

    ``statement_timeout_ms`` (PostgreSQL): cancel any statement running longer (SQLite's
    equivalent, waiting for the write lock, is bounded by ``timeout_s``)."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("postgresql", "postgres"):
        return PostgresBackend(
            url,
            pool_size=pool_size,
            timeout_s=timeout_s,
            statement_timeout_ms=statement_timeout_ms,
        )
    if scheme == "sqlite":
        return SqliteBackend.from_url(url, timeout_s=timeout_s)
    raise LedgerArgumentError(
        "ledger URL: expected postgresql://…, postgres://…, sqlite:///path/to/file.db or "
        f"sqlite://:memory:, got {_mask(url)!r}"
    )


def _mask(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return url.replace(":" + parts.password + "@", ":***@", 1)
    return url


# --------------------------------------------------------------------------- PostgreSQL


class _PgTx:
    def __init__(self, cur: Any) -> None:
        self._cur = cur

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        self._cur.execute(_pg(sql), params)
        return self._cur.fetchall() if self._cur.description else []

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        self._cur.execute(_pg(sql), params)
        return self._cur.rowcount

    def many(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        if params:
            self._cur.executemany(_pg(sql), params)

    def insert(
        self,
        table: str,
        columns: tuple[tuple[str, str], ...],
        rows: Sequence[Sequence[Any]],
        *,
        conflict: str = "",
        returning: str = "",
    ) -> list[tuple[Any, ...]]:
        if not rows:
            return []
        # One statement of fixed text whatever the number of rows (psycopg prepares it once),
        # with one array per column, which psycopg dumps in binary. unnest yields the rows in
        # array order, so the rows are inserted, and their unique keys locked, in the order given.
        sql = _pg_insert(table, columns, conflict, returning)
        self._cur.execute(sql, [list(col) for col in zip(*rows, strict=True)])
        return self._cur.fetchall() if returning else []


def _pg(sql: str) -> str:
    # The repository's SQL holds no literal '?' or '%'; placeholders become psycopg's.
    return sql.replace("?", "%s")


@functools.lru_cache(maxsize=64)
def _pg_insert(
    table: str, columns: tuple[tuple[str, str], ...], conflict: str, returning: str
) -> str:
    names = ", ".join(name for name, _ in columns)
    arrays = ", ".join(f"%b::{_PG_ARRAYS[kind]}" for _, kind in columns)
    tail = f" RETURNING {returning}" if returning else ""
    return f"INSERT INTO {table} ({names}) SELECT * FROM unnest({arrays}) {conflict}{tail}"


def _configure(conn: Any, *, statement_timeout_ms: int | None = None) -> None:
    """Every new pool connection: cancels statements that run past ``statement_timeout_ms``
    (a blocked caller's thread then comes back)."""
    if statement_timeout_ms is not None:
        conn.execute(f"SET statement_timeout = {int(statement_timeout_ms)}")


class PostgresBackend:
    """PostgreSQL through a psycopg_pool connection pool (autocommit connections, explicit
    transactions, READ COMMITTED for writes, REPEATABLE READ READ ONLY for reads)."""

    dialect = "postgresql"

    def __init__(
        self,
        url: str,
        *,
        pool_size: int,
        timeout_s: float,
        statement_timeout_ms: int | None = None,
    ) -> None:
        import psycopg
        from psycopg_pool import ConnectionPool

        self._psycopg = psycopg
        self.refusals = (psycopg.DataError, psycopg.IntegrityError)
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=max(1, pool_size),
            kwargs={"autocommit": True, "connect_timeout": max(1, round(timeout_s))},
            timeout=timeout_s,
            check=ConnectionPool.check_connection,
            configure=functools.partial(_configure, statement_timeout_ms=statement_timeout_ms),
            open=False,
            name="ecu-ledger",
        )
        # Do not wait: a database that is down at start-up is an UNAVAILABLE later, not a crash.
        self._pool.open(wait=False)

    @contextlib.contextmanager
    def transaction(self, *, write: bool) -> Iterator[Tx]:
        from psycopg import errors
        from psycopg_pool import PoolTimeout

        try:
            with self._pool.connection() as conn:
                try:
                    with conn.transaction(), conn.cursor() as cur:
                        if not write:
                            cur.execute(
                                "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"
                            )
                        yield _PgTx(cur)
                except errors.ReadOnlySqlTransaction:
                    # The session is read-only for good: opened on a standby (still one, or
                    # since promoted elsewhere behind the same address), or while the database
                    # had default_transaction_read_only on; so are its siblings, opened there
                    # too. Drained, the pool replaces them all (this one when it comes back)
                    # with fresh sessions, which write once the database does; kept, they
                    # would refuse every write after the database recovered.
                    self._pool.drain()
                    raise
        except (errors.DeadlockDetected, errors.SerializationFailure) as exc:
            raise Retry(str(exc)) from exc
        except PoolTimeout as exc:
            raise LedgerUnavailable(f"PostgreSQL: no connection within the timeout: {exc}") from exc
        except (self._psycopg.OperationalError, errors.ReadOnlySqlTransaction) as exc:
            raise LedgerUnavailable(f"PostgreSQL: {exc}") from exc

    def lock_migrations(self, tx: Tx) -> None:
        tx.rows(
            "SELECT pg_advisory_xact_lock(?, hashtext(current_schema()))",
            (_MIGRATION_LOCK_CLASS,),
        )

    def table_exists(self, tx: Tx, name: str) -> bool:
        return tx.rows("SELECT to_regclass(?) IS NOT NULL", (name,))[0][0]

    def month_start_ms(self, column: str) -> str:
        return (
            "CAST(EXTRACT(EPOCH FROM date_trunc('month', "
            f"to_timestamp({column} / 1000) AT TIME ZONE 'UTC')) AS BIGINT) * 1000"
        )

    def close(self) -> None:
        self._pool.close()


# --------------------------------------------------------------------------- SQLite


class _SqliteTx:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._conn.execute(sql, params).fetchall()

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._conn.execute(sql, params).rowcount

    def many(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        if params:
            self._conn.executemany(sql, params)

    def insert(
        self,
        table: str,
        columns: tuple[tuple[str, str], ...],
        rows: Sequence[Sequence[Any]],
        *,
        conflict: str = "",
        returning: str = "",
    ) -> list[tuple[Any, ...]]:
        if not rows:
            return []
        names = ", ".join(name for name, _ in columns)
        row = "(" + ", ".join("?" * len(columns)) + ")"
        head = f"INSERT INTO {table} ({names}) VALUES "
        if not returning:
            self._conn.executemany(f"{head}{row} {conflict}", rows)
            return []
        # executemany cannot return rows: multi-row statements, in order.
        size = max(1, min(_SQLITE_CHUNK, _SQLITE_MAX_VARIABLES // len(columns)))
        out: list[tuple[Any, ...]] = []
        for i in range(0, len(rows), size):
            chunk = rows[i : i + size]
            sql = f"{head}{', '.join([row] * len(chunk))} {conflict} RETURNING {returning}"
            out += self._conn.execute(sql, [v for r in chunk for v in r]).fetchall()
        return out


class SqliteBackend:
    """SQLite: WAL, synchronous=FULL, foreign keys on, a busy timeout; writes start with
    BEGIN IMMEDIATE (one writer at a time, across threads and processes). A file database keeps
    a small pool of connections, one per concurrent caller; ``:memory:`` has one connection
    shared under a lock (every connection to :memory: would be a database of its own)."""

    dialect = "sqlite"

    def __init__(self, path: str, *, busy_timeout_ms: int) -> None:
        if sqlite3.sqlite_version_info < SQLITE_MIN_VERSION:
            raise LedgerArgumentError(
                f"SQLite {sqlite3.sqlite_version} is too old for the ledger: it needs "
                f"{'.'.join(map(str, SQLITE_MIN_VERSION))} or later (RETURNING)"
            )
        self.path = path
        self.refusals = (sqlite3.DataError, sqlite3.IntegrityError)
        self._busy_ms = busy_timeout_ms
        self._memory = path == ":memory:"
        self._lock = threading.Lock()
        self._idle: list[sqlite3.Connection] = []
        self._all: list[sqlite3.Connection] = []
        self._closed = False
        self._shared = threading.Lock() if self._memory else None
        # This process's writers queue here, so that the busy timeout measures only another
        # process's hold on the database (an outage), never this process's own concurrent
        # writers (the reconciler checks 16 organizations at once): SQLite's busy handler
        # backs off by sleeps, and a few threads racing for the lock could each miss it
        # past a short timeout.
        self._writer = threading.RLock()

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float) -> SqliteBackend:
        """``sqlite://`` + path: sqlite:///var/lib/ecu/ledger.db (absolute), sqlite://ledger.db
        (relative), sqlite://:memory:. ``?busy_timeout_ms=N`` overrides the busy timeout."""
        rest = url.split("://", 1)[1]
        path, _, query = rest.partition("?")
        if not path:
            raise LedgerArgumentError(f"ledger URL: no database path in {url!r}")
        busy = round(timeout_s * 1000)
        for key, values in parse_qs(query, keep_blank_values=True).items():
            if key != "busy_timeout_ms" or not values[-1].isdigit():
                raise LedgerArgumentError(
                    f"ledger URL: unknown or malformed parameter {key!r} (only busy_timeout_ms=N)"
                )
            busy = int(values[-1])
        return cls(path, busy_timeout_ms=busy)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=self._busy_ms / 1000, isolation_level=None, check_same_thread=False
        )
        try:
            if not self._memory:
                self._enable_wal(conn)
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute(f"PRAGMA busy_timeout={int(self._busy_ms)}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        # WAL is a property of the file: set once, every later connection finds it. Switching
        # needs the file to itself, and SQLite answers "locked" at once (no busy wait) while a
        # concurrent first connection holds it: retry for up to the busy timeout.
        deadline = time.monotonic() + self._busy_ms / 1000
        while True:
            try:
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc).lower() or time.monotonic() >= deadline:
                    raise
                time.sleep(0.005)
        if mode.lower() != "wal":
            raise LedgerUnavailable(f"SQLite: cannot switch {self.path} to WAL ({mode})")

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        if self._shared is not None:
            with self._shared:
                if not self._all:
                    self._all.append(self._connect())
                yield self._all[0]
            return
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._connect()
            with self._lock:
                self._all.append(conn)
        try:
            yield conn
        finally:
            with self._lock:
                closed = self._closed
                if not closed:
                    self._idle.append(conn)
            if closed:
                conn.close()  # closed by its own thread, never under it (see close)

    @contextlib.contextmanager
    def transaction(self, *, write: bool) -> Iterator[Tx]:
        try:
            with self._connection() as conn, self._writer if write else contextlib.nullcontext():
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield _SqliteTx(conn)
                    conn.execute("COMMIT")
                finally:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
        except sqlite3.OperationalError as exc:
            text = str(exc).lower()
            if any(w in text for w in ("locked", "busy", "disk", "unable to open", "readonly")):
                raise LedgerUnavailable(f"SQLite {self.path}: {exc}") from exc
            raise

    def lock_migrations(self, tx: Tx) -> None:
        # BEGIN IMMEDIATE already holds the database's write lock.
        return None

    def table_exists(self, tx: Tx, name: str) -> bool:
        return bool(
            tx.rows("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,))
        )

    def month_start_ms(self, column: str) -> str:
        return (
            f"CAST(strftime('%s', {column} / 1000, 'unixepoch', 'start of month') AS INTEGER) "
            "* 1000"
        )

    def close(self) -> None:
        # Only idle connections close here: one still in use (a call the engine stopped waiting
        # for past ECU_LEDGER_TIMEOUT_MS runs on in its thread) closes when that thread returns
        # it. Closing a connection under a running statement crashes the process.
        if self._shared is not None:
            with self._shared:
                conns, self._all = self._all, []
            for conn in conns:
                conn.close()
            return
        with self._lock:
            self._closed = True
            conns, self._all, self._idle = self._idle, [], []
        for conn in conns:
            conn.close()
