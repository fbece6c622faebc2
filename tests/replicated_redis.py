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

import redis

from tests.conftest import wait_until_sync
from tests.test_unavailable import PrivateRedis

__all__ = ["ReplicatedRedis"]


class ReplicatedRedis:
    """A primary and one replica (``REPLICAOF``), each a PrivateRedis."""

    def __init__(self) -> None:
        self.primary = self._started()
        self._gone: list[PrivateRedis] = []
        self._start_replica()

    @staticmethod
    def _started() -> PrivateRedis:
        # A full sync through a file, not diskless: a diskless sync waits 5 s before it starts
        # (repl-diskless-sync-delay), and after one the primary counts the replica only from
        # its first acknowledgement, which the replica sends on its once-a-second timer.
        server = PrivateRedis("--repl-diskless-sync", "no")
        server.start()
        return server

    def _start_replica(self) -> None:
        """A new server made the primary's replica by command, synced: the command starts the
        handshake at once (``--replicaof`` waits for the replica's next timer tick)."""
        self.replica = self._started()
        with self.client(self.replica) as c:
            c.execute_command("REPLICAOF", "127.0.0.1", self.primary.port)
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
            # Online as the primary sees it (in WAIT too). Caught up is proved next, by a WAIT
            # (offsets compared would never match under a continuing load).
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
            wait_until_sync(linked, "the replica to sync", limit_s=30)
            wait_until_sync(acknowledging, "the replica to acknowledge", limit_s=30)
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
            wait_until_sync(
                lambda: c.info("replication").get("master_link_status") != "up",
                "the replica to see its primary gone",
            )
            c.execute_command("REPLICAOF", "NO", "ONE")
            c.execute_command("CLIENT", "UNPAUSE")

    def replace_replica(self) -> None:
        """After kill_primary_and_promote: the promoted replica is the primary, and a new
        replica of it is started and synced (the next failover's target)."""
        self._gone.append(self.primary)
        self.primary = self.replica
        self._start_replica()

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

            wait_until_sync(up, "the sentinel to come up")

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
