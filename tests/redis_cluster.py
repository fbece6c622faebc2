"""A throwaway multi-master Redis Cluster, started from the ``redis-server`` binary.

``start_cluster()`` launches N masters (and ``replicas`` replicas of each) on 127.0.0.1 only,
in a temporary directory, on free ports (each port and its cluster bus port, port + 10000, are
probed), joins them with ``redis-cli --cluster create`` and waits (bounded) until every node reports
``cluster_state:ok``. ``RedisClusterProcess.stop()`` kills the processes and removes the
directory. Everything is bounded in time; a failure raises ``ClusterStartError`` with the
node logs attached.

``cluster_or_skip()`` is the pytest entry point: it skips when ``redis-server`` or
``redis-cli`` is missing, unless ECU_REQUIRE_SERVICES is set, in which case it fails.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ClusterStartError",
    "RedisClusterProcess",
    "cluster_binaries",
    "cluster_or_skip",
    "replicas_by_master",
    "slot_owners",
    "start_cluster",
]

HOST = "127.0.0.1"
BUS_OFFSET = 10_000
#: Client ports are drawn from here; with the bus offset both stay below Linux's ephemeral
#: range (32768+), so an outgoing connection cannot grab a port between probe and bind.
PORT_RANGE = (12_000, 22_700)


class ClusterStartError(RuntimeError):
    """The cluster could not be brought up in time."""


def cluster_binaries() -> tuple[str, str] | None:
    """Paths of redis-server and redis-cli, or None when either is missing."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    return (server, cli) if server and cli else None


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_ports(count: int, rng: random.Random) -> list[int]:
    """``count`` distinct ports p with p and p + BUS_OFFSET both free on 127.0.0.1."""
    chosen: list[int] = []
    for _ in range(2_000):
        port = rng.randrange(*PORT_RANGE)
        if any(abs(port - c) < 2 for c in chosen):
            continue
        if _port_free(port) and _port_free(port + BUS_OFFSET):
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise ClusterStartError(f"could not find {count} free port pairs in {PORT_RANGE}")


