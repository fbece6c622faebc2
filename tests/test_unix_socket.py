"""ECU_LISTEN=unix:///path: the sidecar on a Unix domain socket in a directory the worker's
container shares, its file permissions as the access control; both client flavours and the
CLI reach it, and shutdown waits for its connected clients as for TCP."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ecu_sidecar.client import AsyncQuotaClient, QuotaClient
from ecu_sidecar.server import SidecarServer, unix_socket_connections
from ecu_sidecar.settings import Settings, SettingsError
from tests.conftest import ADMIN_TOKEN, make_settings, wait_until


def short_dir(tmp_path: Path) -> Path:
    """A socket path must fit sun_path (108 bytes): pytest's tmp_path may not."""
    path = Path("/tmp") / f"ecu-{os.getpid()}-{tmp_path.name[-20:]}"
    path.mkdir(exist_ok=True)
    return path


def test_the_socket_setting_is_checked(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="unix:///absolute/path"):
        Settings.from_env({"ECU_LISTEN": "unix:relative.sock"})
    with pytest.raises(SettingsError, match="does not exist"):
        Settings.from_env({"ECU_LISTEN": f"unix://{tmp_path}/absent/ecu.sock"})
    with pytest.raises(SettingsError, match="octal"):
        Settings.from_env(
            {"ECU_LISTEN": f"unix://{tmp_path}/ecu.sock", "ECU_UNIX_SOCKET_MODE": "rw-rw----"}
        )
    settings = Settings.from_env({"ECU_LISTEN": f"unix://{tmp_path}/ecu.sock"})
    assert settings.unix_socket == f"{tmp_path}/ecu.sock"


async def test_clients_and_cli_trade_over_the_socket(tmp_path: Path) -> None:
    folder = short_dir(tmp_path)
    path = folder / "ecu.sock"
    server = SidecarServer(make_settings("embedded", listen=f"unix://{path}"))
    await server.start()
    target = f"unix://{path}"
    try:
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        async with AsyncQuotaClient(target, admin_token=ADMIN_TOKEN) as client:
            await client.grant("uds-org", 10_000, grant_id="g1")
            async with client.hold(org="uds-org", amount_uecu=4_000, job_type="engine") as hold:
                assert unix_socket_connections(str(path)) == 1
                await hold.commit(3_000)
        with QuotaClient(target) as sync_client:
            balance = await asyncio.to_thread(sync_client.balance, "uds-org")
        assert (balance.granted_uecu, balance.available_uecu) == (10_000, 7_000)
        env = {k: v for k, v in os.environ.items() if not k.startswith("ECU_")}
        out = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "ecu_sidecar", "balance", "uds-org", "--json"],
            env={**env, "ECU_LISTEN": target},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["available_uecu"] == 7_000
        await wait_until(lambda: unix_socket_connections(str(path)) == 0, "clients gone")
    finally:
        await server.stop(grace=0)


def test_connections_to_a_socket_are_counted(tmp_path: Path) -> None:
    path = str(short_dir(tmp_path) / "count.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()
    try:
        assert unix_socket_connections(path) == 0
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)
        accepted, _ = listener.accept()
        assert unix_socket_connections(path) == 1
        client.close()
        accepted.close()
        assert unix_socket_connections(path) == 0
    finally:
        listener.close()
        os.unlink(path)
