"""A small, strict HTTP(S) client for URL-list collection (stdlib `http.client`, thread-safe).

Policy, per request:
* only `http`/`https`; every redirect is followed by hand and re-checked (scheme, address, loop,
  count), so a redirect to `file://`, `ftp://` or an internal address is refused;
* the host is resolved once and the connection goes to that checked address (no DNS rebinding);
  loopback/private/link-local/reserved targets are refused unless `allow_private` is set;
* one deadline (`timeout_s`) covers each attempt as a whole: DNS, connect, TLS, headers and body of
  every hop. It is enforced by a watchdog that shuts the attempt's socket down when it passes, so
  a peer that trickles its headers or body a byte at a time cannot hold a row past it;
* the body is streamed and refused as soon as it passes `max_bytes` (Content-Length is checked
  first when the server sends one); a body shorter than its Content-Length is `truncated`;
* bounded retries with exponential backoff on timeouts, connection errors, 429 and 5xx only;
* politeness: at most `per_host` requests in flight per host (`HostLimiter`).

Failures raise `FetchError(kind, detail)`; `kind` goes to the manifest's `error` column.
"""
from __future__ import annotations

import heapq
import http.client
import ipaddress
import itertools
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional
from urllib.parse import quote, urljoin, urlsplit

REDIRECTS = {301, 302, 303, 307, 308}
_CHUNK = 1 << 16
_SAFE = "/%?=&;:@!$'()*+,~[]"  # already-escaped URLs pass unchanged; spaces etc. get quoted


class FetchError(Exception):
    def __init__(self, kind: str, detail: str, retryable: bool = False) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
        self.retryable = retryable


@dataclass(frozen=True)
class FetchPolicy:
    timeout_s: float = 10.0
    max_bytes: int = 20_000_000
    retries: int = 2
    backoff_s: float = 0.5
    max_redirects: int = 5
    allow_private: bool = False
    user_agent: str = "dalle-collect/1.0 (+https://github.com/openai/DALL-E)"


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    path: str  # path + query, never empty
    address: str  # the resolved, checked IP we connect to


class HostLimiter:
    """At most `per_host` concurrent requests to one host (politeness)."""

    def __init__(self, per_host: int) -> None:
        self.per_host = per_host
        self._lock = threading.Lock()
        self._sems: dict[str, threading.BoundedSemaphore] = {}

    def slot(self, host: str) -> threading.BoundedSemaphore:
        with self._lock:
            if host not in self._sems:
                self._sems[host] = threading.BoundedSemaphore(self.per_host)
            return self._sems[host]


class Deadline:
    """The deadline of one attempt. `watch(sock)` puts a socket under it: when the deadline
    passes, a shared watchdog thread shuts the socket down, which ends any read blocked on it
    (plain or TLS, however slowly the peer sends), and `expired` becomes True."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds
        self.seconds = seconds
        self.expired = False
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self.key = next(_KEYS)
        _WATCHDOG.add(self)

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def watch(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._socks.append(sock)
            if self.expired:
                _shutdown(sock)
        return sock

    def fire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._socks:
                _shutdown(sock)

    def close(self) -> None:
        with self._lock:
            self._socks.clear()
        _WATCHDOG.discard(self)

    def timeout(self, what: str) -> FetchError:
        return FetchError("timeout", f"{what} not complete within the {self.seconds}s deadline",
                          retryable=True)


def _shutdown(sock: socket.socket) -> None:
    try:  # the plain socket's shutdown, also for an SSLSocket (whose own would unwrap it)
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


class _Watchdog:
    """One daemon thread per process firing the deadlines that pass (a heap of deadlines)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._heap: list[tuple[float, int, Deadline]] = []
        self._live: set[int] = set()
        self._pid = 0

    def add(self, deadline: Deadline) -> None:
        with self._cv:
            if self._pid != os.getpid():  # first use in this process (or a forked child)
                self._pid, self._heap, self._live = os.getpid(), [], set()
                threading.Thread(target=self._run, name="fetch-deadlines", daemon=True).start()
            heapq.heappush(self._heap, (deadline.at, deadline.key, deadline))
            self._live.add(deadline.key)
            self._cv.notify()

    def discard(self, deadline: Deadline) -> None:
        with self._cv:
            self._live.discard(deadline.key)

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._heap and self._heap[0][1] not in self._live:
                    heapq.heappop(self._heap)
                wait = self._heap[0][0] - time.monotonic() if self._heap else None
                if wait is None or wait > 0:
                    self._cv.wait(wait)
                    continue
                _, key, due = heapq.heappop(self._heap)
                self._live.discard(key)
            due.fire()


