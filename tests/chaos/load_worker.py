"""One load-generating process: ``python -m tests.chaos.load_worker CONFIG_JSON``.

Runs ``concurrency`` asyncio tasks on one gRPC channel to ``target`` for ``duration_s``, each
looping over random organizations: Reserve, then Commit (below, at, above the hold), Release,
or abandon the hold (its short TTL lets it expire). Every call's latency and status are
recorded; every acknowledged call goes to ``acked_path`` (JSON lines) for the test to check
against Redis; a summary (counts, latencies) goes to ``summary_path``.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from typing import Any

import grpc

from ecu_sidecar.api.v1 import quota_pb2 as pb
from ecu_sidecar.api.v1 import quota_pb2_grpc


def _reason(exc: grpc.aio.AioRpcError) -> str:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(exc)
    for detail in status.details if status else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


async def run(cfg: dict[str, Any]) -> dict[str, Any]:
    orgs: list[str] = cfg["orgs"]
    end = time.monotonic() + cfg["duration_s"]
    deadline = cfg.get("deadline_s", 5.0)
    latencies: dict[str, list[float]] = {"Reserve": [], "Commit": [], "Release": []}
    codes: dict[str, int] = {}
    acked = open(cfg["acked_path"], "w")  # noqa: ASYNC230 - one local file, small writes

    async def call(stub: Any, op: str, request: Any) -> Any:
        t0 = time.perf_counter()
        try:
            reply = await getattr(stub, op)(request, timeout=deadline)
            key = "OK"
        except grpc.aio.AioRpcError as exc:
            reply = None
            key = f"{exc.code().name}/{_reason(exc)}"
        latencies[op].append(time.perf_counter() - t0)
        codes[key] = codes.get(key, 0) + 1
        return reply

    async def task(n: int) -> None:
        rng = random.Random(cfg["seed"] * 1_000 + n)
        i = 0
        async with grpc.aio.insecure_channel(cfg["targets"][n % len(cfg["targets"])]) as channel:
            stub = quota_pb2_grpc.QuotaStub(channel)
            while time.monotonic() < end:
                i += 1
                org = orgs[rng.randrange(len(orgs))]
                rid = f"L{cfg['seed']}-{n}-{i}"
                amount = rng.randint(1_000, 100_000)
                roll = rng.random()
                abandon = roll >= 0.9
                reply = await call(
                    stub,
                    "Reserve",
                    pb.ReserveRequest(
                        reservation_id=rid,
                        account=pb.Account(organization=org, team=f"t{rng.randrange(4)}"),
                        amount_uecu=amount,
                        job_type=pb.JOB_TYPE_ENGINE,
                        ttl_ms=1_000 if abandon else 60_000,
                    ),
                )
                if reply is None:
                    continue
                acked.write(json.dumps({"op": "Reserve", "org": org, "rid": rid, "amount": amount}))
                acked.write("\n")
                if roll < 0.6:
                    actual = rng.choice([0, amount // 3, amount, amount + amount // 10, 3 * amount])
                    r = await call(
                        stub,
                        "Commit",
                        pb.CommitRequest(
                            organization=org,
                            reservation_id=rid,
                            actual_uecu=actual,
                            usage=pb.Usage(tokens_in=rng.randrange(5_000), calls=1),
                        ),
                    )
                    if r is not None:
                        line = {
                            "op": "Commit",
                            "org": org,
                            "rid": rid,
                            "committed": r.committed_uecu,
                        }
                        acked.write(json.dumps(line) + "\n")
                elif roll < 0.9:
                    r = await call(
                        stub, "Release", pb.ReleaseRequest(organization=org, reservation_id=rid)
                    )
                    if r is not None:
                        acked.write(json.dumps({"op": "Release", "org": org, "rid": rid}) + "\n")

    started = time.monotonic()
    await asyncio.gather(*(task(n) for n in range(cfg["concurrency"])))
    elapsed = time.monotonic() - started
    acked.close()
    return {"elapsed_s": elapsed, "codes": codes, "latencies": latencies}


def main() -> None:
    cfg = json.loads(sys.argv[1])
    summary = asyncio.run(run(cfg))
    with open(cfg["summary_path"], "w") as fh:
        json.dump(summary, fh)


if __name__ == "__main__":
    main()
