"""The sidecar's benchmark (issue 6): the sidecar measured against its floors in one run.

``python -m bench`` (or ``make bench``) runs, on this machine and against 127.0.0.1 only:

- floor A: a no-op ``grpc.aio`` server answering the same Quota RPCs with canned responses,
  built with the sidecar's server options and driven by the same client code;
- floor B: the reserve and commit Lua scripts run directly with redis-py, same concurrency;
- the sidecar: a real ``SidecarServer`` (``ecu-sidecar serve``) in its own process against
  real Redis, Reserve→Commit and Reserve→Release pairs at concurrency 1, 16, 64 across 1 and
  1,000 organizations; ReserveBatch/CommitBatch of 100 steps; Preview of a 100,000-token prompt
  against tiktoken's own encode; Redis round trips per RPC from ``INFO commandstats``;
- the flusher: events/s from the outbox into PostgreSQL, and its lag under steady traffic;
- levers: the same runs with uvloop as the server's event loop policy (and prototype patches
  of the hot path applied in the benchmark's own process, never in the product's code).

Every load loop is bounded in time (and the children are killed past a deadline). Results go
to ``bench/results.json`` and ``docs/benchmarks.md``. ``--smoke`` runs every section for a
fraction of a second (the test suite runs it); it asserts nothing about speed.
"""
