"""The ``ecu-sidecar`` commands that call a running sidecar: the client they use (target,
TLS, admin token) and one function per command (``job approve|show|heartbeat|close``: one for
the approval, one for the rest)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import grpc
from google.protobuf.json_format import ParseDict, ParseError

from ecu_sidecar.api.v1 import quota_pb2 as pb
from ecu_sidecar.cli.output import (
    UsageError,
    columns,
    emit,
    money,
    plain,
    scope_json,
    scope_line,
    table,
    when,
)
from ecu_sidecar.client import ExpectedCost, QuotaClient, tls_credentials
from ecu_sidecar.jobs import JobView
from ecu_sidecar.model import Usage
from ecu_sidecar.settings import Settings


class Defaults:
    """ECU_* settings, read only when a default is actually needed."""

    def __init__(self) -> None:
        self._settings: Settings | None = None

    def get(self) -> Settings:
        if self._settings is None:
            self._settings = Settings.from_env()
        return self._settings


def client_target(listen: str) -> str:
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


def _admin_token(args: argparse.Namespace, defaults: Defaults) -> str | None:
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


def credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """TLS credentials from --tls/--tls-ca/--tls-cert/--tls-key; None: plaintext."""
    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_key):
        return None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key: give both (mutual TLS) or neither")
    try:
        return tls_credentials(args.tls_ca, args.tls_cert, args.tls_key)
    except OSError as exc:
        raise UsageError(f"TLS: cannot read {exc.filename}: {exc.strerror}") from None


def client_for(args: argparse.Namespace, defaults: Defaults) -> QuotaClient:
    target = args.target or client_target(defaults.get().listen)
    token = _admin_token(args, defaults) if getattr(args, "admin", False) else None
    return QuotaClient(
        target, admin_token=token, timeout_s=args.timeout, credentials=credentials(args)
    )


def cmd_balance(args: argparse.Namespace, c: QuotaClient) -> None:
    b = c.balance(args.org)
    data = {
        **{k: v for k, v in dataclasses.asdict(b).items() if k not in ("teams", "projects")},
        "available_uecu": b.available_uecu,
        "teams": [scope_json(s) for s in b.teams],
        "projects": [scope_json(s) for s in b.projects],
    }
    rows = [
        ("organization", b.organization),
        ("available", money(b.available_uecu)),
        ("held", money(b.held_uecu)),
        ("balance", money(b.balance_uecu)),
        ("granted", money(b.granted_uecu)),
        ("committed", money(b.committed_uecu)),
        ("overage", money(b.overage_uecu)),
        ("unbilled overage", money(b.unbilled_overage_uecu)),
        ("late committed", money(b.late_committed_uecu)),
        ("late unbilled", money(b.late_unbilled_uecu)),
        ("expired grants", money(b.expired_grants_uecu)),
        ("outstanding holds", b.outstanding_holds),
        ("expired holds", b.expired_holds),
    ]
    scopes = [scope_line("team", s) for s in b.teams]
    scopes += [scope_line("project", s) for s in b.projects]
    emit(args, data, table(rows) + scopes)


def cmd_grant(args: argparse.Namespace, c: QuotaClient) -> None:
    out = c.grant(
        args.org,
        args.amount,
        grant_id=args.grant_id,
        kind=args.kind,
        expires_at_ms=args.expires_at_ms,
    )
    rows = [
        ("granted", f"{money(args.amount)} to {args.org}"),
        ("grant", out.grant_id + (" (replayed)" if out.replayed else "")),
        ("balance", money(out.balance_uecu)),
        ("available", money(out.available_uecu)),
    ]
    emit(args, {**dataclasses.asdict(out), "amount_uecu": args.amount}, table(rows))


def cmd_reserve(args: argparse.Namespace, c: QuotaClient) -> None:
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
        job_id=args.job or "",
    )
    (h,) = out.holds
    rows = [
        ("reservation", h.reservation_id + (" (replayed)" if out.replayed else "")),
        ("hold", f"{money(h.amount_uecu)} {h.state.name.lower()}"),
        ("deadline", f"{when(h.deadline_unix_ms)} ({h.deadline_unix_ms})"),
        ("available", money(out.available_uecu)),
    ]
    data = {**dataclasses.asdict(h), "available_uecu": out.available_uecu}
    if out.job_room_uecu is not None:
        rows.append(("job room left", f"{money(out.job_room_uecu)} of job {args.job}"))
        data["job_id"], data["job_remaining_uecu"] = args.job, out.job_room_uecu
    emit(args, {**data, "replayed": out.replayed}, table(rows))


def cmd_commit(args: argparse.Namespace, c: QuotaClient) -> None:
    usage = Usage(args.tokens_in, args.tokens_out, args.calls)
    out = c.commit(args.org, args.reservation_id, args.actual, usage=usage)
    rows = [
        ("reservation", out.reservation_id + (" (replayed)" if out.replayed else "")),
        ("committed", money(out.committed_uecu)),
        ("released", money(out.released_uecu)),
        ("overage", money(out.overage_uecu)),
        ("unbilled overage", money(out.unbilled_overage_uecu)),
        ("late", "yes" if out.late else "no"),
        ("available", money(out.available_uecu)),
    ]
    data = {k: v for k, v in dataclasses.asdict(out).items() if k != "error"}
    emit(args, data, table(rows))


def cmd_release(args: argparse.Namespace, c: QuotaClient) -> None:
    out = c.release(args.org, args.reservation_id)
    rows = [
        ("reservation", out.reservation_id + (" (replayed)" if out.replayed else "")),
        ("state", out.state.name.lower()),
        ("released", money(out.released_uecu)),
        ("available", money(out.available_uecu)),
    ]
    emit(args, dataclasses.asdict(out), table(rows))


def cmd_extend(args: argparse.Namespace, c: QuotaClient) -> None:
    out = c.extend(args.org, args.reservation_id, sequence=args.sequence, ttl_ms=args.ttl_ms)
    rows = [
        ("reservation", out.reservation_id + (" (replayed)" if out.replayed else "")),
        ("deadline", f"{when(out.deadline_unix_ms)} ({out.deadline_unix_ms})"),
    ]
    emit(args, dataclasses.asdict(out), table(rows))


def read_job(path: str) -> pb.JobSpec:
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


def _expected(e: ExpectedCost | None) -> str:
    if e is None:
        return "- (no job of this type closed yet: the worst case is all there is)"
    return (
        f"{money(e.total_uecu)} (the latest {e.jobs} closed jobs of this type committed "
        f"{e.committed_uecu * 100 // max(e.approved_uecu, 1)} % of what they approved)"
    )


def cmd_preview(args: argparse.Namespace, c: QuotaClient) -> None:
    job = read_job(args.job_file)
    out = c.preview(args.org, job, team=args.team, project=args.project, user=args.user)
    q = out.quote
    data = {
        "organization": args.org,
        "total_uecu": q.total_uecu,
        "rate_card_version": q.rate_card_version,
        "covered": out.covered,
        "available_uecu": out.available_uecu,
        "available_after_uecu": out.available_after_uecu,
        "expected": plain(dataclasses.asdict(out.expected)) if out.expected else None,
        "lines": [plain(dataclasses.asdict(x)) for x in q.lines],
    }
    # Enterprise discounts make a subtotal less than quantity × rate: show them when present.
    discounted = any(x.discount_uecu for x in q.lines)
    header = ["description", "quantity", "unit", "rate (uECU per)"]
    header += ["discount (uECU)"] if discounted else []
    breakdown = columns(
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
        ("total (worst case)", money(q.total_uecu)),
        ("expected", _expected(out.expected)),
        ("rate card", q.rate_card_version),
        ("available", money(out.available_uecu)),
        ("covered", f"{covered} (available after: {money(out.available_after_uecu)})"),
    ]
    emit(args, data, [*breakdown, "", *table(rows)])


def cmd_rates(args: argparse.Namespace, c: QuotaClient) -> None:
    card = c.rate_card(args.org or "")
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
        *[(name.removesuffix("_uecu").replace("_", " "), money(v)) for name, v in fees.items()],
        ("enterprise terms", ", ".join(card.organizations_with_terms) or "none"),
    ]
    models = columns(
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
    emit(args, data, [*table(rows), "", *models])


def cmd_auto_top_up(args: argparse.Namespace, c: QuotaClient) -> None:
    if args.off:
        c.set_auto_topup(args.org, None)
        emit(
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
        ("below", money(args.threshold)),
        ("top up", money(args.amount)),
    ]
    emit(args, data, table(rows))


def cmd_set_cap(args: argparse.Namespace, c: QuotaClient) -> None:
    out = c.set_cap(args.org, args.scope, args.id, None if args.clear else args.cap)
    emit(args, scope_json(out), [scope_line(args.scope, out)])


def _job_json(v: JobView) -> dict[str, object]:
    data = {k: plain(x) for k, x in dataclasses.asdict(v).items()}
    data["state"] = v.state.name.lower()
    return {**data, "drawn_uecu": v.drawn_uecu, "accuracy": v.accuracy}


def _emit_job(args: argparse.Namespace, v: JobView) -> None:
    state = v.state.name.lower() + (" (replayed)" if v.replayed else "")
    rows = [
        ("job", f"{v.job_id} {state}"),
        ("approved", money(v.approved_uecu) + f" ({v.policy.value}, rate card "
         f"{v.rate_card_version or 'none: a plain amount'})"),
        ("committed", money(v.committed_uecu)),
        ("held by steps", money(v.steps_held_uecu)),
        ("remaining", money(v.room_uecu)),
        ("extra", f"{money(v.extra_uecu)} of at most {money(v.extra_max_uecu)}"),
        ("steps", f"{v.steps} ({v.steps_committed} committed, {v.steps_ended} ended unbilled)"),
    ]  # fmt: skip
    if v.state.name == "OPEN":
        rows.append(("ends unless alive", f"{when(v.deadline_unix_ms)} (ttl {v.ttl_ms} ms)"))
    else:
        rows.append(("returned", f"{money(v.returned_uecu)} at {when(v.ended_at_ms)}"))
    if v.accuracy is not None:
        rows.append(("accuracy", f"{v.accuracy:.1%} of the approval committed"))
    rows.append(("available", money(v.available_uecu)))
    emit(args, _job_json(v), table(rows))


def cmd_job_approve(args: argparse.Namespace, c: QuotaClient) -> None:
    view = c.approve_job(
        args.org,
        args.job_id,
        args.amount,
        job=read_job(args.job) if args.job else None,
        rate_card_version=args.rate_card_version,
        job_type=args.job_type,
        policy=args.policy,
        ttl_ms=args.ttl_ms,
        team=args.team,
        project=args.project,
        user=args.user,
    )
    _emit_job(args, view)


#: ``job show|heartbeat|close``: what each does to the job.
JOB_ACTIONS = {"show": "get", "heartbeat": "touch", "close": "close"}


def cmd_job(args: argparse.Namespace, c: QuotaClient) -> None:
    calls = {"get": c.get_job, "touch": c.heartbeat_job, "close": c.close_job}
    _emit_job(args, calls[JOB_ACTIONS[args.action]](args.org, args.job_id))
