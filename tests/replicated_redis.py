"""A Redis primary and its replica, started by the test on 127.0.0.1, to hold the replica back,
kill the primary and promote the replica (tests/test_durability.py, tests/chaos).

Holding back is ``CLIENT PAUSE <ms> WRITE`` on the replica: it postpones the write commands of
every client there, the primary's replication link included, so the replica neither applies
nor acknowledges what the primary sends meanwhile. What it had buffered but not applied is
dropped when its link to a dead primary closes: the writes of that window exist on the
primary only, exactly the loss of an asynchronous replica that lags at the moment its primary
dies.
"""

from __future__ import annotations

import time

import redis

from tests.test_unavailable import PrivateRedis

__all__ = ["ReplicatedRedis"]


def _wait_for(what: str, check: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)


class ReplicatedRedis:
    """A primary and one replica (``--replicaof``), each a PrivateRedis."""

    def __init__(self) -> None:
        # No diskless-sync delay: the replica's first full sync starts at once (5 s otherwise).
        self.primary = PrivateRedis("--repl-diskless-sync-delay", "0")
        self.primary.start()
        self.replica = PrivateRedis("--replicaof", "127.0.0.1", str(self.primary.port))
        self.replica.start()
        self._gone: list[PrivateRedis] = []
        self.wait_linked()

    @property
    def url(self) -> str:
        """The primary's URL."""
        return f"redis://127.0.0.1:{self.primary.port}/0"

    def client(self, which: PrivateRedis) -> redis.Redis:
        """A synchronous control client of one server."""
        return redis.Redis(host="127.0.0.1", port=which.port, socket_timeout=10)

    def wait_linked(self) -> None:
        """Until the replica is in sync with the primary: its link up, and every write the
        primary had acknowledged by it."""
        primary, replica = self.client(self.primary), self.client(self.replica)

        def linked() -> bool:
            # Online as the primary sees it (after a diskless sync the primary counts the
            # replica, in WAIT too, only once it acknowledged). Caught up is proved next, by
            # a WAIT (offsets compared would never match under a continuing load).
            seen = primary.info("replication").get("slave0") or {}
            return (
                replica.info("replication").get("master_link_status") == "up"
                and seen.get("state") == "online"
            )

        def acknowledging() -> bool:
            # Some hundreds of ms after a full sync pass before the replica answers the
            # primary's acknowledgement requests: until a WAIT sees it, it is not ready.
            primary.set("replicated-redis:probe", 1)
            return primary.execute_command("WAIT", 1, 200) == 1

        try:
            _wait_for("the replica to sync", linked, timeout_s=30)
            _wait_for("the replica to acknowledge", acknowledging, timeout_s=30)
        finally:
            primary.close()
            replica.close()

    def hold_back(self, ms: int = 60_000) -> None:
        """Stop the replica applying (and acknowledging) the primary's writes."""
        with self.client(self.replica) as c:
            c.execute_command("CLIENT", "PAUSE", ms, "WRITE")

    def let_go(self) -> None:
        """Let the replica apply what it holds back and catch up."""
        with self.client(self.replica) as c:
            c.execute_command("CLIENT", "UNPAUSE")
        self.wait_linked()

    def kill_primary_and_promote(self) -> None:
        """SIGKILL the primary, then make the replica a primary (``REPLICAOF NO ONE``), once it
        saw its link go down (so a write it held back is dropped, not applied), and let its
        clients write again. The old primary's port is then served by nothing."""
        self.primary.kill()
        with self.client(self.replica) as c:
            _wait_for(
                "the replica to see its primary gone",
                lambda: c.info("replication").get("master_link_status") != "up",
            )
            c.execute_command("REPLICAOF", "NO", "ONE")
            c.execute_command("CONFIG", "SET", "repl-diskless-sync-delay", "0")
            c.execute_command("CLIENT", "UNPAUSE")

    def replace_replica(self) -> None:
        """After kill_primary_and_promote: the promoted replica is the primary, and a new
        replica of it is started and synced (the next failover's target)."""
        self._gone.append(self.primary)
        self.primary = self.replica
        self.replica = PrivateRedis("--replicaof", "127.0.0.1", str(self.primary.port))
        self.replica.start()
        self.wait_linked()

    def close(self) -> None:
        """Stop every server started."""
        self.replica.close()
        self.primary.close()
        for server in self._gone:
            server.close()


class PrivateSentinel:
    """A Redis Sentinel (``redis-server <conf> --sentinel``) on 127.0.0.1 monitoring one
    primary as ``service``, with quorum 1 and short timeouts so that a failover takes about a
    second."""

    def __init__(self, primary_port: int, service: str = "mymaster") -> None:
        import os
        import subprocess
        import tempfile

        from tests.test_unavailable import free_port

        self.port = free_port()
        self.service = service
        self.dir = tempfile.mkdtemp(prefix="ecu-sentinel-")
        conf = os.path.join(self.dir, "sentinel.conf")
        with open(conf, "w") as fh:
            fh.write(
                f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"sentinel monitor {service} 127.0.0.1 {primary_port} 1\n"
                f"sentinel down-after-milliseconds {service} 300\n"
                f"sentinel failover-timeout {service} 2000\n"
                f"sentinel parallel-syncs {service} 1\n"
            )
        self.proc = subprocess.Popen(
            ["redis-server", conf, "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        with redis.Redis(port=self.port, socket_timeout=2) as c:

            def up() -> bool:
                try:
                    return bool(c.execute_command("SENTINEL", "MASTERS"))
                except redis.ConnectionError:
                    return False

            _wait_for("the sentinel to come up", up)

    @property
    def url(self) -> str:
        """ECU_REDIS_URL for the monitored primary."""
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.service}"

    def primary_port(self) -> int:
        """The port of the primary the Sentinel currently names."""
        with redis.Redis(port=self.port, socket_timeout=2) as c:
            _host, port = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        return int(port)

    def close(self) -> None:
        """Stop the Sentinel."""
        import shutil

        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
