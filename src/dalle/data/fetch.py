"""A small, strict HTTP(S) client for URL-list collection (stdlib `http.client`, thread-safe).

Policy, per request:
* only `http`/`https`; every redirect is followed by hand and re-checked (scheme, address, loop,
  count), so a redirect to `file://`, `ftp://` or an internal address is refused;
* the host is resolved once and the connection goes to that checked address (no DNS rebinding);
  loopback/private/link-local/reserved targets are refused unless `allow_private` is set;
* one deadline (`timeout_s`) covers connect, headers and body of each hop;
* the body is streamed and refused as soon as it passes `max_bytes` (Content-Length is checked
  first when the server sends one); a body shorter than its Content-Length is `truncated`;
* bounded retries with exponential backoff on timeouts, connection errors, 429 and 5xx only;
* politeness: at most `per_host` requests in flight per host (`HostLimiter`).

Failures raise `FetchError(kind, detail)`; `kind` goes to the manifest's `error` column.
"""
from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional
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


def check_url(url: str, allow_private: bool) -> Target:
    """Parse, check the scheme, resolve and check the address. Raises FetchError."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise FetchError("bad_url", f"{url[:200]!r} ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchError("bad_scheme", f"{scheme or 'no'} scheme in {url[:200]!r}; only http/https")
    if not parts.hostname:
        raise FetchError("bad_url", f"no host in {url[:200]!r}")
    port = port or (443 if scheme == "https" else 80)
    path = quote(parts.path or "/", safe=_SAFE)
    if parts.query:
        path += "?" + quote(parts.query, safe=_SAFE)
    address = _resolve(parts.hostname, port, allow_private)
    return Target(scheme, parts.hostname, port, path, address)


def _resolve(host: str, port: int, allow_private: bool) -> str:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise FetchError("dns", f"cannot resolve {host!r} ({exc})") from None
    addresses = [info[4][0] for info in infos]
    for addr in addresses:
        ip = ipaddress.ip_address(addr.split("%")[0])
        ip = getattr(ip, "ipv4_mapped", None) or ip
        if not ip.is_global and not allow_private:
            raise FetchError("private_address", f"{host} resolves to non-public {ip}; set "
                                                "data.url_list.allow_private to allow it")
    return addresses[0]


def _connection(target: Target, timeout: float) -> http.client.HTTPConnection:
    cls = http.client.HTTPSConnection if target.scheme == "https" else http.client.HTTPConnection
    kwargs = {"context": ssl.create_default_context()} if target.scheme == "https" else {}
    conn = cls(target.host, target.port, timeout=timeout, **kwargs)
    # Connect to the address we checked, keep the host name for Host/SNI/certificate checks.
    conn._create_connection = (  # type: ignore[attr-defined]
        lambda _addr, tmo=timeout, src=None: socket.create_connection(
            (target.address, target.port), tmo, src))
    return conn


def _read_body(resp: http.client.HTTPResponse, conn: http.client.HTTPConnection,
               max_bytes: int, deadline: float) -> bytes:
    length = resp.getheader("Content-Length")
    if length and length.isdigit() and int(length) > max_bytes:
        raise FetchError("too_large", f"Content-Length {length} > max_bytes {max_bytes}")
    chunks, total = [], 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchError("timeout", "body not complete within the deadline", retryable=True)
        if conn.sock is not None:
            conn.sock.settimeout(remaining)
        try:
            chunk = resp.read(_CHUNK)
        except http.client.IncompleteRead as exc:
            raise FetchError("truncated", f"body ended after {total + len(exc.partial)} of "
                                          f"{length} bytes", retryable=True) from None
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > max_bytes:
            raise FetchError("too_large", f"body exceeds max_bytes {max_bytes}")
        chunks.append(chunk)


def fetch_once(url: str, policy: FetchPolicy) -> bytes:
    """One attempt: GET with manual, re-checked redirects. Raises FetchError."""
    seen = {url}
    deadline = time.monotonic() + policy.timeout_s
    for _hop in range(policy.max_redirects + 1):
        target = check_url(url, policy.allow_private)
        conn = _connection(target, max(0.01, deadline - time.monotonic()))
        try:
            conn.request("GET", target.path, headers={"User-Agent": policy.user_agent,
                                                      "Accept": "image/*,*/*;q=0.5"})
            resp = conn.getresponse()
            if resp.status in REDIRECTS:
                location = resp.getheader("Location")
                if not location:
                    raise FetchError(f"http_{resp.status}", "redirect without Location")
                url = urljoin(url, location.strip())
                if url in seen:
                    raise FetchError("redirect_loop", f"{url[:200]!r} visited twice")
                seen.add(url)
                continue
            if resp.status != 200:
                retry = resp.status == 429 or resp.status >= 500
                raise FetchError(f"http_{resp.status}", resp.reason or "", retryable=retry)
            return _read_body(resp, conn, policy.max_bytes, deadline)
        except (TimeoutError, socket.timeout):
            raise FetchError("timeout", f"no answer within {policy.timeout_s}s",
                             retryable=True) from None
        except http.client.InvalidURL as exc:
            raise FetchError("bad_url", str(exc)[:200]) from None
        except (ConnectionError, http.client.HTTPException, ssl.SSLError, OSError) as exc:
            raise FetchError("connection", f"{type(exc).__name__}: {exc}"[:200],
                             retryable=True) from None
        finally:
            conn.close()
    raise FetchError("too_many_redirects", f"more than {policy.max_redirects} redirects")


def fetch(url: str, policy: FetchPolicy, limiter: Optional[HostLimiter] = None,
          sleep: Callable[[float], None] = time.sleep) -> tuple[bytes, int]:
    """GET with bounded retries and backoff; returns (body, attempts). Raises FetchError."""
    host = (urlsplit(url).hostname or "") if "://" in url else ""
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