_WATCHDOG = _Watchdog()
_KEYS = itertools.count()


def check_url(url: str, allow_private: bool, deadline: Optional[Deadline] = None) -> Target:
    """Parse, check the scheme, resolve and check the address. Raises FetchError."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
        host = parts.hostname
    except ValueError as exc:
        raise FetchError("bad_url", f"{url[:200]!r} ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchError("bad_scheme", f"{scheme or 'no'} scheme in {url[:200]!r}; only http/https")
    if not host:
        raise FetchError("bad_url", f"no host in {url[:200]!r}")
    port = port or (443 if scheme == "https" else 80)
    try:
        path = quote(parts.path or "/", safe=_SAFE)
        if parts.query:
            path += "?" + quote(parts.query, safe=_SAFE)
    except (UnicodeError, ValueError) as exc:  # e.g. a lone surrogate in the path
        raise FetchError("bad_url", f"{url[:200]!r} ({exc})") from None
    own = deadline is None
    deadline = deadline or Deadline(30.0)
    try:
        address = _resolve(host, port, allow_private, deadline)
    finally:
        if own:
            deadline.close()
    return Target(scheme, host, port, path, address)


def _lookup(host: str, port: int, deadline: Deadline) -> list[str]:
    """getaddrinfo within the deadline: in a daemon thread (the call itself cannot time out)."""
    try:
        return [str(ipaddress.ip_address(host.split("%")[0]))]  # a literal: no lookup
    except ValueError:
        pass
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError, ValueError) as exc:
            box["error"] = exc

    worker = threading.Thread(target=run, name="fetch-dns", daemon=True)
    worker.start()
    worker.join(deadline.remaining())
    if worker.is_alive():
        raise deadline.timeout(f"DNS lookup of {host!r}")
    if "error" in box:
        raise FetchError("dns", f"cannot resolve {host!r} ({box['error']})")
    return [info[4][0] for info in box["infos"]]


def _resolve(host: str, port: int, allow_private: bool, deadline: Deadline) -> str:
    addresses = _lookup(host, port, deadline)
    if not addresses:
        raise FetchError("dns", f"cannot resolve {host!r} (no address)")
    for addr in addresses:
        ip = ipaddress.ip_address(addr.split("%")[0])
        ip = getattr(ip, "ipv4_mapped", None) or ip
        if not ip.is_global and not allow_private:
            raise FetchError("private_address", f"{host} resolves to non-public {ip}; set "
                                                "data.url_list.allow_private to allow it")
    return addresses[0]


def _connection(target: Target, deadline: Deadline) -> http.client.HTTPConnection:
    cls = http.client.HTTPSConnection if target.scheme == "https" else http.client.HTTPConnection
    kwargs = {"context": ssl.create_default_context()} if target.scheme == "https" else {}
    timeout = max(0.01, deadline.remaining())
    conn = cls(target.host, target.port, timeout=timeout, **kwargs)
    # Connect to the address we checked, keep the host name for Host/SNI/certificate checks;
    # the socket goes under the attempt's deadline as soon as it exists.
    conn._create_connection = (  # type: ignore[attr-defined]
        lambda _addr, tmo=timeout, src=None: deadline.watch(socket.create_connection(
            (target.address, target.port), max(0.01, min(tmo, deadline.remaining())), src)))
    return conn


def _read_body(resp: http.client.HTTPResponse, conn: http.client.HTTPConnection,
               max_bytes: int, deadline: Deadline) -> bytes:
    length = resp.getheader("Content-Length")
    if length and length.isdigit() and int(length) > max_bytes:
        raise FetchError("too_large", f"Content-Length {length} > max_bytes {max_bytes}")
    chunks, total = [], 0
    while True:
        if deadline.expired or deadline.remaining() <= 0:
            raise deadline.timeout("body")
        if conn.sock is not None:
            conn.sock.settimeout(max(0.01, deadline.remaining()))
        try:
            chunk = resp.read(_CHUNK)
        except http.client.IncompleteRead as exc:
            if deadline.expired:
                raise deadline.timeout("body") from None
            raise FetchError("truncated", f"body ended after {total + len(exc.partial)} of "
                                          f"{length} bytes", retryable=True) from None
        if deadline.expired:  # the watchdog shut the socket: what was read is not the body
            raise deadline.timeout("body")
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > max_bytes:
            raise FetchError("too_large", f"body exceeds max_bytes {max_bytes}")
        chunks.append(chunk)


def _hop(url: str, target: Target, policy: FetchPolicy, deadline: Deadline
         ) -> tuple[Optional[bytes], Optional[str]]:
    """One request: (body, None), or (None, the redirect's next URL). Raises FetchError."""
    conn = _connection(target, deadline)
    try:
        conn.request("GET", target.path, headers={"User-Agent": policy.user_agent,
                                                  "Accept": "image/*,*/*;q=0.5"})
        resp = conn.getresponse()
        if deadline.expired:  # the watchdog cut the headers short
            raise deadline.timeout("headers")
        if resp.status in REDIRECTS:
            location = resp.getheader("Location")
            if not location:
                raise FetchError(f"http_{resp.status}", "redirect without Location")
            return None, urljoin(url, location.strip())
        if resp.status != 200:
            retry = resp.status == 429 or resp.status >= 500
            raise FetchError(f"http_{resp.status}", (resp.reason or "")[:200], retryable=retry)
        return _read_body(resp, conn, policy.max_bytes, deadline), None
    except FetchError:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure of the exchange is this row's error
        raise _exchange_error(exc, deadline) from None
    finally:
        conn.close()


def _exchange_error(exc: Exception, deadline: Deadline) -> FetchError:
    if deadline.expired or isinstance(exc, (TimeoutError, socket.timeout)):
        return deadline.timeout("request")
    if isinstance(exc, (http.client.InvalidURL, ValueError, UnicodeError)):
        return FetchError("bad_url", f"{type(exc).__name__}: {exc}"[:200])
    return FetchError("connection", f"{type(exc).__name__}: {exc}"[:200], retryable=True)


def fetch_once(url: str, policy: FetchPolicy) -> bytes:
    """One attempt (one deadline for all of it): GET with manual, re-checked redirects."""
    seen = {url}
    deadline = Deadline(policy.timeout_s)
    try:
        for _hop_index in range(policy.max_redirects + 1):
            target = check_url(url, policy.allow_private, deadline)
            body, url = _hop(url, target, policy, deadline)
            if body is not None:
                return body
            if url in seen:
                raise FetchError("redirect_loop", f"{url[:200]!r} visited twice")
            seen.add(url)
        raise FetchError("too_many_redirects", f"more than {policy.max_redirects} redirects")
    finally:
        deadline.close()


def fetch(url: str, policy: FetchPolicy, limiter: Optional[HostLimiter] = None,
          sleep: Callable[[float], None] = time.sleep) -> tuple[bytes, int]:
    """GET with bounded retries and backoff; returns (body, attempts). Raises FetchError."""
    try:
        host = (urlsplit(url).hostname or "") if "://" in url else ""
    except ValueError:  # e.g. http://[::1/a.png: check_url records it as this row's bad_url
        host = ""
    attempt = 0
    while True:
        attempt += 1
        slot = limiter.slot(host) if limiter is not None else None
        try:
            if slot is not None:
                slot.acquire()
            try:
                return fetch_once(url, policy), attempt
            finally:
                if slot is not None:
                    slot.release()
        except FetchError as exc:
            if not exc.retryable or attempt > policy.retries:
                raise
        sleep(policy.backoff_s * 2 ** (attempt - 1))