def _command(port: int, *args: str, timeout: float = 1.0) -> bytes:
    """Send one inline command over a raw socket and return the whole reply (small replies)."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall((" ".join(args) + "\r\n").encode())
        data = b""
        while True:
            chunk = sock.recv(65_536)
            if not chunk:
                break
            data += chunk
            # Status/error replies end at the first CRLF; bulk replies once the length is read.
            if data[:1] in (b"+", b"-", b":") and data.endswith(b"\r\n"):
                break
            if data[:1] == b"$" and b"\r\n" in data:
                size = int(data[1 : data.index(b"\r\n")])
                if size < 0 or len(data) >= data.index(b"\r\n") + 2 + size + 2:
                    break
        return data


@dataclass
class RedisClusterProcess:
    """A running cluster: its client ports (masters), directory and processes."""

    ports: list[int]
    directory: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        """Seed URL of the first master (what ECU_REDIS_URL would hold)."""
        return f"redis://{HOST}:{self.ports[0]}"

    def logs(self) -> str:
        out = []
        for port in self.ports:
            log = self.directory / str(port) / "redis.log"
            with contextlib.suppress(OSError):
                tail = log.read_text(errors="replace").splitlines()[-15:]
                out.append(f"--- node {port} ---\n" + "\n".join(tail))
        return "\n".join(out)

    def stop(self) -> None:
        """Kill every node (TERM, then KILL after 5 s) and remove the directory."""
        for proc in self.processes:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 5
        for proc in self.processes:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.processes.clear()
        shutil.rmtree(self.directory, ignore_errors=True)


def _launch(cluster: RedisClusterProcess, server: str, node_timeout_ms: int) -> None:
    for port in cluster.ports:
        node_dir = cluster.directory / str(port)
        node_dir.mkdir()
        args = [
            server,
            "--port", str(port),
            "--bind", HOST,
            "--dir", str(node_dir),
            "--logfile", str(node_dir / "redis.log"),
            "--daemonize", "no",
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(node_dir / "nodes.conf"),
            "--cluster-node-timeout", str(node_timeout_ms),
            "--save", "",
            "--appendonly", "no",
            # A replica's first sync starts at once (a diskless sync waits 5 s by default).
            "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip
        cluster.processes.append(
            subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )


def _wait(
    what: str,
    deadline: float,
    check: Callable[[RedisClusterProcess], bool],
    cluster: RedisClusterProcess,
) -> None:
    """Until ``check(cluster)`` is true (tests.conftest.wait_until_sync); fail fast if a node
    process died."""
    from tests.conftest import wait_until_sync

    def ready() -> bool:
        for proc, port in zip(cluster.processes, cluster.ports, strict=True):
            if proc.poll() is not None:
                raise ClusterStartError(
                    f"redis-server on port {port} exited with {proc.returncode} while waiting "
                    f"for {what}\n{cluster.logs()}"
                )
        with contextlib.suppress(OSError, ValueError):
            return check(cluster)
        return False

    try:
        wait_until_sync(ready, what, limit_s=max(0.0, deadline - time.monotonic()))
    except AssertionError as exc:
        raise ClusterStartError(f"timed out waiting for {exc}\n{cluster.logs()}") from None


def _all_answer_ping(cluster: RedisClusterProcess) -> bool:
    return all(_command(p, "PING").startswith(b"+PONG") for p in cluster.ports)


def _all_cluster_ok(cluster: RedisClusterProcess) -> bool:
    for port in cluster.ports:
        info = _command(port, "CLUSTER", "INFO").decode()
        if (
            "cluster_state:ok" not in info
            or "cluster_slots_ok:16384" not in info
            or f"cluster_known_nodes:{len(cluster.ports)}" not in info
        ):
            return False
    return True


def _bring_up(
    cluster: RedisClusterProcess,
    server: str,
    cli: str,
    timeout_s: float,
    node_timeout_ms: int,
    replicas: int = 0,
) -> None:
    _launch(cluster, server, node_timeout_ms)
    deadline = time.monotonic() + timeout_s
    _wait("every node to answer PING", deadline, _all_answer_ping, cluster)
    args = [cli, "--cluster", "create", *(f"{HOST}:{p}" for p in cluster.ports)]
    args += ["--cluster-replicas", str(replicas), "--cluster-yes"]
    try:
        create = subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=max(1.0, deadline - time.monotonic()),
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ClusterStartError(
            f"redis-cli --cluster create did not finish in time\n{cluster.logs()}"
        ) from None
    if create.returncode != 0:
        raise ClusterStartError(
            f"redis-cli --cluster create failed ({create.returncode}):\n"
            f"{create.stdout.decode(errors='replace')}{create.stderr.decode(errors='replace')}\n"
            f"{cluster.logs()}"
        )
    _wait("cluster_state:ok on every node", deadline, _all_cluster_ok, cluster)
    if replicas:
        _wait(
            "every replica online",
            deadline,
            lambda c: _replicas_online(c, len(c.ports) // (1 + replicas), replicas),
            cluster,
        )


def _replicas_online(cluster: RedisClusterProcess, masters: int, replicas: int) -> bool:
    layout = replicas_by_master(cluster.ports[0])
    if len(layout) != masters or any(len(r) != replicas for r in layout.values()):
        return False  # roles not yet known to the node asked
    for master in layout:
        info = _command(master, "INFO", "replication").decode()
        if info.count("state=online") != replicas:
            return False
    return True


def replicas_by_master(port: int) -> dict[int, list[int]]:
    """Master client port -> its replicas' client ports, from CLUSTER NODES as ``port`` sees
    it."""
    reply = _command(port, "CLUSTER", "NODES").decode()
    ports: dict[str, int] = {}
    masters: dict[int, list[int]] = {}
    of: list[tuple[int, str]] = []
    for line in reply.split("\r\n", 1)[1].splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        node_port = int(parts[1].split("@", 1)[0].rsplit(":", 1)[1])
        ports[parts[0]] = node_port
        flags = parts[2].split(",")
        if "master" in flags:
            masters.setdefault(node_port, [])
        elif "slave" in flags:
            of.append((node_port, parts[3]))
    for replica, master_id in of:
        masters.setdefault(ports[master_id], []).append(replica)
    return masters


def start_cluster(
    masters: int = 3, *, replicas: int = 0, timeout_s: float = 30.0, node_timeout_ms: int = 2_000
) -> RedisClusterProcess:
    """Start ``masters`` cluster-enabled nodes, create the cluster, wait for cluster_state:ok.

    Port races (another process binding a probed port first) are retried with new ports.
    """
    binaries = cluster_binaries()
    if binaries is None:
        raise ClusterStartError("redis-server or redis-cli is not on PATH")
    server, cli = binaries
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    last: Exception | None = None
    for _attempt in range(3):
        directory = Path(tempfile.mkdtemp(prefix="ecu-redis-cluster-"))
        cluster = RedisClusterProcess(_free_ports(masters * (1 + replicas), rng), directory)
        try:
            _bring_up(cluster, server, cli, timeout_s, node_timeout_ms, replicas)
            return cluster
        except ClusterStartError as exc:
            cluster.stop()
            last = exc
            if "Address already in use" not in str(exc):
                raise
        except BaseException:
            cluster.stop()
            raise
    raise ClusterStartError(f"could not start the cluster after 3 attempts: {last}")


@contextlib.contextmanager
def cluster_or_skip(
    masters: int = 3, replicas: int = 0, node_timeout_ms: int = 2_000
) -> Iterator[RedisClusterProcess]:
    """A running cluster for the duration of the block; skips (or, with
    ECU_REQUIRE_SERVICES set, fails) when the Redis binaries are missing. ``node_timeout_ms``
    is how long a silent primary takes to be failed over (plus an election of about 1 s)."""
    import pytest

    from tests.conftest import REQUIRE_SERVICES

    if cluster_binaries() is None:
        message = "redis-server/redis-cli not on PATH: cannot start a Redis Cluster"
        if REQUIRE_SERVICES:
            pytest.fail(message + " and ECU_REQUIRE_SERVICES is set", pytrace=False)
        pytest.skip(message)
    cluster = start_cluster(masters, replicas=replicas, node_timeout_ms=node_timeout_ms)
    try:
        yield cluster
    finally:
        cluster.stop()


def slot_owners(port: int) -> dict[int, list[tuple[int, int]]]:
    """Master client port -> its slot ranges, from CLUSTER NODES as node ``port`` sees it."""
    reply = _command(port, "CLUSTER", "NODES").decode()
    owners: dict[int, list[tuple[int, int]]] = {}
    for line in reply.split("\r\n", 1)[1].splitlines():
        parts = line.split()
        if len(parts) < 8 or "master" not in parts[2].split(","):
            continue
        node_port = int(parts[1].split("@", 1)[0].rsplit(":", 1)[1])
        ranges = owners.setdefault(node_port, [])
        for spec in parts[8:]:
            if spec.startswith("["):  # a slot being migrated/imported
                continue
            lo, _, hi = spec.partition("-")
            ranges.append((int(lo), int(hi or lo)))
    return owners
