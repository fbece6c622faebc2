"""The two client flavours are written out by hand: they must not drift apart, nor from the
shared request builders they call.

Each public method of ``AsyncQuotaClient`` and ``QuotaClient`` has the same parameters,
defaults, return type and docstring as the other's, and the parameters of its builder in
``ecu_sidecar.client.requests``; and each forwards every argument: called with a value for
every parameter, it makes exactly the call the builder builds. No sidecar is needed: the
flavour's ``call`` is replaced by one that records the call it was given.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from ecu_sidecar import client as qc
from ecu_sidecar.client import AsyncQuotaClient, QuotaClient, requests
from ecu_sidecar.client.requests import Call
from ecu_sidecar.model import CommitItem, JobType, ReserveItem, Usage
from ecu_sidecar.pricing import UsageLine

ORG = "acme"
JOB = {"items": [{"judge": {"judgeModel": "gpt-4o-mini", "calls": 3}}]}
#: Arguments for every RPC method, every parameter given a value other than its default.
CALLS: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {
    "reserve": (
        (ORG, 5),
        dict(
            job_type="judge",
            model="m",
            team="t",
            project="p",
            user="u",
            ttl_ms=7,
            reservation_id="r1",
            job=JOB,
            job_id="j1",
        ),
    ),
    "reserve_batch": (
        (ORG, [ReserveItem("a", 5, JobType.GEPA), ReserveItem("b", 0, None, job=JOB)]),  # type: ignore[arg-type]
        dict(team="t", project="p", user="u", job_id="j1"),
    ),
    "commit": (
        (ORG, "r1", 5),
        dict(
            usage=Usage(1, 2, 3),
            usage_lines=[UsageLine("judge", "m", 1, 2, 3)],
            rate_card_version="v1",
        ),
    ),
    "commit_batch": ((ORG, [CommitItem("r1", 5), CommitItem("r2", 6, Usage(calls=1))]), {}),
    "release": ((ORG, "r1"), {}),
    "extend": ((ORG, "r1"), dict(sequence=3, ttl_ms=9)),
    "balance": ((ORG,), {}),
    "grant": ((ORG, 5), dict(grant_id="g1", kind="starter", expires_at_ms=11)),
    "set_cap": ((ORG, "team", "t", 5), {}),
    "set_auto_topup": ((ORG, 5, 6), {}),
    "preview": ((ORG, JOB), dict(team="t", project="p", user="u")),
    "rate_card": (("acme",), {}),
    "approve_job": (
        (ORG, "j1", 5),
        dict(
            job=JOB,
            rate_card_version="v1",
            job_type="judge",
            policy="wallet",
            ttl_ms=60_000,
            team="t",
            project="p",
            user="u",
        ),
    ),
    "get_job": ((ORG, "j1"), {}),
    "heartbeat_job": ((ORG, "j1"), {}),
    "close_job": ((ORG, "j1"), {}),
}
KEEPALIVE = ("keepalive", "keepalive_margin")
HEARTBEAT = ("heartbeat", "heartbeat_margin")
#: Context managers: not coroutines, and each flavour answers its own class.
CONTEXTS = ("hold", "job")


def public_methods(cls: type) -> set[str]:
    return {n for n, f in vars(cls).items() if callable(f) and not n.startswith("_")}


def parameters(f: Any) -> list[tuple[str, Any, Any, Any]]:
    """Name, kind, default and annotation of each parameter, ``self`` left out."""
    params = list(inspect.signature(f).parameters.values())
    if params and params[0].name == "self":
        params = params[1:]
    return [(p.name, p.kind, p.default, p.annotation) for p in params]


def test_both_flavours_have_the_same_methods() -> None:
    assert public_methods(AsyncQuotaClient) == public_methods(QuotaClient)
    assert public_methods(AsyncQuotaClient) == {*CALLS, "call", *CONTEXTS, "close"}


@pytest.mark.parametrize("name", [*CALLS, *CONTEXTS, "close"])
def test_a_method_reads_the_same_in_both_flavours(name: str) -> None:
    aio, sync = getattr(AsyncQuotaClient, name), getattr(QuotaClient, name)
    assert parameters(aio) == parameters(sync)
    if name not in CONTEXTS:  # AsyncHold / Hold, AsyncJob / Job
        ret = inspect.signature(aio).return_annotation
        assert ret == inspect.signature(sync).return_annotation
    if name != "close":  # the async one says what happens to calls in flight
        assert aio.__doc__ and aio.__doc__ == sync.__doc__
    assert inspect.iscoroutinefunction(aio) == (name not in CONTEXTS)
    assert not inspect.iscoroutinefunction(sync)


@pytest.mark.parametrize("name", CALLS)
def test_a_method_takes_its_builders_parameters(name: str) -> None:
    assert parameters(getattr(AsyncQuotaClient, name)) == parameters(getattr(requests, name))
    built = inspect.signature(getattr(requests, name)).return_annotation
    method = inspect.signature(getattr(AsyncQuotaClient, name)).return_annotation
    assert built == f"Call[{method}]"


def test_hold_takes_reserves_parameters_and_the_keepalive() -> None:
    hold = parameters(AsyncQuotaClient.hold)
    assert [p[0] for p in hold[-2:]] == list(KEEPALIVE)
    assert hold[:-2] == parameters(requests.reserve)


def test_job_takes_approve_jobs_parameters_and_the_heartbeat() -> None:
    job = parameters(AsyncQuotaClient.job)
    assert [p[0] for p in job[-2:]] == list(HEARTBEAT)
    assert job[:-2] == parameters(requests.approve_job)


def same_call(sent: Call[Any], built: Call[Any]) -> bool:
    return (sent.method, sent.request, sent.convert, sent.admin) == (
        built.method,
        built.request,
        built.convert,
        built.admin,
    )


def every_parameter_given(f: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    bound = inspect.signature(f).bind(*args, **kwargs)
    return set(bound.arguments) == {p[0] for p in parameters(f)}


@pytest.mark.parametrize("name", CALLS)
async def test_the_async_method_forwards_every_argument(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    args, kwargs = CALLS[name]
    assert every_parameter_given(getattr(requests, name), args, kwargs)

    sent: list[Call[Any]] = []

    async def record(call: Call[Any]) -> None:
        sent.append(call)

    c = AsyncQuotaClient()
    monkeypatch.setattr(c, "call", record)
    await getattr(c, name)(*args, **kwargs)
    (call,) = sent
    assert same_call(call, getattr(requests, name)(*args, **kwargs))


@pytest.mark.parametrize("name", CALLS)
def test_the_sync_method_forwards_every_argument(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    args, kwargs = CALLS[name]
    sent: list[Call[Any]] = []
    c = QuotaClient()
    monkeypatch.setattr(c, "call", sent.append)
    getattr(c, name)(*args, **kwargs)
    (call,) = sent
    assert same_call(call, getattr(requests, name)(*args, **kwargs))


@pytest.mark.parametrize("flavour", [AsyncQuotaClient, QuotaClient])
def test_hold_forwards_every_argument(flavour: type[AsyncQuotaClient | QuotaClient]) -> None:
    args, kwargs = CALLS["reserve"]
    h = flavour().hold(*args, **kwargs, keepalive=False, keepalive_margin=0.5)
    assert same_call(h.reserve_call, requests.reserve(*args, **kwargs))
    assert (h.keepalive, h.keepalive_margin, h.reservation_id) == (False, 0.5, "r1")
    assert isinstance(h, qc.AsyncHold if flavour is AsyncQuotaClient else qc.Hold)


@pytest.mark.parametrize("flavour", [AsyncQuotaClient, QuotaClient])
def test_job_forwards_every_argument(flavour: type[AsyncQuotaClient | QuotaClient]) -> None:
    args, kwargs = CALLS["approve_job"]
    j = flavour().job(*args, **kwargs, heartbeat=False, heartbeat_margin=0.5)
    assert same_call(j._approve_call, requests.approve_job(*args, **kwargs))
    assert (j.heartbeat, j.heartbeat_margin, j.job_id, j.organization) == (False, 0.5, "j1", ORG)
    assert isinstance(j, qc.AsyncJob if flavour is AsyncQuotaClient else qc.Job)
    # Its steps are the client's own reserve, on the job's account and id.
    step = j._step(5, "judge", "m", 7, "r1", None)
    built = requests.reserve(
        ORG, 5, job_type="judge", model="m", team="t", project="p", user="u", ttl_ms=7,
        reservation_id="r1", job_id="j1",
    )  # fmt: skip
    assert step.request == built.request


def test_the_package_exports_the_public_names() -> None:
    assert set(qc.__all__) == {
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
    }
    namespace: dict[str, Any] = {}
    exec("from ecu_sidecar.client import *", namespace)  # fails on a name that is not there
    assert set(namespace) - {"__builtins__"} == set(qc.__all__)
