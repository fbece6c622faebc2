"""The HTTP endpoint of a process: its registry at /metrics and its probes, in a daemon thread."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

__all__ = ["Check", "serve_http"]


#: A probe of serve_http: (healthy, one line saying why).
Check = Callable[[], tuple[bool, str]]


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No access log: probes and scrapes would fill the process's log."""


def serve_http(listen: str, registry: CollectorRegistry, checks: Mapping[str, Check]) -> Any:
    """Serve ``registry`` at /metrics on ``listen`` (host:port) in a daemon thread, as
    prometheus_client's start_http_server does, and each path of ``checks`` as a probe: 200
    or 503 with its line of text. Returns the server (``server_port``, ``shutdown()``)."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        check = checks.get(environ.get("PATH_INFO", ""))
        if check is None:
            return metrics(environ, start_response)
        healthy, text = check()
        status = "200 OK" if healthy else "503 Service Unavailable"
        start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
        return [text.encode() + b"\n"]

    host, _, port = listen.rpartition(":")
    family, *_, address = socket.getaddrinfo(
        host.strip("[]"), int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    server_class = type("_Server", (_Server,), {"address_family": family})
    httpd = make_server(address[0], int(port), app, server_class, handler_class=_Quiet)
    threading.Thread(target=httpd.serve_forever, name="ecu-http", daemon=True).start()
    return httpd
