"""A fault-injecting HTTP proxy to put in front of an S3 server (moto) in tests.

Real object stores reset connections, stall and answer 503 SlowDown under load; this proxy
does the same, on purpose and reproducibly, so tests can check that ``hrem_ray.storage``
survives it. It understands just enough HTTP/1.1 (request and response framing) to decide per
request, from a seeded generator, whether to forward it untouched, delay it, answer it with a
503 SlowDown, or reset the connection at a random byte of the request (client to upstream) or
of the response (upstream to client). It counts what it relays and what it injected.

In-process::

    with FaultProxy("127.0.0.1", moto_port, seed=1, reset=0.1) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
        ...
        proxy.report()  # {"requests": ..., "resets": ..., ...}

As a process (e.g. inside a test's network namespace); it prints its report as one JSON line
on SIGTERM or SIGINT::

    python -m hrem_ray.testing.s3proxy --upstream 127.0.0.1:PORT --port P --seed S --reset 0.1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import signal
import socket
import struct
import sys
import threading
import time
from typing import BinaryIO

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
_BODYLESS = {204, 304}


class _Reset(Exception):
    """The proxy reset the connection on purpose."""


class FaultProxy:
    """Forward 127.0.0.1:``port`` (0: a free one) to ``upstream_host:upstream_port``,
    injecting faults per request with these probabilities: ``reset`` (at a random byte, in a
    random direction: the server gets a truncated request, or the client a truncated
    response), ``delay`` (``delay_s`` before forwarding) and ``http503``."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        seed: int = 0,
        reset: float = 0.0,
        delay: float = 0.0,
        delay_s: float = 3.0,
        http503: float = 0.0,
        port: int = 0,
    ) -> None:
        if reset + delay + http503 > 1:
            raise ValueError("reset + delay + http503 must be at most 1")
        self.upstream = (upstream_host, upstream_port)
        self.seed, self.delay_s = seed, delay_s
        self.rates = {"reset": reset, "delay": delay, "http503": http503}
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._server = socket.create_server(("127.0.0.1", port))
        self.port = self._server.getsockname()[1]
        self._open: set[socket.socket] = set()
        self._thread: threading.Thread | None = None
        self.reset_counters()

    @property
    def endpoint(self) -> str:
        """The URL to put in ``AWS_ENDPOINT_URL``."""
        return f"http://127.0.0.1:{self.port}"

    def reset_counters(self) -> None:
        """Zero the byte counters and the fault report (e.g. between benchmark phases)."""
        with self._lock:
            self.bytes_down = 0  # upstream -> client
            self.bytes_up = 0  # client -> upstream
            self._counts = dict.fromkeys(
                ("connections", "requests", "resets_up", "resets_down", "delays", "http503"), 0
            )

    def report(self) -> dict[str, int]:
        """What was relayed and injected so far: requests, resets (and by direction), delays,
        503s, connections, bytes_up, bytes_down."""
        with self._lock:
            c = dict(self._counts)
            resets = c["resets_up"] + c["resets_down"]
            return {**c, "resets": resets, "bytes_up": self.bytes_up, "bytes_down": self.bytes_down}

    def set_rates(self, *, reset: float = 0.0, delay: float = 0.0, http503: float = 0.0) -> None:
        """Change the fault rates of requests from now on."""
        with self._lock:
            self.rates = {"reset": reset, "delay": delay, "http503": http503}

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._accept, name="s3proxy", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop accepting and drop every open connection."""
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the accept(); close() alone does not
        self._server.close()
        with self._lock:
            for sock in list(self._open):
                _hard_close(sock)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def serve_forever(self) -> None:
        self._accept()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:  # closed
                return
            self._count("connections")
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def _add_bytes(self, up: int = 0, down: int = 0) -> None:
        with self._lock:
            self.bytes_up += up
            self.bytes_down += down

    def _decide(self) -> tuple[str, float]:
        """This request's fate, and a uniform number for where a reset falls."""
        with self._lock:
            r, where, direction = self._rng.random(), self._rng.random(), self._rng.random()
            rates = self.rates
        if r < rates["reset"]:
            return ("reset_up" if direction < 0.5 else "reset_down"), where
        r -= rates["reset"]
        if r < rates["delay"]:
            return "delay", where
        r -= rates["delay"]
        return ("http503" if r < rates["http503"] else "ok"), where

    def _handle(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        abort = False  # an injected reset: close with RST; else a clean close that delivers
        with self._lock:
            self._open.add(client)
        try:
            cin = client.makefile("rb")
            while True:
                head = _read_head(cin)
                if head is None:  # the client closed its connection
                    return
                self._count("requests")
                fate, where = self._decide()
                method, headers = _parse_request(head)
                if headers.get("expect", "").lower() == "100-continue":
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                    head = _drop_header(head, b"expect")
                body = _read_body(cin, headers)
                if fate == "http503":
                    self._count("http503")
                    client.sendall(
                        b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(SLOW_DOWN), SLOW_DOWN)
                    )
                    continue
                if fate == "delay":
                    self._count("delays")
                    time.sleep(self.delay_s)
                if upstream is None:
                    upstream = socket.create_connection(self.upstream)
                    uin = upstream.makefile("rb")
                    with self._lock:
                        self._open.add(upstream)
                request = head + body
                if fate == "reset_up":
                    cut = int(where * len(request))
                    upstream.sendall(request[:cut])
                    self._add_bytes(up=cut)
                    self._count("resets_up")
                    raise _Reset
                upstream.sendall(request)
                self._add_bytes(up=len(request))
                keep = self._relay_response(uin, client, method, where, fate == "reset_down")
                if not keep:
                    return
        except _Reset:
            abort = True
        except OSError:
            pass
        finally:
            for sock in (client, upstream):
                if sock is None:
                    continue
                if abort:
                    _hard_close(sock)
                else:
                    sock.close()
                with self._lock:
                    self._open.discard(sock)

    def _relay_response(
        self, uin: BinaryIO, client: socket.socket, method: str, where: float, cut: bool
    ) -> bool:
        """Copy one response from ``uin`` to the client (up to a random byte when ``cut``);
        whether the connection stays open for another request."""
        head = _read_head(uin)
        if head is None:
            raise OSError("upstream closed")
        status, headers = _parse_response(head)
        if method == "HEAD" or status in _BODYLESS or 100 <= status < 200:
            body, until_eof = b"", False
        else:
            until_eof = "content-length" not in headers and "chunked" not in headers.get(
                "transfer-encoding", ""
            )
            body = uin.read() if until_eof else _read_body(uin, headers)
        response = head + body
        if cut:
            n = int(where * len(response))
            client.sendall(response[:n])
            self._add_bytes(down=n)
            self._count("resets_down")
            raise _Reset
        client.sendall(response)
        self._add_bytes(down=len(response))
        return not until_eof and headers.get("connection", "").lower() != "close"


