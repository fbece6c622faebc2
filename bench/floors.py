"""The two floors that make the flusher's and the scripts' targets ratios (issue 15).

- **COPY floor** (``copy_floor``): the rows a flusher drain left in its ledger schema, copied
  with psycopg's binary ``COPY`` into a fresh, migrated schema of the same PostgreSQL, every
  table in one transaction, foreign keys and indexes as the ledger has them: no Redis, no
  validation, no Python per row. The flusher's events/s over this floor's events/s is the
  share of the database's own bulk-insert speed the flusher reaches.
- **minimal hold** (``redis_cost``): what holding money costs inside Redis at the least, one
  ``HINCRBY``, one ``HSET`` and one ``ZADD`` on the organization's keys, run the same way as
  the reserve and commit scripts (EVALSHA with redis-py, ``calls`` in a row, interleaved, on a
  private redis-server); ``INFO commandstats`` read around every call gives its µs inside
  Redis, and the figure is the mean of the fastest half of them.
"""

from __future__ import annotations

import time
from typing import Any

from bench.stats import median, trimmed_mean

__all__ = ["MINIMAL_HOLD", "copy_floor", "redis_cost"]

#: The minimal hold script: the Redis floor of a step.
MINIMAL_HOLD = """\
-- minimal hold: the least a hold costs inside Redis (the floor of the Redis cost target).
--   KEYS[1] the account hash  KEYS[2] the holds hash  KEYS[3] the deadlines zset
--   ARGV[1] reservation id  ARGV[2] amount  ARGV[3] deadline ms  ARGV[4] hold record
-- Returns 1.
redis.call('HINCRBY', KEYS[1], 'held', ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
return 1
"""


# -- the COPY floor --------------------------------------------------------------------------


def _tables(conn: Any, schema: str) -> list[str]:
    """The schema's tables, every table after the tables its foreign keys reference."""
    rows = conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relkind = 'r' ORDER BY c.relname",
        (schema,),
    ).fetchall()
    deps = conn.execute(
        "SELECT a.relname, b.relname FROM pg_constraint k "
        "JOIN pg_class a ON a.oid = k.conrelid JOIN pg_class b ON b.oid = k.confrelid "
        "JOIN pg_namespace n ON n.oid = a.relnamespace "
        "WHERE k.contype = 'f' AND n.nspname = %s",
        (schema,),
    ).fetchall()
    needs: dict[str, set[str]] = {r[0]: set() for r in rows}
    for child, parent in deps:
        if child != parent:
            needs[child].add(parent)
    ordered: list[str] = []
    while needs:
        ready = sorted(t for t, parents in needs.items() if parents <= set(ordered))
        if not ready:
            raise RuntimeError(f"copy floor: foreign keys form a cycle in {sorted(needs)}")
        ordered += ready
        for t in ready:
            del needs[t]
    return ordered


def copy_floor(pg_url: str, source: str, target: str) -> dict[str, Any]:
    """Copy every row of schema ``source`` (a drained ledger) into ``target`` (a fresh,
    migrated schema) with binary COPY in one transaction; returns the events/s of that
    transaction. The rows are read into memory first: only the writing is timed."""
    import psycopg

    with psycopg.connect(pg_url, autocommit=True, connect_timeout=5) as conn:
        tables = [t for t in _tables(conn, source) if t != "schema_migrations"]
        data: list[tuple[str, list[bytes], int]] = []
        for table in tables:
            (n,) = conn.execute(f"SELECT count(*) FROM {source}.{table}").fetchone() or (0,)
            if not n:
                continue
            chunks: list[bytes] = []
            with conn.cursor().copy(f"COPY {source}.{table} TO STDOUT (FORMAT binary)") as cp:
                chunks.extend(bytes(c) for c in cp)
            data.append((table, chunks, int(n)))
    rows = {table: n for table, _, n in data}
    with psycopg.connect(pg_url, connect_timeout=5) as conn:
        t0 = time.perf_counter()
        with conn.transaction():
            for table, chunks, _ in data:
                with conn.cursor().copy(f"COPY {target}.{table} FROM STDIN (FORMAT binary)") as cp:
                    for chunk in chunks:
                        cp.write(chunk)
        seconds = time.perf_counter() - t0
    events = rows.get("events", 0)
    return {
        "events": events,
        "rows": rows,
        "seconds": seconds,
        "events_per_s": events / seconds if seconds else 0.0,
    }


# -- the minimal hold --------------------------------------------------------------------------


def _evalsha_usec(client: Any) -> tuple[int, int]:
    stats = client.info("commandstats").get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0)), int(stats.get("usec", 0))


def redis_cost(
    redis_url: str, prefix: str, org: str, calls: dict[str, Any], n: int, repeats: int
) -> dict[str, Any]:
    """µs per call inside Redis of the reserve and commit scripts (``calls``: the product's
    captured calls, bench.scriptargs) and of the minimal hold, each ``n`` calls in a row,
    ``repeats`` times in turn, on a Redis nothing else uses; ``org`` is funded."""
    import redis

    from ecu_sidecar.store.keys import SUFFIXES, org_keys

    client = redis.Redis.from_url(redis_url, socket_timeout=10)
    try:
        minimal_sha = client.script_load(MINIMAL_HOLD)
        for call in calls.values():
            client.script_load(call.source)
        keys = org_keys(prefix, org)
        hold_keys = [keys[SUFFIXES.index(s)] for s in ("acct", "holds", "deadlines")]
        deadline = int(time.time() * 1000) + 3_600_000
        each: dict[str, list[float]] = {"minimal": [], "reserve": [], "commit": []}

        def timed(name: str, run: Any) -> None:
            durations = []
            calls0, usec0 = _evalsha_usec(client)
            for i in range(n):
                reply = run(i)
                if reply != 1 and reply[0] != b"OK":
                    raise RuntimeError(f"redis cost: {name} refused: {reply!r}"[:300])
                calls1, usec1 = _evalsha_usec(client)
                if calls1 - calls0 != 1:
                    raise RuntimeError(f"redis cost: another client ran EVALSHA during {name}")
                durations.append(usec1 - usec0)
                calls0, usec0 = calls1, usec1
            each[name].append(trimmed_mean(durations))

        for rep in range(repeats):
            rid = f"rc{rep}-"
            timed(
                "minimal",
                lambda i, rid=rid: client.evalsha(
                    minimal_sha, 3, *hold_keys, f"m{rid}{i}", 1_000, deadline, f"1000:{deadline}"
                ),
            )
            for name in ("reserve", "commit"):
                call = calls[name]
                timed(
                    name,
                    lambda i, c=call, rid=rid: client.evalsha(c.sha, *c.args(org, f"{rid}{i}")),
                )
    finally:
        client.close()
    step = [r + c for r, c in zip(each["reserve"], each["commit"], strict=True)]
    ratios = [s / m for s, m in zip(step, each["minimal"], strict=True)]
    return {
        "calls": n,
        "us_per_call": {k: median(v) for k, v in each.items()},
        "us_each": each,
        "step_ratios": ratios,
    }
