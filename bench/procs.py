"""Child processes of the benchmark and what /proc says about them (Linux only).

Every child is started with ``python -m bench.<module>`` from the project's interpreter, so it
runs the installed project exactly as ``ecu-sidecar`` would. Servers print one JSON line
(``{"ready": ..., "port": ...}``) when they serve; load children write their results to a file
named in their spec. Every wait is bounded; a child past its deadline is killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ROOT",
    "Child",
    "ProcSample",
    "check_local",
    "child_env",
    "collect_child",
    "free_port",
    "machine_busy",
    "proc_sample",
    "reset_peak_rss",
    "run_child",
    "spawn_child",
    "start_server",
    "start_sidecar",
]

ROOT = Path(__file__).resolve().parent.parent
_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcSample:
    """CPU seconds (user + system, every thread) and memory of one process at one instant."""

    cpu_s: float
    rss_mb: float
    peak_rss_mb: float


def proc_sample(pid: int) -> ProcSample:
    """Read /proc/<pid>/stat and /proc/<pid>/status."""
    with open(f"/proc/{pid}/stat") as fh:
        stat = fh.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    cpu = (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14, 15)
    rss = hwm = 0.0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    return ProcSample(cpu, rss, hwm)


def reset_peak_rss(pid: int) -> None:
    """Reset the process's peak RSS (VmHWM) to its current RSS, so a section reports its own
    peak. Best effort: without permission the peak stays the lifetime peak."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/clear_refs", "w") as fh:
        fh.write("5")


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as fh:
        parts = [int(x) for x in fh.readline().split()[1:]]
    idle = parts[3] + parts[4]  # idle + iowait
    total = sum(parts[:8])  # user nice system idle iowait irq softirq steal
    return (total - idle) / _CLK_TCK, total / _CLK_TCK


def check_local(url: str) -> None:
    """Only 127.0.0.1/localhost is ever a target of this benchmark."""
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"refusing to benchmark against {host!r}: 127.0.0.1 only")


def free_port() -> int:
    """A TCP port on 127.0.0.1 free at the time of asking."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(extra: dict[str, str] | None) -> dict[str, str]:
    """This environment without any ECU_ variable, plus ``extra``: what every child gets."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECU_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


@dataclass
class Child:
    """A server child: its process, port and what it said when ready."""

    name: str
    proc: subprocess.Popen[str]
    port: int
    info: dict[str, Any] = field(default_factory=dict)
    socket: str = ""
    """A Unix domain socket it listens on instead of the port (ECU_LISTEN=unix:///path)."""

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def target(self) -> str:
        return f"unix://{self.socket}" if self.socket else f"127.0.0.1:{self.port}"

    def sample(self) -> ProcSample:
        return proc_sample(self.pid)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (graceful shutdown), then SIGKILL past ``timeout``; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def start_sidecar(name: str, env: dict[str, str]) -> Child:
    """Start ``python -m ecu_sidecar serve`` (the product's own command) on the port of
    ``env["ECU_LISTEN"]``; the caller waits for its health check."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ecu_sidecar", "serve"],
        cwd=ROOT,
        env=child_env(env),
        stdin=subprocess.DEVNULL,
        text=True,
    )
    listen = env["ECU_LISTEN"]
    if listen.startswith("unix://"):
        return Child(name, proc, 0, socket=listen.removeprefix("unix://"))
    return Child(name, proc, int(listen.rpartition(":")[2]))


def start_server(
    name: str, args: list[str], env: dict[str, str] | None = None, timeout: float = 60.0
) -> Child:
    """Start ``python -m bench.servers <args>`` and wait for its ready line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.servers", *args],
        cwd=ROOT,
        env=child_env(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=None,  # the server's own log lines go to the benchmark's stderr
        text=True,
    )
    assert proc.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    stdout = proc.stdout
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    try:
        first = lines.get(timeout=timeout)
    except queue.Empty:
        proc.kill()
        proc.wait(5)
        raise RuntimeError(f"{name} was not ready within {timeout:.0f}s") from None
    if not first:
        proc.wait(5)
        raise RuntimeError(f"{name} exited with {proc.returncode} before it was ready")
    info = json.loads(first)
    return Child(name, proc, int(info["port"]), info)


def spawn_child(
    module: str, spec: dict[str, Any], workdir: Path
) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """Start ``python -m bench.<module> <spec file>``; it writes its result to spec["out"]."""
    spec = {**spec, "out": str(workdir / f"{module}-{time.time_ns()}.json")}
    path = Path(spec["out"] + ".spec")
    path.write_text(json.dumps(spec))
    proc = subprocess.Popen(
        [sys.executable, "-m", f"bench.{module}", str(path)],
        cwd=ROOT,
        env=child_env(None),
        stdin=subprocess.DEVNULL,
        text=True,
    )
    return proc, spec


def collect_child(
    proc: subprocess.Popen[str], spec: dict[str, Any], timeout_s: float
) -> dict[str, Any]:
    """Wait (at most ``timeout_s``; then kill) and return the child's result."""
    name = spec.get("name") or spec.get("workload") or spec.get("mode", "child")
    try:
        proc.wait(max(0.1, timeout_s))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
        raise RuntimeError(f"{name}: killed past its deadline") from None
    out = Path(spec["out"])
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"{name}: exit code {proc.returncode}")
    result = json.loads(out.read_text())
    out.unlink()
    Path(spec["out"] + ".spec").unlink(missing_ok=True)
    return result


def run_child(
    module: str, spec: dict[str, Any], workdir: Path, deadline_s: float
) -> dict[str, Any]:
    """Run ``python -m bench.<module>`` on ``spec`` and return its result; killed past
    ``deadline_s``."""
    proc, spec = spawn_child(module, spec, workdir)
    return collect_child(proc, spec, deadline_s)
