"""Image URLs for the server (`--allow-image-urls`): an http(s) GET that reaches public addresses only (every
address a name resolves to is vetted, and the connection goes to a vetted one, so a DNS answer cannot be swapped
in between), follows at most a few redirects (each vetted again), reads at most `max_body_bytes` and finishes
within `image_url_timeout` seconds in all, however slowly the other side sends. A failure is an ApiError saying
only why, in fixed words; the detail goes to the server log.
"""
from __future__ import annotations

import functools
import http.client
import io
import ipaddress
import logging
import socket
import ssl
import threading
import time
from urllib.parse import urljoin, urlsplit

from vlmkit.serve.protocol import ApiError, ImageRef, ServeSettings

log = logging.getLogger("vlmkit.serve")


MAX_REDIRECTS = 5
_REDIRECTS = {301, 302, 303, 307, 308}


class FetchFailed(Exception):
    """An image URL that could not be fetched: `reason` is all the client is told (short, fixed wording, no
    exception text: that could tell it about the server's network); `detail` goes to the server log only."""

    def __init__(self, reason: str, detail: str = "", code: str = "image_fetch_failed"):
        super().__init__(reason)
        self.reason, self.detail, self.code = reason, detail, code


def fetch_image(ref: ImageRef, settings: ServeSettings) -> bytes:
    """GET an http(s) image URL (only when the server allows it): public addresses only, at most
    max_body_bytes, within image_url_timeout seconds in all; a failure is an ApiError saying only why."""
    try:
        return _fetch(ref.url, settings)
    except FetchFailed as exc:
        log.warning("%s: could not fetch %r (%s)%s", ref.param, ref.url, exc.reason, exc.detail and f": {exc.detail}")
        failure = exc
    except Exception:  # noqa: BLE001  whatever went wrong, the client hears no internals of it
        log.exception("%s: could not fetch %r", ref.param, ref.url)
        failure = FetchFailed("failed")
    raise ApiError(400, f"{ref.param}: could not fetch the image ({failure.reason})", ref.param, failure.code)


def _fetch(url: str, settings: ServeSettings) -> bytes:
    """Follow at most MAX_REDIRECTS redirects by hand, vetting every hop's scheme and addresses."""
    deadline = time.monotonic() + settings.image_url_timeout
    limit = settings.max_body_bytes
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise FetchFailed("refused: only http and https URLs are fetched", f"scheme of {url!r}")
        try:
            host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise FetchFailed("invalid URL", str(exc)) from None
        if not host:
            raise FetchFailed("invalid URL", f"no host in {url!r}")
        addresses = _vetted(host, port, settings.image_url_allow_networks, deadline)
        connection = (_TLSConnection if parts.scheme == "https" else _Connection)(host, port, addresses, deadline)
        response = None
        try:
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            connection.connect()
            connection.request("GET", target, headers={"User-Agent": "vlmkit", "Accept": "image/*",
                                                       "Connection": "close"})
            response = connection.getresponse()
            if response.status in _REDIRECTS:
                location = response.getheader("Location")
                if not location:
                    raise FetchFailed(f"HTTP {response.status} without a Location")
                url = urljoin(url, location.strip())
                continue
            if response.status != 200:
                raise FetchFailed(f"HTTP {response.status}")
            return _read(response, limit)
        except FetchFailed:
            raise
        except Exception as exc:  # noqa: BLE001  mapped to a fixed reason; the text goes to the log
            raise FetchFailed(_reason(exc, deadline), f"{type(exc).__name__}: {exc}") from None
        finally:
            if response is not None:
                response.close()
            connection.close()
    raise FetchFailed(f"too many redirects (more than {MAX_REDIRECTS})", f"the last was to {url!r}")


def _read(response: http.client.HTTPResponse, limit: int) -> bytes:
    too_large = FetchFailed(f"too large: more than {limit:,} bytes, the server's --max-body-bytes",
                            code="image_too_large")
    declared = response.getheader("Content-Length", "")
    if declared.strip().isdigit() and int(declared) > limit:
        raise too_large  # without reading any of it
    chunks, size = [], 0
    while chunk := response.read(min(64 * 1024, limit + 1 - size)):
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _reason(exc: Exception, deadline: float) -> str:
    """The client's words for a failed connection or read."""
    if isinstance(exc, TimeoutError) or time.monotonic() >= deadline:
        return "timed out"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "the TLS certificate is not valid"
    if isinstance(exc, ssl.SSLError):
        return "TLS failed"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, http.client.HTTPException):
        return "not a valid HTTP response"
    if isinstance(exc, OSError):
        return "could not connect"
    if isinstance(exc, (ValueError, UnicodeError)):
        return "invalid URL"
    return "failed"


