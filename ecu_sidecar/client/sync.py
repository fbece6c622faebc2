"""The blocking client (grpc channel): one method per RPC, plus ``hold``.

Each method builds its call with the shared builder in ``requests`` (which validates the
arguments and fixes the caller ids) and makes it with ``call`` (public: the holds of
client/hold.py call through it): per-attempt deadline, admin metadata, retries as ``retry``
decides. ``AsyncQuotaClient`` (``aio``) is the same, awaited.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import grpc

from ecu_sidecar.api.v1 import quota_pb2 as pb
from ecu_sidecar.api.v1 import quota_pb2_grpc
from ecu_sidecar.client import requests
from ecu_sidecar.client.base import ClientBase
from ecu_sidecar.client.hold import DEFAULT_KEEPALIVE_MARGIN, Hold
from ecu_sidecar.client.job import Job
from ecu_sidecar.client.requests import Call, PreviewOutcome, RateCardInfo
from ecu_sidecar.client.retry import give_up, retry_after
from ecu_sidecar.jobs import JobPolicy, JobView
from ecu_sidecar.model import (
    Balance,
    CommitItem,
    CommitOutcome,
    ExtendOutcome,
    GrantKind,
    GrantOutcome,
    JobType,
    ReleaseOutcome,
    ReserveItem,
    ReserveOutcome,
    ScopeUsage,
    Usage,
)
from ecu_sidecar.pricing import Quote, UsageLine

__all__ = ["QuotaClient"]

T = TypeVar("T")


class QuotaClient(ClientBase):
    """The blocking client (grpc channel); use as ``with QuotaClient(...) as client``."""

    _channel: grpc.Channel | None = None
    _stub: quota_pb2_grpc.QuotaStub | None = None
    _opening = threading.Lock()  # threads may share a client; open one channel, not several

    def _get_stub(self) -> quota_pb2_grpc.QuotaStub:
        with self._opening:
            if self._stub is None:
                if self._credentials is None:
                    self._channel = grpc.insecure_channel(self.target, options=self._options)
                else:
                    self._channel = grpc.secure_channel(
                        self.target, self._credentials, options=self._options
                    )
                channel = grpc.intercept_channel(self._channel, *self._interceptors)
                self._stub = quota_pb2_grpc.QuotaStub(channel)
            return self._stub

    def call(self, call: Call[T]) -> T:
        """Make ``call``: the same request every attempt, retried as ``self.retry`` decides;
        after the first failure, an attempt waits (within its deadline) for the connection."""
        rpc = getattr(self._get_stub(), call.method)
        metadata = self._metadata(call)
        failures: list[grpc.RpcError] = []
        since = 0.0
        while True:
            try:
                response = rpc(
                    call.request,
                    timeout=self.timeout_s,
                    metadata=metadata,
                    wait_for_ready=bool(failures),
                )
            except grpc.RpcError as exc:
                if not failures:
                    since = time.monotonic()
                failures.append(exc)
                if not retry_after(self.retry, call.method, failures, since):
                    raise give_up(failures) from exc
                time.sleep(self.retry.backoff_s(len(failures)))
                continue
            return call.convert(response)

    def close(self) -> None:
        """Close the channel."""
        if self._channel is not None:
            self._channel.close()
            self._channel = self._stub = None

    def __enter__(self) -> QuotaClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def reserve(
        self,
        org: str,
        amount_uecu: int = 0,
        *,
        job_type: JobType | str | None = None,
        model: str = "",
        team: str = "",
        project: str = "",
        user: str = "",
        ttl_ms: int = 0,
        reservation_id: str | None = None,
        job: pb.JobSpec | Mapping[str, Any] | None = None,
        job_id: str = "",
    ) -> ReserveOutcome:
        """Hold a step's worst case: ``amount_uecu`` with its ``job_type``, or a ``job`` spec
        that the sidecar prices (its quote in ``quotes[0]``, pinned to the rate card version).
        The reservation id is generated when not given. With ``job_id``: a step of that
        approved job, drawn from its room (``job_room_uecu``: the room left)."""
        return self.call(
            requests.reserve(
                org,
                amount_uecu,
                job_type=job_type,
                model=model,
                team=team,
                project=project,
                user=user,
                ttl_ms=ttl_ms,
                reservation_id=reservation_id,
                job=job,
                job_id=job_id,
            )
        )

    def reserve_batch(
        self,
        org: str,
        items: Sequence[ReserveItem],
        *,
        team: str = "",
        project: str = "",
        user: str = "",
        job_id: str = "",
    ) -> ReserveOutcome:
        """Hold many steps of one account, all or none; items with an empty id get one. An
        item with ``job`` (amount 0, job_type None or given) is priced by the sidecar. With
        ``job_id``: steps of that approved job."""
        return self.call(
            requests.reserve_batch(org, items, team=team, project=project, user=user, job_id=job_id)
        )

    def commit(
        self,
        org: str,
        reservation_id: str,
        actual_uecu: int = 0,
        *,
        usage: Usage | None = None,
        usage_lines: Sequence[UsageLine | pb.UsageLine | Mapping[str, Any]] | None = None,
        rate_card_version: str = "",
    ) -> CommitOutcome:
        """Settle a hold with what the step really cost: ``actual_uecu``, or ``usage_lines``
        that the sidecar prices with ``rate_card_version`` (the version the hold was priced
        with; the price and its breakdown come back in ``quote``)."""
        return self.call(
            requests.commit(
                org,
                reservation_id,
                actual_uecu,
                usage=usage,
                usage_lines=usage_lines,
                rate_card_version=rate_card_version,
            )
        )

    def commit_batch(self, org: str, items: Sequence[CommitItem]) -> list[CommitOutcome]:
        """Settle many holds; failed items carry their QuotaError in ``CommitOutcome.error``.
        Items may carry ``usage_lines`` with ``rate_card_version`` instead of an actual."""
        return self.call(requests.commit_batch(org, items))

    def release(self, org: str, reservation_id: str) -> ReleaseOutcome:
        """Void a hold: its amount returns to available."""
        return self.call(requests.release(org, reservation_id))

    def extend(
        self, org: str, reservation_id: str, *, sequence: int, ttl_ms: int = 0
    ) -> ExtendOutcome:
        """Push a live hold's deadline (heartbeat ``sequence``: from 1, increasing)."""
        return self.call(requests.extend(org, reservation_id, sequence=sequence, ttl_ms=ttl_ms))

    def balance(self, org: str) -> Balance:
        """The organization's wallet, hold counters and caps."""
        return self.call(requests.balance(org))

    def grant(
        self,
        org: str,
        amount_uecu: int,
        *,
        grant_id: str,
        kind: GrantKind | str = GrantKind.TOP_UP,
        expires_at_ms: int = 0,
    ) -> GrantOutcome:
        """Admin: credit an organization under a caller-chosen, idempotent grant id."""
        return self.call(
            requests.grant(
                org, amount_uecu, grant_id=grant_id, kind=kind, expires_at_ms=expires_at_ms
            )
        )

    def set_cap(self, org: str, scope: str, scope_id: str, cap_uecu: int | None) -> ScopeUsage:
        """Admin: set a team or project cap, or clear it with ``cap_uecu=None``."""
        return self.call(requests.set_cap(org, scope, scope_id, cap_uecu))

    def set_auto_topup(self, org: str, threshold_uecu: int | None, amount_uecu: int = 0) -> None:
        """Admin: when available falls below ``threshold_uecu``, notify billing to top up
        ``amount_uecu``; ``threshold_uecu=None`` turns auto-top-up off."""
        self.call(requests.set_auto_topup(org, threshold_uecu, amount_uecu))

    def preview(
        self,
        org: str,
        job: pb.JobSpec | Mapping[str, Any],
        *,
        team: str = "",
        project: str = "",
        user: str = "",
    ) -> PreviewOutcome:
        """A job's worst case, itemized, and whether the balance covers it (no side effects)."""
        return self.call(requests.preview(org, job, team=team, project=project, user=user))

    def rate_card(self, org: str = "") -> RateCardInfo:
        """The rate card the sidecar prices with: version, fees, models, versions still
        loaded; the organizations with negotiated terms: all of them with the admin token,
        else at most ``org``."""
        return self.call(requests.rate_card(org))

    def approve_job(
        self,
        org: str,
        job_id: str | None,
        approved: int | Quote | PreviewOutcome,
        *,
        job: pb.JobSpec | Mapping[str, Any] | None = None,
        rate_card_version: str = "",
        job_type: JobType | str | None = None,
        policy: JobPolicy | str = JobPolicy.REFUSE,
        ttl_ms: int = 0,
        team: str = "",
        project: str = "",
        user: str = "",
    ) -> JobView:
        """Open a job from what the user approved: a preview (or its quote) of ``job``, which
        the sidecar prices again to check it, or a plain amount with its ``job_type``. Its
        steps (``reserve(..., job_id=...)``) draw from it; a replay answers the job as it
        stands. The job id is generated when not given."""
        return self.call(
            requests.approve_job(
                org,
                job_id,
                approved,
                job=job,
                rate_card_version=rate_card_version,
                job_type=job_type,
                policy=policy,
                ttl_ms=ttl_ms,
                team=team,
                project=project,
                user=user,
            )
        )

    def get_job(self, org: str, job_id: str) -> JobView:
        """A job's amounts, step counts and state."""
        return self.call(requests.get_job(org, job_id))

    def heartbeat_job(self, org: str, job_id: str) -> JobView:
        """Keep an open job alive for another ttl."""
        return self.call(requests.heartbeat_job(org, job_id))

    def close_job(self, org: str, job_id: str) -> JobView:
        """Close a job: its room and its steps still held return to the wallet."""
        return self.call(requests.close_job(org, job_id))

    def job(
        self,
        org: str,
        job_id: str | None,
        approved: int | Quote | PreviewOutcome,
        *,
        job: pb.JobSpec | Mapping[str, Any] | None = None,
        rate_card_version: str = "",
        job_type: JobType | str | None = None,
        policy: JobPolicy | str = JobPolicy.REFUSE,
        ttl_ms: int = 0,
        team: str = "",
        project: str = "",
        user: str = "",
        heartbeat: bool = True,
        heartbeat_margin: float = DEFAULT_KEEPALIVE_MARGIN,
    ) -> Job:
        """A context manager approving the job on entry (``approve_job``'s arguments; the job
        id is fixed now), heartbeating it while the block runs (whenever ``heartbeat_margin``
        of its ttl is left; ``heartbeat=False`` turns that off) and closing it on exit, also
        on an exception. Inside, ``job.hold(...)`` and ``job.reserve(...)`` draw its steps."""
        approve = requests.approve_job(
            org,
            job_id,
            approved,
            job=job,
            rate_card_version=rate_card_version,
            job_type=job_type,
            policy=policy,
            ttl_ms=ttl_ms,
            team=team,
            project=project,
            user=user,
        )
        return Job(self, approve, heartbeat=heartbeat, heartbeat_margin=heartbeat_margin)

    def hold(
        self,
        org: str,
        amount_uecu: int = 0,
        *,
        job_type: JobType | str | None = None,
        model: str = "",
        team: str = "",
        project: str = "",
        user: str = "",
        ttl_ms: int = 0,
        reservation_id: str | None = None,
        job: pb.JobSpec | Mapping[str, Any] | None = None,
        job_id: str = "",
        keepalive: bool = True,
        keepalive_margin: float = DEFAULT_KEEPALIVE_MARGIN,
    ) -> Hold:
        """A context manager placing the hold on entry (``reserve``'s arguments; the
        reservation id is fixed now); released on exception or unless committed. While the
        block runs the hold is extended whenever ``keepalive_margin`` (a third by default) of
        its TTL is left; ``keepalive=False`` turns that off."""
        reserve = requests.reserve(
            org,
            amount_uecu,
            job_type=job_type,
            model=model,
            team=team,
            project=project,
            user=user,
            ttl_ms=ttl_ms,
            reservation_id=reservation_id,
            job=job,
            job_id=job_id,
        )
        return Hold(self, reserve, keepalive=keepalive, keepalive_margin=keepalive_margin)
