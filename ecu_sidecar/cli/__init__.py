"""The ``ecu-sidecar`` command, one module per concern: ``main`` (the parser, ``serve``,
``check-config``, exit codes), ``client_commands`` (the commands that call a running sidecar),
``ledger`` (``migrate``, ``flush``, ``report``) and ``output`` (amounts in and text or JSON
out)."""

from __future__ import annotations

from ecu_sidecar.cli.main import build_parser, main
from ecu_sidecar.cli.output import UsageError, format_ecu, parse_uecu

__all__ = ["UsageError", "build_parser", "format_ecu", "main", "parse_uecu"]
