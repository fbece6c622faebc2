"""The sidecar's benchmark: every target a ratio to a floor measured in the same run.

``python -m bench`` (``make bench``) runs, on this machine and against 127.0.0.1 only, each
floor beside what it is the floor of, ``repeats`` times in turn: floor A (a no-op grpc.aio
server), floor A∘B (A plus the product's store call), floor B (the scripts with redis-py), the
sidecar (``ecu-sidecar serve``) at c=1/16/64 over 1 and 1,000 organizations, the batch of 100
beside single steps, Preview beside tiktoken, the flusher's drain beside a COPY of the same
rows, the scripts' cost inside Redis beside a minimal hold script, the flusher's lag, Redis
round trips per RPC and the cost of the replica wait. docs/benchmarks.md says what each
measures; bench/results.json and that page's generated block hold the figures.
"""
