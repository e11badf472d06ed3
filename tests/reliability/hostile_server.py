"""A loopback TCP server whose peers misbehave on purpose (tests of the fetch deadlines).

Unlike tests/integration/data_server.py (a well-behaved http.server), each connection here is
handled by hand so that a response can be trickled a byte at a time, forever:
`/trickle-headers` sends its status line and then one header byte every `interval` s;
`/trickle-body` sends complete headers promising 1 MB, then one body byte every `interval` s;
`/trickle-chunked` sends a chunked body of one-byte chunks; `/silent` accepts and never answers;
`/redirect-bad-location` redirects to an unparseable URL (`http://[::1`). The server counts the
connections it saw and stops every handler when closed.
"""
from __future__ import annotations

import socket
import threading
import time
from typing import Iterator


class HostileServer:
    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.stop = threading.Event()
        self.connections = 0
        self.open_handlers = 0
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            with self.lock:
                self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with self.lock:
            self.open_handlers += 1
        try:
            conn.settimeout(5.0)
            request = conn.recv(65536).decode("latin-1")
            path = request.split(" ")[1] if " " in request else "/"
            self._respond(conn, path)
        except OSError:
            pass  # the client gave up (its deadline): expected
        finally:
            conn.close()
            with self.lock:
                self.open_handlers -= 1

    def _trickle(self, conn: socket.socket, data: Iterator[bytes]) -> None:
        for piece in data:
            if self.stop.is_set():
                return
            conn.sendall(piece)
            time.sleep(self.interval)

    def _respond(self, conn: socket.socket, path: str) -> None:
        if path.startswith("/trickle-headers"):
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            self._trickle(conn, (b"X-Slow: " + b"a" * 1 + b"\r\n" for _ in iter(int, 1)))
        elif path.startswith("/trickle-body"):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 1000000\r\n\r\n")
            self._trickle(conn, (b"\x89" for _ in iter(int, 1)))
        elif path.startswith("/trickle-chunked"):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n")
            self._trickle(conn, (b"1\r\nx\r\n" for _ in iter(int, 1)))
        elif path.startswith("/silent"):
            self.stop.wait(60)
        elif path.startswith("/redirect-bad-location"):
            conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: http://[::1\r\nContent-Length: 0\r\n\r\n")
        else:
            conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        self.thread.join(2)


def serve_hostile(interval: float = 0.2) -> Iterator[HostileServer]:
    """Generator for a pytest fixture: start, yield, stop."""
    server = HostileServer(interval)
    try:
        yield server
    finally:
        server.close()
