"""Approved jobs in the ledger: the ``jobs`` rows their job_open and job_close events write, and
what a Redis rebuild restores of them (``ledger_jobs``).

Money never moves through these rows: a job's steps are holds and commits like any other
(``hold_events`` and ``usage_entries``, each row carrying its job id), so the totals stay what
they were. A job's room is derived from them, never stored: approved + what its steps drew from
the wallet beyond it (``extra_uecu`` of its reserve rows) − what its steps billed from its
money (``job_uecu`` of its usage rows) − what its outstanding steps hold. A superseded end of a
hold (handlers.Effects) leaves the derivation right, since it only reads outstanding steps.
"""

from __future__ import annotations

from typing import Any

from ecu_sidecar.jobs import ACCURACY_WINDOW, JobAccuracy, JobPolicy, JobState, JobView
from ecu_sidecar.ledger.backends import Tx
from ecu_sidecar.ledger.events import Event
from ecu_sidecar.model import LedgerHold

__all__ = [
    "JOB_STATES",
    "flush_jobs",
    "ledger_accuracy",
    "ledger_jobs",
    "on_job_close",
    "on_job_open",
    "open_jobs",
]

#: A job_close event's state, as the jobs table spells it.
JOB_STATES = {s.value: s.word for s in (JobState.CLOSED, JobState.ABANDONED)}
_BY_NAME = {s.word: s for s in JobState}
#: Ended jobs a rebuild restores (so that a replayed close is still answered), newest first.
_RECENT_ENDED = 1_000


def on_job_open(tx: Tx, ev: Event, opens: list[tuple[Any, ...]]) -> None:
    """Queue the job's row (inserted once, by Effects.flush)."""
    v = ev.values
    opens.append(
        (ev.org, v["job_id"], ev.event_id, ev.ts, v["job"], v["team"], v["project"], v["user"],
         v["policy"], v["amount"], v["extra_max"], v["rcv"] or "", v["ttl"])
    )  # fmt: skip


def on_job_close(tx: Tx, ev: Event, closes: list[tuple[Any, ...]]) -> None:
    """Queue the job's end. Its event id is its open event's with job_close for job_open."""
    v = ev.values
    opened = "job_open:" + ev.event_id.partition(":")[2]
    t0 = ev.event_id.rsplit(":", 1)[-1]
    closes.append(
        (ev.org, v["job_id"], opened, int(t0) if t0.isdigit() else ev.ts, v["job"], v["team"],
         v["project"], v["approved"], JOB_STATES[v["state"]], ev.ts, ev.event_id,
         v["returned"] + v["steps_uecu"], v["committed"])
    )  # fmt: skip


def flush_jobs(tx: Tx, opens: list[tuple[Any, ...]], closes: list[tuple[Any, ...]]) -> None:
    """Opens first, then ends: a batch holds events in event id order (job_close before
    job_open). An end whose open is not recorded writes what the end knows of the job."""
    for row in opens:
        tx.run(
            "INSERT INTO jobs (org_id, job_id, open_event_id, opened_at_ms, job_type, team, "
            "project, user_id, policy, approved_uecu, extra_max_uecu, rate_card_version, ttl_ms) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (org_id, open_event_id) DO NOTHING",
            row,
        )
    for row in closes:
        tx.run(
            "INSERT INTO jobs (org_id, job_id, open_event_id, opened_at_ms, job_type, team, "
            "project, approved_uecu, state, ended_at_ms, close_event_id, returned_uecu, "
            "committed_at_end_uecu) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (org_id, open_event_id) DO UPDATE SET state = excluded.state, "
            "ended_at_ms = excluded.ended_at_ms, close_event_id = excluded.close_event_id, "
            "returned_uecu = excluded.returned_uecu, "
            "committed_at_end_uecu = excluded.committed_at_end_uecu",
            row,
        )