def _read_head(f: BinaryIO) -> bytes | None:
    """The request or status line and headers, through the blank line; None at a clean EOF."""
    lines = []
    while True:
        line = f.readline(65537)
        if not line:
            if lines:
                raise OSError("truncated HTTP head")
            return None
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            return b"".join(lines)


def _headers(head: bytes) -> dict[str, str]:
    out = {}
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            out[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return out


def _parse_request(head: bytes) -> tuple[str, dict[str, str]]:
    return head.split(b" ", 1)[0].decode("latin-1"), _headers(head)


def _parse_response(head: bytes) -> tuple[int, dict[str, str]]:
    return int(head.split(b" ", 2)[1]), _headers(head)


def _drop_header(head: bytes, name: bytes) -> bytes:
    lines = head.split(b"\r\n")
    return b"\r\n".join(ln for ln in lines if not ln.lower().startswith(name + b":"))


def _read_body(f: BinaryIO, headers: dict[str, str]) -> bytes:
    """A message body as framed by Content-Length or chunked encoding, raw."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts = []
        while True:
            size_line = f.readline(65537)
            parts.append(size_line)
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers, through the blank line
                    line = f.readline(65537)
                    parts.append(line)
                    if line in (b"\r\n", b"\n", b""):
                        return b"".join(parts)
            parts.append(_read_exactly(f, size + 2))
    return _read_exactly(f, int(headers.get("content-length", "0")))


def _read_exactly(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise OSError("truncated HTTP body")
    return data


def _hard_close(sock: socket.socket) -> None:
    """Close with a TCP RST rather than a FIN, as a dropped connection looks to the peer."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def main(argv: list[str] | None = None) -> None:
    """Run a proxy until SIGTERM/SIGINT, then print its report as one JSON line."""
    p = argparse.ArgumentParser(prog="python -m hrem_ray.testing.s3proxy", description=__doc__)
    p.add_argument("--upstream", required=True, help="HOST:PORT of the S3 server")
    p.add_argument("--port", type=int, default=0, help="port to listen on (0: a free one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reset", type=float, default=0.1, help="fraction of requests reset")
    p.add_argument("--delay", type=float, default=0.1, help="fraction of requests delayed")
    p.add_argument("--delay-s", type=float, default=3.0, help="seconds a delayed request waits")
    p.add_argument("--http503", type=float, default=0.0, help="fraction answered 503 SlowDown")
    args = p.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    proxy = FaultProxy(
        host,
        int(port),
        seed=args.seed,
        reset=args.reset,
        delay=args.delay,
        delay_s=args.delay_s,
        http503=args.http503,
        port=args.port,
    )

    def stop(*_: object) -> None:
        print(json.dumps(proxy.report()), flush=True)
        proxy.close()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"s3proxy: listening on {proxy.endpoint}, forwarding to {args.upstream}", flush=True)
    proxy.serve_forever()


if __name__ == "__main__":
    main()
