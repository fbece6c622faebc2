"""The Python client evaluation workers use to talk to the sidecar, async and sync.

``AsyncQuotaClient`` (grpc.aio) and ``QuotaClient`` (blocking) have the same methods, each
written out in both; everything but the wire call is shared. One module per concern:

- ``requests``: each RPC's request, validated and built from plain Python values (caller ids
  fixed once);
- ``responses``: each RPC's response converted to the model's types;
- ``errors``: ``QuotaError`` and one subclass per status a worker acts on;
- ``retry``: ``RetryPolicy`` and the decision to try a failed call again;
- ``hold``: the ``hold()`` context managers and their keep-alive;
- ``job``: the ``job()`` context managers (an approved job: approve, heartbeat, close);
- ``base``: the connection settings both flavours take;
- ``aio`` and ``sync``: the two clients, each a channel, a call loop (per-attempt deadline,
  admin metadata, retries) and one thin method per RPC.

Import from this package, not its modules: the names below are the client's public API.

Retries (``retry``): only UNAVAILABLE and DEADLINE_EXCEEDED, a bounded number of times, and
only because every mutating call is idempotent by its caller id: a request is built once, so
a retry resends the same reservation id, grant id or extend sequence and the sidecar answers
it from its record instead of charging twice.

The star is ``hold``::

    async with client.hold(org="acme", amount_uecu=400_000, job_type="inference",
                           model="gpt-4o") as h:
        ...                                   # the step; h.extend() heartbeats long runs
        await h.commit(actual_uecu, usage=Usage(tokens_in=10))

An exception in the block, or leaving it without commit or release, releases the hold (unless
a commit's outcome is unknown); while the block runs, the hold is kept alive (``hold``).

A sidecar serving TLS (``ECU_TLS_CERT_FILE``; mutual TLS with ``ECU_TLS_CLIENT_CA_FILE``)::

    creds = tls_credentials(ca_file="ca.pem", cert_file="worker.pem", key_file="worker.key")
    async with AsyncQuotaClient("sidecar.evals:50051", credentials=creds) as client: ...

Workers never compute money: give ``job=`` (a ``pb.JobSpec`` or its proto JSON form as a dict)
instead of an amount and the sidecar holds the job's worst case, pinned to its rate card
version; then commit what was used as ``usage_lines`` and the sidecar prices it with that same
version, which the hold sends by itself::

    job = {"items": [{"inference": {"model": "gpt-4o", "promptText": prompt,
                                    "maxOutputTokens": 500}}]}
    print((await client.preview("acme", job)).quote.total_uecu)   # what the user approves
    async with client.hold(org="acme", job=job) as h:
        ...
        await h.commit(usage_lines=[UsageLine("inference", "gpt-4o", tokens_in=812,
                                              tokens_out=240, calls=1)])

An approved job (docs/jobs.md): the user approves the preview once, and every step of the run
draws from that approval instead of the wallet, so the run completes even when other traffic
drains the wallet; closing the job returns what it did not bill::

    shown = await client.preview("acme", job)
    async with client.job("acme", "eval-42", shown, job=job) as run:
        async with run.hold(job=step) as h:      # any number of steps, any workers
            ...
            await h.commit(usage_lines=[...])
    print(run.view.committed_uecu, run.accuracy)  # closed: committed / approved

Workers in other processes draw with ``client.hold(..., job_id="eval-42")``.
"""

from __future__ import annotations

from ecu_sidecar.client.aio import AsyncQuotaClient
from ecu_sidecar.client.base import DEFAULT_TARGET, DEFAULT_TIMEOUT_S, tls_credentials
from ecu_sidecar.client.errors import (
    Conflict,
    DeadlineExceeded,
    FailedPrecondition,
    InsufficientEcu,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    QuotaError,
    Unavailable,
    error_from_rpc,
)
from ecu_sidecar.client.hold import DEFAULT_KEEPALIVE_MARGIN, AsyncHold, Hold
from ecu_sidecar.client.job import AsyncJob, Job
from ecu_sidecar.client.requests import PreviewOutcome, RateCardInfo, new_caller_id
from ecu_sidecar.client.responses import ExpectedCost
from ecu_sidecar.client.retry import RETRYABLE_CODES, RetryPolicy
from ecu_sidecar.client.sync import QuotaClient
from ecu_sidecar.jobs import JobPolicy, JobState, JobView
from ecu_sidecar.pricing import UsageLine

__all__ = [
    "DEFAULT_KEEPALIVE_MARGIN",
    "DEFAULT_TARGET",
    "DEFAULT_TIMEOUT_S",
    "RETRYABLE_CODES",
    "AsyncHold",
    "AsyncJob",
    "AsyncQuotaClient",
    "Conflict",
    "DeadlineExceeded",
    "ExpectedCost",
    "FailedPrecondition",
    "Hold",
    "InsufficientEcu",
    "InvalidArgument",
    "Job",
    "JobPolicy",
    "JobState",
    "JobView",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "PreviewOutcome",
    "QuotaClient",
    "QuotaError",
    "RateCardInfo",
    "RetryPolicy",
    "Unavailable",
    "UsageLine",
    "error_from_rpc",
    "new_caller_id",
    "tls_credentials",
]
