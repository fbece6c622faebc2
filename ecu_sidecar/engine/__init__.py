"""The reservation engine: validate a request, then one store call (docs/architecture.md).

- ``engine``: QuotaEngine, what the gRPC service and the CLI call;
- ``hydrator``: an organization Redis lost rebuilt from the ledger (LedgerReader), with its
  deadline and negative cache; commits of holds Redis lost settled by the ledger's record;
- ``grants``: ledger-first grants (GrantLedger);
- ``jobs``: approved jobs (JobDesk): approval against the current rate card, get, heartbeat,
  close, and the rate card version a job's steps are priced with;
- ``degraded``: opt-in local decisions while Redis is unreachable, and their replay;
- ``journal``: degraded mode's fsynced journal;
- ``sweep``: the background sweeper's schedule of recently served organizations.
"""

from ecu_sidecar.engine.engine import QuotaEngine
from ecu_sidecar.engine.grants import GrantLedger
from ecu_sidecar.engine.hydrator import LedgerReader
from ecu_sidecar.engine.journal import Journal
from ecu_sidecar.engine.sweep import SWEEP_IDLE_INTERVALS, SweepSchedule

__all__ = [
    "SWEEP_IDLE_INTERVALS",
    "GrantLedger",
    "Journal",
    "LedgerReader",
    "QuotaEngine",
    "SweepSchedule",
]
