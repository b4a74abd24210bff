"""A flaky object store for tests: an HTTP proxy in front of an S3 server that fails a seeded
share of requests.

Each request is forwarded to the upstream server (moto's server mode) unless the proxy draws a
fault for it: an HTTP 500 or 503 answer with an S3 error body, a reset connection (no answer at
all), or a slow answer (forwarded after a delay, so it still succeeds). ``down=True`` answers
every request with a 503: the store is really down. The proxy counts what it did, and counts a
request as a *retry* when the very same request (method, path, query, byte range) failed
before, which is how clients (botocore, s3fs) retry.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

__all__ = ["FlakyProxy", "Faults"]

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
}

_ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
    "<Message>flaky proxy: injected {status}</Message></Error>"
)


@dataclass
class Faults:
    """Shares of requests that fail, by kind (the rest are forwarded as they are)."""

    http_500: float = 0.06
    http_503: float = 0.06
    reset: float = 0.05
    slow: float = 0.05
    slow_seconds: tuple[float, float] = (0.1, 0.5)


@dataclass
class _State:
    """What the proxy did; shared by its handler threads (guarded by ``lock``)."""

    faults: Faults
    rng: random.Random
    down: bool = False
    counts: Counter[str] = field(default_factory=Counter)
    failed_keys: set[tuple[str, ...]] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def draw(self, key: tuple[str, ...]) -> tuple[str, float]:
        """The fate of one request (``forward``, ``slow``, ``500``, ``503`` or ``reset``) and
        its delay in seconds."""
        with self.lock:
            self.counts["requests"] += 1
            if key in self.failed_keys:  # the same request again after a failure: a retry
                self.counts["retried"] += 1
                self.failed_keys.discard(key)
            if self.down:
                fate = "503"
            else:
                f, u = self.faults, self.rng.random()
                fate = "forward"
                for name, share in (
                    ("500", f.http_500),
                    ("503", f.http_503),
                    ("reset", f.reset),
                    ("slow", f.slow),
                ):
                    if u < share:
                        fate = name
                        break
                    u -= share
            self.counts[fate] += 1
            if fate in ("500", "503", "reset"):
                self.counts["failed"] += 1
                self.failed_keys.add(key)
            delay = self.rng.uniform(*self.faults.slow_seconds) if fate == "slow" else 0.0
            return fate, delay


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the counters tell what happened."""

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        body = self._body()
        key = (self.command, self.path, self.headers.get("Range", ""))
        fate, delay = self.server.state.draw(key)
        if fate == "reset":
            # SO_LINGER 0: close with a TCP RST, the client sees "connection reset by peer".
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return
        if fate in ("500", "503"):
            code = "InternalError" if fate == "500" else "ServiceUnavailable"
            self._reply(int(fate), [("Content-Type", "application/xml")], _error(code, fate))
            return
        time.sleep(delay)
        self._forward(body)

    def _forward(self, body: bytes) -> None:
        upstream = http.client.HTTPConnection(self.server.upstream_host, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            upstream.request(self.command, self.path, body=body, headers=headers)
            resp = upstream.getresponse()
            data = resp.read()
            out = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
            length = resp.getheader("Content-Length") if self.command == "HEAD" else None
            self._reply(resp.status, out, data, length=length)
        finally:
            upstream.close()

    def _reply(
        self, status: int, headers: list[tuple[str, str]], data: bytes, *, length: str | None = None
    ) -> None:
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", length if length is not None else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle  # http.server: do_<METHOD>


def _error(code: str, status: str) -> bytes:
    return _ERROR_BODY.format(code=code, status=status).encode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: str, state: _State) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream_host = urlsplit(upstream).netloc
        self.state = state


class FlakyProxy:
    """A running flaky proxy in front of ``upstream`` (``http://host:port``); a context manager.

    Parameters
    ----------
    upstream
        The S3 server's endpoint URL.
    faults
        The shares of requests to fail, by kind.
    seed
        Seed of the proxy's random draws (the order of concurrent requests still varies).
    down
        Answer every request with a 503 (a store that is down).
    """

    def __init__(
        self, upstream: str, *, faults: Faults | None = None, seed: int = 0, down: bool = False
    ) -> None:
        self.state = _State(faults or Faults(), random.Random(seed), down=down)
        self._server = _Server(upstream, self.state)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        """The proxy's endpoint URL (give it to clients as ``endpoint_url``)."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def counts(self) -> Counter[str]:
        """Requests seen, by fate, plus ``failed`` (500, 503 and resets) and ``retried`` (failed
        requests sent again) totals (a copy)."""
        with self.state.lock:
            return Counter(self.state.counts)

    def __enter__(self) -> FlakyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
