"""The ``ecu-sidecar`` command: run the sidecar, check its configuration, or talk to one.

Exit codes: 0 success; 1 the sidecar refused or could not be reached (``error: <CODE>
<reason>: <message>`` on stderr); 2 bad usage or configuration (the precise message on stderr).
``flush`` (and ``flush --once``): 0 when its final drain finished, 1 when Redis or the ledger
stopped it (one line in ECU_LOG_FORMAT on stderr; nothing is lost), 2 bad configuration.

Amounts are integer µECU (``2500000`` or ``2500000uECU``) or ECU with an explicit suffix
(``2.5ECU``), converted exactly; anything that is not a whole number of µECU is refused.
Defaults (target, admin token) come from the same ECU_* settings the sidecar reads.

``preview JOB_FILE`` reads a job spec in the proto JSON form (``examples/job.json``), or YAML
of the same shape when PyYAML is installed; the sidecar prices it.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import logging
import re
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import ParseDict, ParseError

from ecu_sidecar import __version__, ledger_cli
from ecu_sidecar.api.v1 import quota_pb2 as pb
from ecu_sidecar.client import DEFAULT_TIMEOUT_S, QuotaClient, QuotaError, tls_credentials
from ecu_sidecar.ledger import LedgerError
from ecu_sidecar.logs import JsonFormatter
from ecu_sidecar.logs import configure as configure_logging
from ecu_sidecar.model import UECU_PER_ECU, GrantKind, HoldState, JobType, Usage
from ecu_sidecar.settings import Settings, SettingsError, describe

__all__ = ["JsonFormatter", "UsageError", "build_parser", "format_ecu", "main", "parse_uecu"]

log = logging.getLogger(__name__)

_UECU = re.compile(r"([0-9]+)\s*(?:uECU|µECU)?", re.IGNORECASE)
_ECU = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*ECU", re.IGNORECASE)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# -- amounts -----------------------------------------------------------------------------------


def parse_uecu(text: str) -> int:
    """An amount as integer µECU: ``1500`` / ``1500uECU``, or ECU with a suffix: ``2.5ECU``."""
    value = text.strip()
    if m := _UECU.fullmatch(value):
        return int(m.group(1))
    if m := _ECU.fullmatch(value):
        uecu = Decimal(m.group(1)) * UECU_PER_ECU
        if uecu != uecu.to_integral_value():
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a whole number of uECU (1 ECU = {UECU_PER_ECU} uECU)"
            )
        return int(uecu)
    raise argparse.ArgumentTypeError(
        f"{text!r} is not an amount: give integer uECU (2500000) or ECU with a suffix (2.5ECU)"
    )


def format_ecu(uecu: int) -> str:
    """µECU as exact ECU, trailing zeros dropped: 2500000 -> '2.5'."""
    sign = "-" if uecu < 0 else ""
    whole, frac = divmod(abs(uecu), UECU_PER_ECU)
    return f"{sign}{whole}" + (f".{frac:06d}".rstrip("0") if frac else "")


def _money(uecu: int) -> str:
    return f"{uecu} uECU ({format_ecu(uecu)} ECU)"


class UsageError(Exception):
    """A bad command line or input file: printed as ``error: ...``, exit status 2."""


def _when(unix_ms: int) -> str:
    stamp = (_EPOCH + timedelta(milliseconds=unix_ms)).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


# -- logging -----------------------------------------------------------------------------------


# JSON or text lines with structured fields, secrets redacted: ecu_sidecar.logs.
def _configure_logging(settings: Settings) -> None:
    configure_logging(settings)


# -- output ------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """Outcomes as JSON-ready values: hold states by name, other enums by value."""
    if isinstance(value, HoldState):
        return value.name.lower()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _emit(args: argparse.Namespace, data: dict[str, Any], lines: Sequence[str]) -> None:
    if args.json:
        print(json.dumps(_plain(data), sort_keys=True))
    else:
        print("\n".join(lines))


def _table(rows: Sequence[tuple[str, object]]) -> list[str]:
    width = max(len(k) for k, _ in rows)
    return [f"{k:<{width}}  {v}" for k, v in rows]


def _columns(header: Sequence[str], rows: Sequence[Sequence[object]], right: set[int]) -> list[str]:
    """An aligned text table; columns in ``right`` are right-aligned (numbers)."""
    cells = [list(map(str, header)), *[list(map(str, r)) for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        out = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        return "  ".join(out).rstrip()

    return [fmt(cells[0]), *[fmt(row) for row in cells[1:]]]


def _scope_line(kind: str, s: Any) -> str:
    cap = "uncapped" if s.cap_uecu is None else f"cap {s.cap_uecu}"
    left = "" if s.cap_uecu is None else f" available {s.available_uecu}"
    return f"{kind} {s.id}: {cap} held {s.held_uecu} used {s.used_uecu}{left} (uECU)"


def _scope_json(s: Any) -> dict[str, Any]:
    return {**dataclasses.asdict(s), "available_uecu": s.available_uecu}


# -- commands ----------------------------------------------------------------------------------


class _Defaults:
    """ECU_* settings, read only when a default is actually needed."""

    def __init__(self) -> None:
        self._settings: Settings | None = None

    def get(self) -> Settings:
        if self._settings is None:
            self._settings = Settings.from_env()
        return self._settings


def _client_target(listen: str) -> str:
    """Where a local client reaches a sidecar that binds ``listen`` (wildcards -> loopback; a
    Unix socket as it is)."""
    if listen.startswith("unix:"):
        return listen
    host, _, port = listen.rpartition(":")
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host in ("[::]", "::"):
        host = "[::1]"
    return f"{host}:{port}"


def _admin_token(args: argparse.Namespace, defaults: _Defaults) -> str | None:
    """The admin token: from --admin-token-file, else ECU_ADMIN_TOKEN. A token given on the
    command line is refused: the arguments of every process are readable by every user."""
    if getattr(args, "admin_token", None):
        raise UsageError(
            "--admin-token: a token on the command line is visible to every user (ps, "
            "/proc/<pid>/cmdline): set ECU_ADMIN_TOKEN or use --admin-token-file PATH"
        )
    path = getattr(args, "admin_token_file", None)
    if path is None:
        return defaults.get().admin_token or None
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"--admin-token-file: cannot read {path}: {exc.strerror}") from None
    token = text.strip()
    if not token:
        raise UsageError(f"--admin-token-file: {path} is empty")
    return token


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """TLS credentials from --tls/--tls-ca/--tls-cert/--tls-key; None: plaintext."""
    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_key):
        return None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key: give both (mutual TLS) or neither")
    try:
        return tls_credentials(args.tls_ca, args.tls_cert, args.tls_key)
    except OSError as exc:
        raise UsageError(f"TLS: cannot read {exc.filename}: {exc.strerror}") from None


def _client(args: argparse.Namespace, defaults: _Defaults) -> QuotaClient:
    target = args.target or _client_target(defaults.get().listen)
    token = _admin_token(args, defaults) if getattr(args, "admin", False) else None
    return QuotaClient(
        target, admin_token=token, timeout_s=args.timeout, credentials=_credentials(args)
    )


def _cmd_serve(args: argparse.Namespace, defaults: _Defaults) -> int:
    from ecu_sidecar import eventloop
    from ecu_sidecar.server import SidecarServer

    settings = defaults.get()
    _configure_logging(settings)
    try:
        eventloop.run(SidecarServer(settings).run_until_signal(), settings)
    except (OSError, RuntimeError) as exc:  # cannot bind ECU_LISTEN / ECU_METRICS_LISTEN
        log.critical("ecu-sidecar could not start: %s", exc)
        return 1
    return 0


def _cmd_check_config(args: argparse.Namespace, defaults: _Defaults) -> int:
    for name, value in describe(defaults.get()).items():
        text = str(value).lower() if isinstance(value, bool) else value
        print(f"{name}={text}")
    return 0


def _cmd_balance(args: argparse.Namespace, c: QuotaClient) -> None:
    b = c.balance(args.org)
    data = {
        **{k: v for k, v in dataclasses.asdict(b).items() if k not in ("teams", "projects")},
        "available_uecu": b.available_uecu,
        "teams": [_scope_json(s) for s in b.teams],
        "projects": [_scope_json(s) for s in b.projects],
    }
    rows = [
        ("organization", b.organization),
        ("available", _money(b.available_uecu)),
        ("held", _money(b.held_uecu)),
        ("balance", _money(b.balance_uecu)),
        ("granted", _money(b.granted_uecu)),
        ("committed", _money(b.committed_uecu)),
        ("overage", _money(b.overage_uecu)),
        ("unbilled overage", _money(b.unbilled_overage_uecu)),
        ("late committed", _money(b.late_committed_uecu)),
        ("late unbilled", _money(b.late_unbilled_uecu)),
        ("expired grants", _money(b.expired_grants_uecu)),
        ("outstanding holds", b.outstanding_holds),
        ("expired holds", b.expired_holds),
    ]
    scopes = [_scope_line("team", s) for s in b.teams]
    scopes += [_scope_line("project", s) for s in b.projects]
    _emit(args, data, _table(rows) + scopes)


def _cmd_grant(args: argparse.Namespace, c: QuotaClient) -> None:
    out = c.grant(
        args.org,
        args.amount,
        grant_id=args.grant_id,
        kind=args.kind,
        expires_at_ms=args.expires_at_ms,
    )
    rows = [
        ("granted", f"{_money(args.amount)} to {args.org}"),
        ("grant", out.grant_id + (" (replayed)" if out.replayed else "")),
        ("balance", _money(out.balance_uecu)),
        ("available", _money(out.available_uecu)),
    ]
    _emit(args, {**dataclasses.asdict(out), "amount_uecu": args.amount}, _table(rows))


def _cmd_reserve(args: argparse.Namespace, c: QuotaClient) -> None:
    out = c.reserve(
        args.org,
        args.amount,
        job_type=args.job_type,
        model=args.model,
        team=args.team,
        project=args.project,
        user=args.user,
        ttl_ms=args.ttl_ms,
        reservation_id=args.id,
    )
    (h,) = out.holds
    rows = [
        ("reservation", h.reservation_id + (" (replayed)" if out.replayed else "")),
        ("hold", f"{_money(h.amount_uecu)} {h.state.name.lower()}"),
        ("deadline", f"{_when(h.deadline_unix_ms)} ({h.deadline_unix_ms})"),
        ("available", _money(out.available_uecu)),
    ]
    data = {**dataclasses.asdict(h), "available_uecu": out.available_uecu}
    _emit(args, {**data, "replayed": out.replayed}, _table(rows))


def _cmd_commit(args: argparse.Namespace, c: QuotaClient) -> None:
    usage = Usage(args.tokens_in, args.tokens_out, args.calls)
    out = c.commit(args.org, args.reservation_id, args.actual, usage=usage)
    rows = [
        ("reservation", out.reservation_id + (" (replayed)" if out.replayed else "")),
        ("committed", _money(out.committed_uecu)),
        ("released", _money(out.released_uecu)),
        ("overage", _money(out.overage_uecu)),
        ("unbilled overage", _money(out.unbilled_overage_uecu)),
        ("late", "yes" if out.late else "no"),
        ("available", _money(out.available_uecu)),
    ]
    data = {k: v for k, v in dataclasses.asdict(out).items() if k != "error"}
    _emit(args, data, _table(rows))


def _cmd_release(args: argparse.Namespace, c: QuotaClient) -> None:
    out = c.release(args.org, args.reservation_id)
    rows = [
        ("reservation", out.reservation_id + (" (replayed)" if out.replayed else "")),
        ("state", out.state.name.lower()),
        ("released", _money(out.released_uecu)),
        ("available", _money(out.available_uecu)),
    ]
    _emit(args, dataclasses.asdict(out), _table(rows))


def _cmd_extend(args: argparse.Namespace, c: QuotaClient) -> None:
    out = c.extend(args.org, args.reservation_id, sequence=args.sequence, ttl_ms=args.ttl_ms)
    rows = [
        ("reservation", out.reservation_id + (" (replayed)" if out.replayed else "")),
        ("deadline", f"{_when(out.deadline_unix_ms)} ({out.deadline_unix_ms})"),
    ]
    _emit(args, dataclasses.asdict(out), _table(rows))


def _read_job(path: str) -> pb.JobSpec:
    """A job spec file (``-``: standard input): JSON, or YAML when PyYAML is installed."""
    name = "<stdin>" if path == "-" else path
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{name}: cannot read the job file: {exc}") from None
    if Path(path).suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml  # type: ignore[import-untyped]
        except ImportError:
            raise UsageError(
                f"{name}: reading YAML needs PyYAML, which is not installed "
                "(pip install pyyaml); or give the job as JSON"
            ) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UsageError(f"{name}: is not valid YAML: {exc}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(
                f"{name}: is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
            ) from None
    if not isinstance(data, dict):
        raise UsageError(f'{name}: must hold a job spec object ({{"items": [...]}})')
    try:
        return ParseDict(data, pb.JobSpec())
    except ParseError as exc:
        raise UsageError(f"{name}: is not a job spec: {exc}") from None


#: Token rates are per this many tokens (ecu_sidecar.pricing.pricer.PER_MTOK).
_PER_MTOK = 1_000_000


def _per(unit: str, per: int) -> str:
    if per == 1:
        return unit
    if per == _PER_MTOK:
        return f"1M {unit}s"
    return f"{per} {unit}s"


def _cmd_preview(args: argparse.Namespace, c: QuotaClient) -> None:
    job = _read_job(args.job_file)
    out = c.preview(args.org, job, team=args.team, project=args.project, user=args.user)
    q = out.quote
    data = {
        "organization": args.org,
        "total_uecu": q.total_uecu,
        "rate_card_version": q.rate_card_version,
        "covered": out.covered,
        "available_uecu": out.available_uecu,
        "available_after_uecu": out.available_after_uecu,
        "lines": [_plain(dataclasses.asdict(x)) for x in q.lines],
    }
    # Enterprise discounts make a subtotal less than quantity × rate: show them when present.
    discounted = any(x.discount_uecu for x in q.lines)
    header = ["description", "quantity", "unit", "rate (uECU per)"]
    header += ["discount (uECU)"] if discounted else []
    table = _columns(
        [*header, "subtotal (uECU)"],
        [
            (
                x.description,
                x.quantity,
                str(x.unit),
                f"{x.rate_uecu} / {_per(str(x.unit), x.per)}",
                *([f"-{x.discount_uecu}"] if discounted else []),
                x.subtotal_uecu,
            )
            for x in q.lines
        ],
        right={1, 4, 5},
    )
    covered = "yes" if out.covered else "NO"
    rows = [
        ("total (worst case)", _money(q.total_uecu)),
        ("rate card", q.rate_card_version),
        ("available", _money(out.available_uecu)),
        ("covered", f"{covered} (available after: {_money(out.available_after_uecu)})"),
    ]
    _emit(args, data, [*table, "", *_table(rows)])


def _cmd_rates(args: argparse.Namespace, c: QuotaClient) -> None:
    card = c.rate_card()
    fees = dataclasses.asdict(card.fees)
    data = {
        "version": card.version,
        "versions": card.versions,
        "fees": fees,
        "models": [dataclasses.asdict(m) for m in card.models],
        "organizations_with_terms": card.organizations_with_terms,
    }
    rows = [
        ("rate card", card.version),
        ("loaded versions", ", ".join(card.versions)),
        *[(name.removesuffix("_uecu").replace("_", " "), _money(v)) for name, v in fees.items()],
        ("enterprise terms", ", ".join(card.organizations_with_terms) or "none"),
    ]
    models = _columns(
        (
            "model",
            "input (uECU / 1M tokens)",
            "output (uECU / 1M tokens)",
            "encoding",
            "context",
            "max output",
            "estimate factor",
        ),
        [
            (
                m.name,
                m.input_uecu_per_mtok,
                m.output_uecu_per_mtok,
                m.encoding,
                m.context_window,
                m.max_output_tokens,
                f"{m.estimate_factor_percent}%",
            )
            for m in card.models
        ],
        right={1, 2, 4, 5, 6},
    )
    _emit(args, data, [*_table(rows), "", *models])


def _cmd_auto_top_up(args: argparse.Namespace, c: QuotaClient) -> None:
    if args.off:
        c.set_auto_topup(args.org, None)
        _emit(
            args, {"organization": args.org, "enabled": False}, [f"auto-top-up off for {args.org}"]
        )
        return
    c.set_auto_topup(args.org, args.threshold, args.amount)
    data = {
        "organization": args.org,
        "enabled": True,
        "threshold_uecu": args.threshold,
        "amount_uecu": args.amount,
    }
    rows = [
        ("organization", args.org),
        ("below", _money(args.threshold)),
        ("top up", _money(args.amount)),
    ]
    _emit(args, data, _table(rows))


def _cmd_set_cap(args: argparse.Namespace, c: QuotaClient) -> None:
    out = c.set_cap(args.org, args.scope, args.id, None if args.clear else args.cap)
    _emit(args, _scope_json(out), [_scope_line(args.scope, out)])


# -- parser ------------------------------------------------------------------------------------


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 600:
        raise argparse.ArgumentTypeError(f"must be > 0 and <= 600 seconds, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="ecu-sidecar",
        description="ECU quota sidecar: serve, check configuration, or call a running sidecar.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ledger_cli.add_commands(sub)

    sub.add_parser(
        "serve", help="run the sidecar until SIGTERM/SIGINT (configured by ECU_* variables)"
    ).set_defaults(run=_cmd_serve)
    sub.add_parser(
        "check-config", help="validate ECU_* settings and print them (secrets masked)"
    ).set_defaults(run=_cmd_check_config)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--target", help="sidecar host:port (default: from ECU_LISTEN, wildcards as loopback)"
    )
    common.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT_S,
        help=f"deadline of each attempt in seconds (default {DEFAULT_TIMEOUT_S})",
    )
    common.add_argument("--json", action="store_true", help="print one JSON object")
    tls = common.add_argument_group("TLS (a sidecar with ECU_TLS_CERT_FILE)")
    tls.add_argument(
        "--tls", action="store_true", help="connect with TLS, trusting the system's CAs"
    )
    tls.add_argument("--tls-ca", metavar="PEM", help="connect with TLS, trusting this CA")
    tls.add_argument(
        "--tls-cert", metavar="PEM", help="this client's certificate chain (mutual TLS)"
    )
    tls.add_argument("--tls-key", metavar="PEM", help="this client's private key (mutual TLS)")
    admin = argparse.ArgumentParser(add_help=False, parents=[common])
    admin.add_argument(
        "--admin-token-file",
        metavar="PATH",
        default=None,
        help="read the admin bearer token from this file ('-': standard input); default: "
        "ECU_ADMIN_TOKEN. Never on the command line, where every user sees it in ps",
    )
    admin.add_argument("--admin-token", help=argparse.SUPPRESS, default=None)
    admin.set_defaults(admin=True)

    def client_command(
        name: str,
        help_: str,
        fn: Callable[[argparse.Namespace, QuotaClient], None],
        *,
        is_admin=False,
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, parents=[admin if is_admin else common])
        p.set_defaults(call=fn)
        return p

    p = client_command("balance", "show an organization's balance, holds and caps", _cmd_balance)
    p.add_argument("org")

    p = client_command("grant", "admin: credit an organization", _cmd_grant, is_admin=True)
    p.add_argument("org")
    p.add_argument("amount", type=parse_uecu, help="uECU, or ECU with a suffix (2.5ECU)")
    p.add_argument("--grant-id", required=True, help="idempotency id: a replay changes nothing")
    p.add_argument("--kind", choices=[k.value for k in GrantKind], default=GrantKind.TOP_UP.value)
    p.add_argument(
        "--expires-at-ms", type=_non_negative, default=0, help="Unix ms; 0 = never (default)"
    )

    p = client_command("reserve", "place a hold", _cmd_reserve)
    p.add_argument("org")
    p.add_argument("amount", type=parse_uecu, help="worst case: uECU, or ECU with a suffix")
    p.add_argument("--job-type", required=True, choices=[j.value for j in JobType])
    p.add_argument("--model", default="", help="required for inference and judge")
    p.add_argument("--team", default="")
    p.add_argument("--project", default="")
    p.add_argument("--user", default="")
    p.add_argument("--ttl-ms", type=_non_negative, default=0, help="0 = the sidecar's default")
    p.add_argument("--id", default=None, help="reservation id (default: a fresh uuid4 hex)")

    p = client_command("commit", "settle a hold with its actual cost", _cmd_commit)
    p.add_argument("org")
    p.add_argument("reservation_id")
    p.add_argument("actual", type=parse_uecu, help="uECU, or ECU with a suffix")
    p.add_argument("--tokens-in", type=_non_negative, default=0)
    p.add_argument("--tokens-out", type=_non_negative, default=0)
    p.add_argument("--calls", type=_non_negative, default=0)

    p = client_command("release", "void a hold", _cmd_release)
    p.add_argument("org")
    p.add_argument("reservation_id")

    p = client_command("extend", "push a hold's deadline (heartbeat)", _cmd_extend)
    p.add_argument("org")
    p.add_argument("reservation_id")
    p.add_argument("--sequence", type=_non_negative, required=True, help="from 1, increasing")
    p.add_argument("--ttl-ms", type=_non_negative, default=0, help="0 = the hold's own TTL")

    p = client_command(
        "set-cap", "admin: set or clear a team/project cap", _cmd_set_cap, is_admin=True
    )
    p.add_argument("org")
    p.add_argument("scope", choices=["team", "project"])
    p.add_argument("id", help="the team or project id")
    cap = p.add_mutually_exclusive_group(required=True)
    cap.add_argument("cap", nargs="?", type=parse_uecu, help="uECU, or ECU with a suffix")
    cap.add_argument("--clear", action="store_true", help="remove the cap")

    p = client_command("preview", "price a job spec's worst case (no side effects)", _cmd_preview)
    p.add_argument(
        "job_file",
        metavar="JOB_FILE",
        help="job spec in the proto JSON form (see examples/job.json); YAML with PyYAML; - = stdin",
    )
    p.add_argument("--org", required=True, help="the organization whose balance covers it")
    p.add_argument("--team", default="")
    p.add_argument("--project", default="")
    p.add_argument("--user", default="")

    client_command("rates", "show the rate card the sidecar prices with", _cmd_rates)

    p = client_command(
        "auto-top-up",
        "admin: notify billing to top up when available falls below a threshold",
        _cmd_auto_top_up,
        is_admin=True,
    )
    p.add_argument("org")
    p.add_argument("threshold", nargs="?", type=parse_uecu, help="below this: uECU or ECU")
    p.add_argument("amount", nargs="?", type=parse_uecu, help="top up this much: uECU or ECU")
    p.add_argument("--off", action="store_true", help="turn auto-top-up off")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Argument combinations argparse cannot express."""
    if args.command == "auto-top-up":
        given = (args.threshold is not None) + (args.amount is not None)
        if args.off and given:
            parser.error("auto-top-up: give THRESHOLD AMOUNT or --off, not both")
        if not args.off and given != 2:
            parser.error("auto-top-up: give THRESHOLD AMOUNT (both), or --off")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    defaults = _Defaults()
    try:
        if hasattr(args, "run"):
            if args.command in ("flush", "migrate"):  # long-running ops commands log like serve
                _configure_logging(defaults.get())
            return int(args.run(args, defaults))
        with _client(args, defaults) as c:
            args.call(args, c)
        return 0
    except (SettingsError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except QuotaError as exc:
        print(f"error: {exc.code.name} {exc.reason}: {exc.message}", file=sys.stderr)
        return 1
    except LedgerError as exc:
        print(f"error: ledger: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
