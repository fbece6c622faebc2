"""The ledger commands as an operator runs them: migrate, serve with the embedded store and a
SQLite ledger (flusher in-process, final flush on SIGTERM), and report."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ecu_sidecar.ledger import open_ledger
from tests.test_cli import clean_env, cli, ok, run_cli, start_serve, stop_serve


def test_migrate_applies_then_reports_up_to_date(tmp_path: Path) -> None:
    env = clean_env(ECU_LEDGER_URL=f"sqlite://{tmp_path}/l.db")
    first = ok(run_cli("migrate", env=env))
    assert "applied 1" in first
    assert "up to date" in ok(run_cli("migrate", env=env))
    with open_ledger(f"sqlite://{tmp_path}/l.db") as ledger:
        ledger.check_schema()


def test_ledger_commands_need_a_ledger_url() -> None:
    for args in (("migrate",), ("flush", "--once"), ("report", "--org", "acme")):
        result = run_cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert "ECU_LEDGER_URL" in result.stderr


def test_flush_refuses_a_ledger_that_was_not_migrated(tmp_path: Path) -> None:
    env = clean_env(
        ECU_LEDGER_URL=f"sqlite://{tmp_path}/new.db", ECU_REDIS_URL="redis://127.0.0.1:6379/0"
    )
    result = run_cli("flush", "--once", env=env)
    assert result.returncode == 1
    assert "SchemaBehind" in result.stderr and "migrate" in result.stderr


def test_serve_flushes_into_sqlite_and_report_adds_up(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path}/ledger.db"
    serve = start_serve(tmp_path / "serve.log", ECU_LEDGER_URL=url)
    commits: list[tuple[str, int]] = []
    try:
        ok(cli(serve, "grant", "acme", "10ECU", "--grant-id", "g1"))
        for i, (team, actual) in enumerate(
            [("red", 120_000), ("blue", 300_000), ("red", 45_000), ("blue", 1)]
        ):
            rid = f"step-{i}"
            ok(
                cli(
                    serve,
                    "reserve",
                    "acme",
                    "500000",
                    "--job-type",
                    "gepa",
                    "--team",
                    team,
                    "--id",
                    rid,
                )
            )
            ok(cli(serve, "commit", "acme", rid, str(actual)))
            commits.append((team, actual))
        ok(cli(serve, "reserve", "acme", "70000", "--job-type", "gepa", "--id", "open"))
    finally:
        assert stop_serve(serve) == 0  # SIGTERM: drain, then the final flush
    assert "final flush moved" in serve.log.read_text()

    env = clean_env(ECU_LEDGER_URL=url)
    report = json.loads(
        ok(run_cli("report", "--org", "acme", "--by", "team", "--format", "json", env=env))
    )
    by_team: dict[str, int] = {}
    for team, actual in commits:
        by_team[team] = by_team.get(team, 0) + actual
    got = {row["team"]: row["amount_uecu"] for row in report["consumption"]}
    assert got == by_team
    assert report["balance_uecu"] == 10_000_000 - sum(by_team.values())
    assert {t["key"] for t in report["top_consumers"]} == set(by_team)
    assert report["top_consumers"][0]["key"] == max(by_team, key=by_team.__getitem__)

    rows = list(
        csv.DictReader(
            io.StringIO(ok(run_cli("report", "--org", "acme", "--format", "csv", env=env)))
        )
    )
    assert sum(int(r["amount_uecu"]) for r in rows) == sum(by_team.values())
    table = ok(run_cli("report", "--org", "acme", env=env))
    assert f"balance {10_000_000 - sum(by_team.values())} uECU" in table

    with open_ledger(url) as ledger:
        c = ledger.conservation("acme")
        assert c is not None and c.ok
        held = ledger.account("acme")
        assert held is not None and held.holds.outstanding_uecu == 70_000


def test_flush_once_against_a_replica_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """READONLY (the flusher reaching a demoted primary) is Redis unavailable: one line, exit
    1, nothing written; not a ledger write failure with a traceback."""
    from tests.replicated_redis import ReplicatedRedis

    pair = ReplicatedRedis()
    try:
        with pair.client(pair.primary) as primary:  # an outbox with an event to flush
            primary.xadd("ecu:{acme}:outbox", {"e": "1"})
        pair.wait_linked()
        url = f"sqlite://{tmp_path}/l.db"
        ok(run_cli("migrate", env=clean_env(ECU_LEDGER_URL=url)))
        env = clean_env(
            ECU_LEDGER_URL=url, ECU_REDIS_URL=f"redis://127.0.0.1:{pair.replica.port}/0"
        )
        result = run_cli("flush", "--once", env=env)
        assert result.returncode == 1, result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert "ERROR" in last and "flush --once stopped: Redis unavailable (Redis cannot" in last
        assert "Traceback" not in result.stderr
    finally:
        pair.close()