_JOBS_SQL = """
    SELECT job_id, state, approved_uecu, extra_max_uecu, policy, team, project, user_id,
           job_type, rate_card_version, ttl_ms, opened_at_ms, ended_at_ms, returned_uecu
      FROM jobs WHERE org_id = ? AND {where}
"""
#: Per job (org, job id, opened at): what its steps drew, billed and ended.
_STEPS_SQL = """
    SELECT (SELECT COALESCE(SUM(extra_uecu), 0) FROM hold_events
             WHERE org_id = ? AND job_id = ? AND kind = 'reserve' AND occurred_at_ms >= ?),
           (SELECT COUNT(*) FROM hold_events
             WHERE org_id = ? AND job_id = ? AND kind = 'reserve' AND occurred_at_ms >= ?),
           (SELECT COUNT(*) FROM hold_events
             WHERE org_id = ? AND job_id = ? AND kind IN ('release', 'expire')
               AND occurred_at_ms >= ?),
           (SELECT COALESCE(SUM(amount_uecu), 0) FROM usage_entries
             WHERE org_id = ? AND job_id = ? AND occurred_at_ms >= ?),
           (SELECT COALESCE(SUM(job_uecu), 0) FROM usage_entries
             WHERE org_id = ? AND job_id = ? AND occurred_at_ms >= ?),
           (SELECT COUNT(*) FROM usage_entries
             WHERE org_id = ? AND job_id = ? AND occurred_at_ms >= ?)
"""


def ledger_jobs(tx: Tx, org: str, outstanding: list[LedgerHold]) -> list[JobView]:
    """The jobs a rebuild of ``org`` restores: every open one, with its room derived (module
    docstring), and the latest ended ones."""
    rows = tx.rows(_JOBS_SQL.format(where="state = 'open' ORDER BY opened_at_ms"), (org,))
    rows += tx.rows(
        _JOBS_SQL.format(where=f"state <> 'open' ORDER BY ended_at_ms DESC LIMIT {_RECENT_ENDED}"),
        (org,),
    )
    held: dict[str, int] = {}
    for h in outstanding:
        if h.job_id:
            held[h.job_id] = held.get(h.job_id, 0) + h.amount_uecu
    out = []
    for row in rows:
        jid, state_name, approved, xmax, policy, team, project, user = row[:8]
        job_type, rcv, ttl, opened, ended, returned = row[8:]
        key = (org, jid, opened)
        extra, steps, ended_steps, committed, from_job, committed_steps = tx.rows(
            _STEPS_SQL, key * 6
        )[0]
        state = _BY_NAME[state_name]
        is_open = state is JobState.OPEN
        steps_held = held.get(jid, 0) if is_open else 0
        room = int(approved) + int(extra) - int(from_job) - steps_held if is_open else 0
        out.append(
            JobView(
                job_id=jid,
                state=state,
                approved_uecu=int(approved),
                extra_uecu=int(extra),
                extra_max_uecu=int(xmax or 0),
                room_uecu=room,
                steps_held_uecu=steps_held,
                committed_uecu=int(committed),
                steps=int(steps),
                steps_committed=int(committed_steps),
                steps_ended=int(ended_steps),
                policy=JobPolicy(policy or JobPolicy.REFUSE.value),
                team=team,
                project=project,
                user=user or "",
                job_type=job_type,
                rate_card_version=rcv or "",
                ttl_ms=int(ttl or 0),
                deadline_unix_ms=0,
                opened_at_ms=int(opened),
                ended_at_ms=int(ended or 0),
                returned_uecu=int(returned or 0),
            )
        )
    return out


# The latest by the time each job ended; among jobs that ended in the same millisecond the order
# is by open event id, which says nothing of which ended last (a ratio shown beside the worst
# case, not money: Redis's halving is no more exact).
_ACCURACY_SQL = f"""
    SELECT job_type, COUNT(*), SUM(committed_at_end_uecu), SUM(approved_uecu) FROM (
        SELECT job_type, committed_at_end_uecu, approved_uecu, ROW_NUMBER() OVER (
                   PARTITION BY job_type ORDER BY ended_at_ms DESC, open_event_id DESC) AS r
          FROM jobs WHERE org_id = ? AND state = 'closed') latest
     WHERE r <= {ACCURACY_WINDOW} GROUP BY job_type ORDER BY job_type
"""


def ledger_accuracy(tx: Tx, org: str) -> list[JobAccuracy]:
    """The accuracy of ``org``'s latest closed jobs per job type (what a rebuild restores for
    Preview's expected cost; abandoned jobs are not counted, as in Redis)."""
    return [
        JobAccuracy(job, int(n), int(committed or 0), int(approved or 0))
        for job, n, committed, approved in tx.rows(_ACCURACY_SQL, (org,))
    ]


def open_jobs(tx: Tx) -> int:
    """How many jobs are open across every organization (index jobs_open)."""
    return int(tx.rows("SELECT COUNT(*) FROM jobs WHERE state = 'open'", ())[0][0])
