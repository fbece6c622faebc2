"""An approved job end to end: preview -> approve -> workers draw -> close (docs/jobs.md).

The user sees the worst case of a trace evaluation and approves it once; a pool of workers then
evaluates the traces, each trace one step drawn from the approval (not from the wallet, so the
run completes even if other traffic drains the wallet), and may stop early (``--stop-after``,
as when a quality gate already failed); closing the job returns what it did not bill, and the
last line says how pessimistic the preview was.

Run it against a sidecar with a rate card, for a funded organization::

    ECU_ADMIN_TOKEN=dev-token ECU_RATE_CARD_FILE=ratecards/example.toml ecu-sidecar serve &
    ECU_ADMIN_TOKEN=dev-token ecu-sidecar grant acme 25ECU --grant-id welcome-1
    python examples/approved_job.py --org acme --traces 40 --workers 4 --stop-after 10

The model calls are simulated: each trace "uses" a deterministic number of tokens, below the
worst case the preview priced.
"""

from __future__ import annotations

import argparse
import asyncio
import uuid

from ecu_sidecar.client import DEFAULT_TARGET, AsyncJob, AsyncQuotaClient, UsageLine

JUDGE = "gpt-4o-mini"
JUDGE_SPEC = {"judgeModel": JUDGE, "promptTokensPerCall": 800, "maxOutputTokensPerCall": 100}


def plan(traces: int) -> dict[str, object]:
    """The job spec the user approves: ``traces`` traces, one judge call each."""
    return {"items": [{"traceEval": {"traces": traces, "judges": [JUDGE_SPEC]}}]}


def judge_trace(i: int) -> list[UsageLine]:
    """Stand-in for the real judge call on trace ``i``: what it used."""
    return [
        UsageLine("judge", JUDGE, tokens_in=420 + 7 * i, tokens_out=15 + i % 40, calls=1),
        UsageLine("trace", calls=1),
    ]


async def worker(run: AsyncJob, queue: asyncio.Queue[int], stop_after: int) -> int:
    """Evaluate traces until none is left, or ``stop_after`` were taken: each one a step of
    the job. Returns µECU billed."""
    billed = 0
    while not queue.empty():
        i = queue.get_nowait()
        if i >= stop_after:
            break
        async with run.hold(job=plan(1)) as step:  # one trace's worst case, from the job's room
            billed += (await step.commit(usage_lines=judge_trace(i))).committed_uecu
    return billed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--target", default=DEFAULT_TARGET, help="the sidecar's host:port")
    parser.add_argument("--org", required=True, help="a funded organization")
    parser.add_argument("--traces", type=int, default=40)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--stop-after", type=int, help="short-circuit after this many traces")
    parser.add_argument("--job-id", default=f"eval-{uuid.uuid4().hex[:8]}")
    args = parser.parse_args()

    async with AsyncQuotaClient(args.target) as client:
        shown = await client.preview(args.org, plan(args.traces))
        print(
            f"preview: {args.traces} traces cost at most {shown.quote.total_uecu} uECU "
            f"(rate card {shown.quote.rate_card_version}; available {shown.available_uecu})"
        )
        if shown.expected is not None:  # learned from the organization's closed jobs
            print(
                f"expected: {shown.expected.total_uecu} uECU, as its last "
                f"{shown.expected.jobs} closed trace evaluations went"
            )
        # The user approves that quote: the job holds exactly it, pinned to its rate card.
        async with client.job(args.org, args.job_id, shown, job=plan(args.traces)) as run:
            queue: asyncio.Queue[int] = asyncio.Queue()
            for i in range(args.traces):
                queue.put_nowait(i)
            stop = min(args.traces, args.stop_after or args.traces)
            billed = await asyncio.gather(*(worker(run, queue, stop) for _ in range(args.workers)))
            print(f"workers: {stop} of {args.traces} traces evaluated, billed {sum(billed)} uECU")
        job = run.view  # closed: the unused rest went back to the wallet
        assert job is not None and run.accuracy is not None
        print(
            f"job {job.job_id} {job.state.name.lower()}: approved {job.approved_uecu} uECU, "
            f"committed {job.committed_uecu} uECU in {job.steps_committed} steps, returned "
            f"{job.returned_uecu} uECU; accuracy {run.accuracy:.1%} of the preview"
        )


if __name__ == "__main__":
    asyncio.run(main())
