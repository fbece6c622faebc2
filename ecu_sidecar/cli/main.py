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
import logging
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ecu_sidecar import __version__
from ecu_sidecar.cli import client_commands as cc
from ecu_sidecar.cli import ledger as ledger_commands
from ecu_sidecar.cli.client_commands import Defaults, client_for
from ecu_sidecar.cli.output import UsageError, parse_uecu
from ecu_sidecar.client import DEFAULT_TIMEOUT_S, QuotaClient, QuotaError
from ecu_sidecar.jobs import JobPolicy
from ecu_sidecar.ledger import LedgerError
from ecu_sidecar.logs import configure as configure_logging
from ecu_sidecar.model import GrantKind, JobType
from ecu_sidecar.settings import Settings, SettingsError, describe

__all__ = ["build_parser", "main"]

log = logging.getLogger(__name__)


# -- logging -----------------------------------------------------------------------------------


# JSON or text lines with structured fields, secrets redacted: ecu_sidecar.logs.
def _configure_logging(settings: Settings) -> None:
    configure_logging(settings)


def _cmd_serve(args: argparse.Namespace, defaults: Defaults) -> int:
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


def _cmd_check_config(args: argparse.Namespace, defaults: Defaults) -> int:
    for name, value in describe(defaults.get()).items():
        text = str(value).lower() if isinstance(value, bool) else value
        print(f"{name}={text}")
    return 0


def _cmd_health(args: argparse.Namespace, defaults: Defaults) -> int:
    """Is the process beside us healthy: a sidecar's gRPC health (ECU_HEALTH_LISTEN, else
    ECU_LISTEN), or with --flusher a flusher's /livez (ECU_METRICS_LISTEN). For an image's
    HEALTHCHECK or an exec probe: one line, exit 0 (healthy) or 1."""
    settings = defaults.get()
    if args.flusher:
        if not settings.metrics_listen:
            raise UsageError("health --flusher: ECU_METRICS_LISTEN is not set (no /livez)")
        url = f"http://{cc.client_target(settings.metrics_listen)}/livez"
        try:
            with urllib.request.urlopen(url, timeout=args.timeout) as reply:
                print(f"{url}: {reply.status} {reply.read().decode().strip()}")
                return 0
        except urllib.error.HTTPError as exc:
            print(f"{url}: {exc.code} {exc.read().decode().strip()}")
        except OSError as exc:
            print(f"{url}: {getattr(exc, 'reason', exc)}")
        return 1
    target = cc.client_target(settings.health_listen or settings.listen)
    secure = settings.tls and not settings.health_listen
    channel = (
        grpc.secure_channel(target, cc.credentials(args) or grpc.ssl_channel_credentials())
        if secure
        else grpc.insecure_channel(target)
    )
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            print(f"{target}: {exc.code().name}")
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


# -- parser ------------------------------------------------------------------------------------


