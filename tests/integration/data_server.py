"""A real HTTP server on 127.0.0.1 (a thread) serving good images and every bad case.

Used by tests/integration/test_data_sources*.py and benchmarks/bench_collect_urls.py. Every
request path is appended to `server.log` so tests can check what was fetched, and how often.
"""
from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageDraw


def make_image(seed: int, size: tuple[int, int] = (96, 72)) -> Image.Image:
    """A distinct picture per seed: tinted background and a few shapes."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = (int(v) for v in rng.integers(0, min(size) // 2, 2))
        w, h = (int(v) for v in rng.integers(10, min(size) // 2 + 10, 2))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x0, y0, x0 + w, y0 + h], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return img


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A valid PNG header claiming width x height pixels, a few hundred bytes on the wire."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


class ImageServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, image_size: tuple[int, int] = (96, 72), slow_s: float = 3.0,
                 huge_bytes: int = 3_000_000, image_pool: int = 0, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.image_size, self.slow_s, self.huge_bytes = image_size, slow_s, huge_bytes
        self.image_pool = image_pool  # > 0: serve /img/n as picture n % image_pool (benchmarks)
        self.log: list[str] = []
        self.lock = threading.Lock()
        self.cache: dict[int, bytes] = {}
        self.flaky_seen: set[str] = set()

    def handle_error(self, request: object, client_address: object) -> None:
        return None  # clients that hang up early (timeouts, byte caps) are expected here

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def image(self, n: int) -> bytes:
        n = n % self.image_pool if self.image_pool else n
        if n not in self.cache:
            self.cache[n] = jpeg(make_image(n, self.image_size))
        return self.cache[n]

    def count(self, path: str) -> int:
        with self.lock:
            return self.log.count(path)


class _Handler(BaseHTTPRequestHandler):
    server: ImageServer

    def log_message(self, *args: object) -> None:  # quiet
        return None

    def _send(self, status: int, body: bytes = b"", ctype: str = "image/jpeg",
              headers: dict[str, str] | None = None, length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        with self.server.lock:
            self.server.log.append(self.path)
        for prefix, handler in ROUTES:
            if self.path.startswith(prefix):
                return handler(self, self.path[len(prefix):])
        return self._send(404, b"not found", "text/plain")


def _img(h: _Handler, rest: str) -> None:
    h._send(200, h.server.image(int(rest.split(".")[0])))


def _flaky(h: _Handler, rest: str) -> None:  # 503 on the first request, then the image
    with h.server.lock:
        first = rest not in h.server.flaky_seen
        h.server.flaky_seen.add(rest)
    h._send(503, b"busy", "text/plain") if first else _img(h, rest)


def _slow(h: _Handler, rest: str) -> None:
    time.sleep(h.server.slow_s)
    _img(h, "1")


def _truncated(h: _Handler, rest: str) -> None:
    body = h.server.image(2)
    h._send(200, body[: len(body) // 2], length=len(body))  # promises more than it sends


def _huge(h: _Handler, rest: str) -> None:  # no Content-Length: the cap must hold while streaming
    h.send_response(200)
    h.send_header("Content-Type", "image/jpeg")
    h.end_headers()
    try:
        for _ in range(h.server.huge_bytes // 65536 + 1):
            h.wfile.write(b"\xff" * 65536)
    except (BrokenPipeError, ConnectionResetError):
        pass
    h.close_connection = True


def _redirect(target: Callable[[_Handler, str], str]) -> Callable[[_Handler, str], None]:
    return lambda h, rest: h._send(302, b"", "text/plain", {"Location": target(h, rest)})


def _tiny(h: _Handler, rest: str) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, "PNG")
    h._send(200, buf.getvalue(), "image/png")


ROUTES: list[tuple[str, Callable[[_Handler, str], None]]] = [
    ("/img/", _img),
    ("/flaky/", _flaky),
    ("/slow", _slow),
    ("/status/", lambda h, rest: h._send(int(rest), b"error", "text/plain")),
    ("/text", lambda h, rest: h._send(200, b"<html>hello</html>", "text/html")),
    ("/truncated.jpg", _truncated),
    ("/huge", _huge),
    ("/tiny.png", _tiny),
    ("/bomb.png", lambda h, rest: h._send(200, bomb_png(), "image/png")),
    ("/redirect-file", _redirect(lambda h, rest: "file:///etc/passwd")),
    ("/redirect-ok/", _redirect(lambda h, rest: f"/img/{rest}")),
    ("/loop-a", _redirect(lambda h, rest: "/loop-b")),
    ("/loop-b", _redirect(lambda h, rest: "/loop-a")),
]


def serve(**kwargs: object) -> Iterator[ImageServer]:
    """Generator for a pytest fixture: start, yield, shut down."""
    server = ImageServer(**kwargs)  # type: ignore[arg-type]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