def _refusal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why an address is not one to fetch from (None: it is public)."""
    if address.version == 6:  # IPv4 written as IPv6 (mapped, 6to4, NAT64) is judged as the IPv4 address
        if address.ipv4_mapped or address.sixtofour:
            return _refusal(address.ipv4_mapped or address.sixtofour)
        if address in _NAT64:
            return _refusal(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    for kind, refused in (("unspecified", address.is_unspecified), ("loopback", address.is_loopback),
                          ("link-local", address.is_link_local), ("multicast", address.is_multicast),
                          ("reserved", address.is_reserved), ("private", address.is_private)):
        if refused:
            return kind
    return None if address.is_global else "not public"


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _vetted(host: str, port: int, allowed, deadline: float) -> list[str]:
    """The host's addresses, after the name lookup, if every one is public (or in `allowed`): the connection
    then goes to these, so a name that resolves differently a moment later (DNS rebinding) changes nothing."""
    addresses = _resolve(host, port, deadline)
    for address in addresses:
        kind = _refusal(address)
        if kind and not any(address in network for network in allowed):
            raise FetchFailed(f"refused: the address is {kind}", f"{address} (the host {host!r})")
    return [str(address) for address in addresses]


def _resolve(host: str, port: int, deadline: float) -> list:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    # getaddrinfo takes no timeout: it runs in a thread of its own, and the fetch stops waiting at the deadline
    result: dict = {}

    def lookup():
        try:
            result["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except Exception as exc:  # noqa: BLE001  reported below
            result["error"] = exc

    thread = threading.Thread(target=lookup, name="vlmkit-resolve", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    if thread.is_alive():
        raise FetchFailed("timed out", f"resolving {host!r}")
    if "error" in result or not result.get("infos"):
        raise FetchFailed("the host name does not resolve", f"{host!r}: {result.get('error')}")
    addresses = []
    for info in result["infos"]:
        address = ipaddress.ip_address(info[4][0])
        if address not in addresses:
            addresses.append(address)
    return addresses


def _time_left(sock: socket.socket, deadline: float) -> None:
    """Let the socket's next operation wait only until the fetch's deadline."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the fetch's deadline passed")
    sock.settimeout(left)


class _DeadlineReader(io.RawIOBase):
    """The response's bytes, each read waiting only until the deadline: a server trickling a byte a second
    would never trip a per-read timeout, and is cut off all the same."""

    def __init__(self, sock: socket.socket, deadline: float):
        super().__init__()
        self._sock, self._raw, self._deadline = sock, sock.makefile("rb", buffering=0), deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        _time_left(self._sock, self._deadline)
        return self._raw.readinto(buffer)

    def close(self) -> None:
        self._raw.close()  # lets the socket close (the connection hands it to the response)
        super().close()


class _ReaderSocket:
    """All HTTPResponse takes from its socket is a file to read."""

    def __init__(self, sock: socket.socket, deadline: float):
        self._sock, self._deadline = sock, deadline

    def makefile(self, mode: str):
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline))


def _response(sock, *args, deadline: float, **kwargs) -> http.client.HTTPResponse:
    return http.client.HTTPResponse(_ReaderSocket(sock, deadline), *args, **kwargs)


class _Connection(http.client.HTTPConnection):
    """An HTTP connection to addresses already vetted, not to what the host name resolves to by now (the Host
    header and TLS's server name are still the URL's host), every step within the fetch's deadline."""

    def __init__(self, host: str, port: int, addresses: list[str], deadline: float):
        super().__init__(host, port)
        self._addresses, self._deadline = addresses, deadline
        self.response_class = functools.partial(_response, deadline=deadline)

    def connect(self) -> None:
        error: OSError = OSError("no address to connect to")
        for address in self._addresses:
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the fetch's deadline passed")
            try:
                self.sock = socket.create_connection((address, self.port), timeout=left)
                break
            except OSError as exc:
                error = exc
        else:
            raise error
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, data) -> None:
        if self.sock is not None:
            _time_left(self.sock, self._deadline)  # sendall's timeout is for the whole call
        super().send(data)


class _TLSConnection(_Connection):
    default_port = 443
    _context = None

    def connect(self) -> None:
        super().connect()
        if _TLSConnection._context is None:
            _TLSConnection._context = ssl.create_default_context()
        _time_left(self.sock, self._deadline)  # the handshake's timeout is for the whole handshake
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.host)