def non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def seconds(text: str) -> float:
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
    ledger_commands.add_commands(sub)

    sub.add_parser(
        "serve", help="run the sidecar until SIGTERM/SIGINT (configured by ECU_* variables)"
    ).set_defaults(run=_cmd_serve)
    sub.add_parser(
        "check-config", help="validate ECU_* settings and print them (secrets masked)"
    ).set_defaults(run=_cmd_check_config)
    p = sub.add_parser(
        "health",
        help="exit 0 when the sidecar (or, with --flusher, the flusher) in this pod is healthy: "
        "for HEALTHCHECK and exec probes",
    )
    p.add_argument("--flusher", action="store_true", help="ask the flusher's /livez instead")
    p.add_argument(
        "--service", default="", help="the gRPC health service to ask (default: the server)"
    )
    p.add_argument("--timeout", type=seconds, default=DEFAULT_TIMEOUT_S, help="seconds")
    for flag, what in (("--tls-ca", "CA"), ("--tls-cert", "client cert"), ("--tls-key", "key")):
        p.add_argument(flag, metavar="PEM", help=f"{what} for a TLS ECU_LISTEN without health port")
    p.set_defaults(run=_cmd_health, tls=False)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--target", help="sidecar host:port (default: from ECU_LISTEN, wildcards as loopback)"
    )
    common.add_argument(
        "--timeout",
        type=seconds,
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

    p = client_command("balance", "show an organization's balance, holds and caps", cc.cmd_balance)
    p.add_argument("org")

    p = client_command("grant", "admin: credit an organization", cc.cmd_grant, is_admin=True)
    p.add_argument("org")
    p.add_argument("amount", type=parse_uecu, help="uECU, or ECU with a suffix (2.5ECU)")
    p.add_argument("--grant-id", required=True, help="idempotency id: a replay changes nothing")
    p.add_argument("--kind", choices=[k.value for k in GrantKind], default=GrantKind.TOP_UP.value)
    p.add_argument(
        "--expires-at-ms", type=non_negative, default=0, help="Unix ms; 0 = never (default)"
    )

    p = client_command("reserve", "place a hold", cc.cmd_reserve)
    p.add_argument("org")
    p.add_argument("amount", type=parse_uecu, help="worst case: uECU, or ECU with a suffix")
    p.add_argument("--job-type", required=True, choices=[j.value for j in JobType])
    p.add_argument("--model", default="", help="required for inference and judge")
    p.add_argument("--team", default="")
    p.add_argument("--project", default="")
    p.add_argument("--user", default="")
    p.add_argument("--ttl-ms", type=non_negative, default=0, help="0 = the sidecar's default")
    p.add_argument("--id", default=None, help="reservation id (default: a fresh uuid4 hex)")
    p.add_argument("--job", metavar="JOB_ID", help="a step of this approved job (job approve)")

    p = client_command("commit", "settle a hold with its actual cost", cc.cmd_commit)
    p.add_argument("org")
    p.add_argument("reservation_id")
    p.add_argument("actual", type=parse_uecu, help="uECU, or ECU with a suffix")
    p.add_argument("--tokens-in", type=non_negative, default=0)
    p.add_argument("--tokens-out", type=non_negative, default=0)
    p.add_argument("--calls", type=non_negative, default=0)

    p = client_command("release", "void a hold", cc.cmd_release)
    p.add_argument("org")
    p.add_argument("reservation_id")

    p = client_command("extend", "push a hold's deadline (heartbeat)", cc.cmd_extend)
    p.add_argument("org")
    p.add_argument("reservation_id")
    p.add_argument("--sequence", type=non_negative, required=True, help="from 1, increasing")
    p.add_argument("--ttl-ms", type=non_negative, default=0, help="0 = the hold's own TTL")

    p = client_command(
        "set-cap", "admin: set or clear a team/project cap", cc.cmd_set_cap, is_admin=True
    )
    p.add_argument("org")
    p.add_argument("scope", choices=["team", "project"])
    p.add_argument("id", help="the team or project id")
    cap = p.add_mutually_exclusive_group(required=True)
    cap.add_argument("cap", nargs="?", type=parse_uecu, help="uECU, or ECU with a suffix")
    cap.add_argument("--clear", action="store_true", help="remove the cap")

    p = client_command("preview", "price a job spec's worst case (no side effects)", cc.cmd_preview)
    p.add_argument(
        "job_file",
        metavar="JOB_FILE",
        help="job spec in the proto JSON form (see examples/job.json); YAML with PyYAML; - = stdin",
    )
    p.add_argument("--org", required=True, help="the organization whose balance covers it")
    p.add_argument("--team", default="")
    p.add_argument("--project", default="")
    p.add_argument("--user", default="")

    _add_job_commands(sub, common)

    p = client_command("rates", "show the rate card the sidecar prices with", cc.cmd_rates)
    p.add_argument(
        "--org", help="your organization: whether it has negotiated terms (without the admin token)"
    )
    # With ECU_ADMIN_TOKEN set, the card names every organization with negotiated terms.
    p.set_defaults(admin=True)

    p = client_command(
        "auto-top-up",
        "admin: notify billing to top up when available falls below a threshold",
        cc.cmd_auto_top_up,
        is_admin=True,
    )
    p.add_argument("org")
    p.add_argument("threshold", nargs="?", type=parse_uecu, help="below this: uECU or ECU")
    p.add_argument("amount", nargs="?", type=parse_uecu, help="top up this much: uECU or ECU")
    p.add_argument("--off", action="store_true", help="turn auto-top-up off")
    return parser


def _add_job_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """``job approve|show|heartbeat|close``: approved jobs (docs/jobs.md)."""
    jobs = sub.add_parser(
        "job", help="approved jobs: approve a preview once, then steps draw from it (--job)"
    )
    actions = jobs.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser(
        "approve",
        parents=[common],
        help="open a job holding the approved total (idempotent on JOB_ID)",
    )
    p.set_defaults(call=cc.cmd_job_approve)
    p.add_argument("org")
    p.add_argument("job_id", metavar="JOB_ID")
    p.add_argument(
        "amount", type=parse_uecu, help="the approved total: the preview's total with --job"
    )
    p.add_argument(
        "--job", metavar="JOB_FILE", help="the previewed job spec (as for preview), priced again"
    )
    p.add_argument(
        "--rate-card-version", default="", help="with --job: the preview's rate card version"
    )
    p.add_argument("--job-type", choices=[j.value for j in JobType], help="required without --job")
    p.add_argument(
        "--policy",
        choices=[x.value for x in JobPolicy],
        default=JobPolicy.REFUSE.value,
        help="a step beyond the job's room: refused (default), or drawn from the wallet",
    )
    p.add_argument("--ttl-ms", type=non_negative, default=0, help="0 = ECU_JOB_TTL_MS")
    p.add_argument("--team", default="")
    p.add_argument("--project", default="")
    p.add_argument("--user", default="")
    for action, what in (
        ("show", "a job's amounts, steps and state"),
        ("heartbeat", "keep an open job alive for another ttl"),
        ("close", "close a job: what it did not bill returns to the wallet"),
    ):
        p = actions.add_parser(action, parents=[common], help=what)
        p.set_defaults(call=cc.cmd_job)
        p.add_argument("org")
        p.add_argument("job_id", metavar="JOB_ID")


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
    defaults = Defaults()
    try:
        if hasattr(args, "run"):
            if args.command in ("flush", "migrate"):  # long-running ops commands log like serve
                _configure_logging(defaults.get())
            return int(args.run(args, defaults))
        with client_for(args, defaults) as c:
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
