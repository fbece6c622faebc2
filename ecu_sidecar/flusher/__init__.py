"""The flusher: moves every outbox event into the ledger exactly once (``loop``), keeps Redis
and the ledger in agreement and rebuilds what Redis lost (``reconcile``)."""

from ecu_sidecar.flusher.loop import Flusher
from ecu_sidecar.flusher.ports import FlusherLedger

__all__ = ["Flusher", "FlusherLedger"]
