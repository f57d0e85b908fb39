"""A real HTTP server on 127.0.0.1 for download tests: a scripted behaviour per path, requests counted per path.

(A uniquely named module, imported by the tests of this folder and by ``benchmarks/prepare_data_speed.py``.)

Every path answers according to its :class:`Route`; unknown paths get 404. The server binds to an ephemeral port of
the loopback interface only, and refuses (HTTP 599, recorded in ``overflow``) any request beyond ``max_requests``,
so a client stuck in a retry loop cannot spin forever: tests assert ``overflow == 0``.
"""

from __future__ import annotations

import sys
import threading
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that gives up (timeout) or is killed mid-body breaks the pipe: expected here, not worth a traceback.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@dataclass
class Route:
    """How one path answers (fields combine: e.g. ``fail_first`` then a normal body)."""

    body: bytes = b""
    content_type: str = "image/png"
    status: int = 200
    fail_first: int = 0              # answer the first N requests with fail_status (then behave normally)
    fail_status: int = 500
    stall_s: float = 0.0             # accept, then say nothing for this long and hang up
    truncate_to: int | None = None   # announce the full Content-Length, send this many bytes, hang up
    redirect_to: str | None = None   # 302 to this path (or to this URL, if it has a scheme)
    trickle_s: float = 0.0           # pause this long half-way through the body


class LoopbackServer:
    """``with LoopbackServer() as server: server.routes["/a.png"] = Route(body=...); server.url("/a.png")``."""

    def __init__(self, *, latency_s: float = 0.0, max_requests: int = 2000) -> None:
        self.routes: dict[str, Route] = {}
        self.latency_s = latency_s          # added before every answer (what makes concurrency matter)
        self.max_requests = max_requests
        self.counts: Counter[str] = Counter()
        self.overflow = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd = _QuietServer(("127.0.0.1", 0), self._handler_class())
        # A short poll interval: shutdown() waits up to one interval, once per test.
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="loopback-http", daemon=True)

    def __enter__(self) -> LoopbackServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()  # releases stalled handlers at once
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def reset_counts(self) -> None:
        with self._lock:
            self.counts.clear()
            self.overflow = 0

    def total_requests(self) -> int:
        with self._lock:
            return sum(self.counts.values())

    def _count(self, path: str) -> int | None:
        """Record a request; its 1-based number for this path, or None past ``max_requests``."""
        with self._lock:
            if sum(self.counts.values()) >= self.max_requests:
                self.overflow += 1
                return None
            self.counts[path] += 1
            return self.counts[path]

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection: a hang-up ends exactly one answer

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _send(self, status: int, body: bytes, content_type: str, *, length: int | None = None,
                      extra: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                for key, value in (extra or {}).items():
                    self.send_header(key, value)
                self.end_headers()

            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                number = server._count(path)
                if number is None:
                    self._send(599, b"", "text/plain")
                    return
                if server.latency_s:
                    server._stop.wait(server.latency_s)
                route = server.routes.get(path)
                if route is None:
                    body = b"<html><body>404 not found</body></html>"
                    self._send(404, body, "text/html")
                    self.wfile.write(body)
                    return
                if route.stall_s:
                    server._stop.wait(route.stall_s)
                    self.close_connection = True
                    return
                if number <= route.fail_first:
                    body = b"<html><body>try again later</body></html>"
                    self._send(route.fail_status, body, "text/html")
                    self.wfile.write(body)
                    return
                if route.redirect_to is not None:
                    target = route.redirect_to if "://" in route.redirect_to else server.url(route.redirect_to)
                    self._send(302, b"", "text/plain", extra={"Location": target})
                    return
                self._send(route.status, route.body, route.content_type)
                if route.truncate_to is not None:
                    self.wfile.write(route.body[: route.truncate_to])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                half = len(route.body) // 2
                self.wfile.write(route.body[:half])
                if route.trickle_s:
                    self.wfile.flush()
                    server._stop.wait(route.trickle_s)
                self.wfile.write(route.body[half:])

        return Handler
