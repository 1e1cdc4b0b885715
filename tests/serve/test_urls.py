"""Image URLs on a shared host (--allow-image-urls): only public addresses, checked after the name lookup and
on every redirect; a byte cap and one deadline for the whole fetch; errors that tell the client only why; and
requests still being read or fetched count against --max-queue. The image hosts are stdlib servers on
127.0.0.1, which the tests allow with `image_url_allow_networks` (the default refuses them)."""
from __future__ import annotations

import http.server
import io
import logging
import socket
import ssl
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from live import LiveServer, free_port, image_message
from PIL import Image

from vlmkit.serve import fetch as fetch_module
from vlmkit.serve.fetch import fetch_image
from vlmkit.serve.protocol import ApiError, ImageRef, ServeSettings, parse_chat_request

PARAM = "messages[0].content[0].image_url.url"
LOCAL = ("127.0.0.1/32",)  # the tests' image hosts; 127.0.0.2 and the rest of 127/8 stay refused


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (255, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()


class Host:
    """A stdlib web server in a thread: `routes` maps a path to a function answering with the handler (routes
    that need the port are added once it is known). `hits` lists (path, Host header) of every request."""

    def __init__(self, routes: dict | None = None, address: str = "127.0.0.1", tls: ssl.SSLContext | None = None):
        self.routes = dict(routes or {})
        self.hits: list[tuple[str, str]] = []
        self.stop = threading.Event()  # ends the handlers that trickle or wait
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                host.hits.append((self.path, self.headers.get("Host")))
                route = host.routes.get(self.path)
                try:
                    route(self) if route else self.send_error(404)
                except OSError:
                    pass  # the fetcher hung up (its deadline, its byte cap)

            def log_message(self, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass

        self.httpd = Server((address, 0), Handler)
        self.httpd.stop = self.stop
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.address, self.port = address, self.httpd.server_address[1]

    def url(self, path: str, scheme: str = "http", host: str | None = None) -> str:
        return f"{scheme}://{host or self.address}:{self.port}{path}"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def send_png(handler, data: bytes = PNG, length: bool = True):
    handler.send_response(200)
    handler.send_header("Content-Type", "image/png")
    if length:
        handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def redirect(to: str, status: int = 302, delay: float = 0.0):
    def route(handler):
        time.sleep(delay)
        handler.send_response(status)
        handler.send_header("Location", to)
        handler.send_header("Content-Length", "0")
        handler.end_headers()
    return route


def fetch(url: str, **settings) -> bytes:
    settings = {"allow_image_urls": True, "image_url_allow_networks": LOCAL, "image_url_timeout": 5.0, **settings}
    return fetch_image(ImageRef(PARAM, url=url), ServeSettings(**settings))


def refusal(url: str, **settings) -> ApiError:
    with pytest.raises(ApiError) as caught:
        fetch(url, **settings)
    assert caught.value.status == 400 and caught.value.param == PARAM
    return caught.value


def message(reason: str) -> str:
    return f"{PARAM}: could not fetch the image ({reason})"


@pytest.fixture
def connections(monkeypatch):
    """Every (address, port) a socket connected to during the test."""
    made, real = [], socket.create_connection

    def spy(address, *args, **kwargs):
        made.append(address[:2])
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", spy)
    return made


class FakeDNS(dict):
    """Names the test makes up: name -> addresses, or a function giving them; `calls` counts the look-ups."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []


@pytest.fixture
def dns(monkeypatch):
    fake, real = FakeDNS(), socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in fake:
            return real(host, port, *args, **kwargs)
        fake.calls.append(host)
        answer = fake[host]
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (a, port, 0, 0)) if ":" in a
                else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in (answer() if callable(answer) else answer)]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return fake


def _ask(live, url: str):
    body = {"messages": [image_message("what is it?", url)], "max_tokens": 2}
    response = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=30)
    return response.status_code, response.json()


def _pending(live) -> int:
    return httpx.get(live.url + "/health", timeout=10).json()["pending"]


def _until_pending(live, count: int, limit: float = 10.0) -> int:
    deadline = time.time() + limit
    while (pending := _pending(live)) != count and time.time() < deadline:
        time.sleep(0.02)
    return pending


@pytest.fixture(scope="module")
def strict(served_model):
    """A server as a shared host runs it: image URLs allowed, every non-public address refused."""
    settings = ServeSettings(max_tokens=2, allow_image_urls=True)
    with LiveServer(create_app_for(served_model, settings)) as live:
        yield live


@pytest.fixture(scope="module")
def trusting(served_model):
    """A server that may fetch from 127.0.0.1 (the tests' image hosts) and nothing else that is not public."""
    settings = ServeSettings(max_tokens=2, allow_image_urls=True, image_url_allow_networks=LOCAL,
                             image_url_timeout=2.0)
    with LiveServer(create_app_for(served_model, settings)) as live:
        yield live


def create_app_for(model, settings):
    from vlmkit.serve import create_app

    return create_app(model, "tiny-test", settings)


# -- which addresses ---------------------------------------------------------------------------------------------

def test_the_default_refuses_local_and_private_addresses_without_connecting(strict, connections):
    with Host({"/x.png": send_png}) as trap:
        port = trap.port
        cases = {
            f"http://127.0.0.1:{port}/x.png": "loopback",
            f"http://localhost:{port}/x.png": "loopback",
            f"http://2130706433:{port}/x.png": "loopback",     # 127.0.0.1 as one number: judged once resolved
            f"http://0x7f.1:{port}/x.png": "loopback",
            f"http://[::1]:{port}/x.png": "loopback",
            f"http://[::ffff:127.0.0.1]:{port}/x.png": "loopback",
            f"http://0.0.0.0:{port}/x.png": "unspecified",     # reaches this host's own services on Linux
            "http://10.1.2.3/x.png": "private",
            "http://192.168.0.1/x.png": "private",
            "https://172.16.5.4/x.png": "private",
            "http://[fd00::1]/x.png": "private",
            "http://169.254.169.254/latest/meta-data/": "link-local",   # the cloud metadata service
            "http://[fe80::1]/x.png": "link-local",
            "http://224.0.0.1/x.png": "multicast",
            "http://240.0.0.1/x.png": "reserved",
            "http://100.64.0.1/x.png": "not public",           # carrier-grade NAT
        }
        for url, kind in cases.items():
            started = time.monotonic()
            status, body = _ask(strict, url)
            assert status == 400, (url, body)
            assert body["error"]["message"] == message(f"refused: the address is {kind}"), url
            assert (body["error"]["param"], body["error"]["code"]) == (PARAM, "image_fetch_failed")
            assert time.monotonic() - started < 2, url  # refused at once, not after trying to connect
    assert trap.hits == []
    fetched = {port for _, port in connections} - {strict.port}
    assert fetched == set(), f"connections were made to {fetched}"
    assert _pending(strict) == 0


def test_every_address_of_a_name_is_checked(dns, connections):
    with Host({"/x.png": send_png}) as host:
        dns["mixed.test"] = ["127.0.0.1", "10.0.0.5"]  # one allowed, one not: refused
        assert refusal(host.url("/x.png", host="mixed.test")).message == message("refused: the address is private")
        dns["public.test"] = ["8.8.8.8", "169.254.169.254"]
        assert refusal(host.url("/x.png", host="public.test")).message == \
            message("refused: the address is link-local")
        assert host.hits == [] and connections == []
        assert refusal("http://no-such-host.invalid/x.png").message == message("the host name does not resolve")


def test_the_connection_goes_to_the_checked_address_not_a_second_lookup(dns):
    """DNS rebinding: the name answers 127.0.0.1 (allowed) when checked, then 10.0.0.1; the fetch never asks
    again, connects to the address it checked, and still names the host in its Host header."""
    answers = iter([["127.0.0.1"]] + [["10.0.0.1"]] * 10)
    dns["images.test"] = lambda: next(answers)
    with Host({"/red.png": send_png}) as host:
        assert fetch(host.url("/red.png", host="images.test")) == PNG
    assert dns.calls == ["images.test"]
    assert host.hits == [("/red.png", f"images.test:{host.port}")]


# -- redirects ---------------------------------------------------------------------------------------------------

def test_redirects_are_followed_five_times(connections):
    with Host({"/0": send_png}) as host:
        for i in range(1, 7):  # /6 -> /5 -> ... -> /0: relative and absolute locations, every redirect status
            host.routes[f"/{i}"] = redirect(f"/{i - 1}" if i % 2 else host.url(f"/{i - 1}"),
                                            (301, 302, 303, 307, 308)[i % 5])
        assert fetch(host.url("/5")) == PNG
        assert [path for path, _ in host.hits] == ["/5", "/4", "/3", "/2", "/1", "/0"]
        host.hits.clear()
        assert refusal(host.url("/6")).message == message("too many redirects (more than 5)")
        assert [path for path, _ in host.hits] == ["/6", "/5", "/4", "/3", "/2", "/1"]  # the sixth is not followed
    assert {address for address, _ in connections} == {"127.0.0.1"}


def test_a_redirect_to_a_refused_address_or_scheme_is_refused_without_connecting(trusting, connections):
    try:
        trap = Host({"/x.png": send_png}, address="127.0.0.2")  # loopback, but not the allowed 127.0.0.1
    except OSError:
        pytest.skip("cannot listen on 127.0.0.2")
    expected = {"/metadata": "refused: the address is link-local",
                "/other-loopback": "refused: the address is loopback",
                "/file": "refused: only http and https URLs are fetched",
                "/gopher": "refused: only http and https URLs are fetched",
                "/nowhere": "HTTP 302 without a Location"}
    with trap, Host() as host:
        host.routes.update({"/metadata": redirect("http://169.254.169.254/latest/meta-data/iam/"),
                            "/other-loopback": redirect(trap.url("/x.png")),
                            "/file": redirect("file:///etc/passwd"),
                            "/gopher": redirect(f"gopher://127.0.0.1:{host.port}/x"),
                            "/nowhere": redirect("")})
        for path, reason in expected.items():
            status, body = _ask(trusting, host.url(path))
            assert (status, body["error"]["message"]) == (400, message(reason)), path
    assert [path for path, _ in host.hits] == list(expected)  # the allowed host was asked, once each
    assert trap.hits == []
    assert {address for address, _ in connections} == {"127.0.0.1"}  # the host and the server, nothing else


# -- size and time -----------------------------------------------------------------------------------------------

def test_the_byte_cap_holds_whatever_the_framing(connections):
    big = b"x" * 50_000

    def chunked(handler):
        handler.wfile.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(50):
            handler.wfile.write(b"3e8\r\n" + b"x" * 1000 + b"\r\n")
        handler.wfile.write(b"0\r\n\r\n")

    routes = {"/declared": lambda h: send_png(h, big), "/undeclared": lambda h: send_png(h, big, length=False),
              "/chunked": chunked, "/exact": lambda h: send_png(h, big[:10_000])}
    with Host(routes) as host:
        for path in ("/declared", "/undeclared", "/chunked"):
            error = refusal(host.url(path), max_body_bytes=10_000)
            assert error.message == message("too large: more than 10,000 bytes, the server's --max-body-bytes"), path
            assert error.code == "image_too_large"
        assert fetch(host.url("/exact"), max_body_bytes=10_000) == big[:10_000]


def _trickle(data: bytes, every: float = 0.05):
    def route(handler):
        for i in range(len(data)):
            if handler.server.stop.is_set():
                return
            handler.wfile.write(data[i:i + 1])
            time.sleep(every)
    return route


def test_one_deadline_for_the_whole_fetch(dns):
    """A byte every 50 ms never trips a per-read timeout; the fetch's total of 0.5 s cuts it off all the same,
    in the headers, in the body, across redirects, in the name lookup."""
    answered = threading.Event()
    dns["slow.test"] = lambda: answered.wait(10) and ["127.0.0.1"]
    with Host() as host:
        host.routes.update({
            "/slow-headers": _trickle(b"HTTP/1.0 200 OK\r\nX-Padding: " + b"y" * 1000 + b"\r\n\r\n"),
            "/slow-body": lambda h: (h.send_response(200), h.send_header("Content-Length", "1000"), h.end_headers(),
                                     _trickle(b"z" * 1000)(h)),
            "/silent": lambda h: host.stop.wait(10),
            "/hop": redirect("/hop", delay=0.15)})  # each hop in time, five of them not
        try:
            for url in (host.url("/slow-headers"), host.url("/slow-body"), host.url("/silent"), host.url("/hop"),
                        host.url("/x.png", host="slow.test")):
                started = time.monotonic()
                assert refusal(url, image_url_timeout=0.5).message == message("timed out"), url
                took = time.monotonic() - started
                assert 0.45 <= took < 1.5, (url, took)
        finally:
            answered.set()


# -- what the client is told -------------------------------------------------------------------------------------

def test_errors_say_why_and_nothing_of_the_internals(trusting, caplog):
    def garbage(handler):
        handler.wfile.write(b"SSH-2.0-OpenSSH_9.6 \x00\x01 not http at all\r\n\r\n")

    closed = free_port()  # nothing listens there
    caplog.set_level(logging.WARNING, logger="vlmkit.serve")
    with Host({"/garbage": garbage, "/red.png": send_png}) as host:
        status, body = _ask(trusting, host.url("/red.png"))
        assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length")
        cases = {host.url("/gone.png"): "HTTP 404",
                 f"http://127.0.0.1:{closed}/x.png": "connection refused",
                 host.url("/garbage"): "not a valid HTTP response",
                 f"https://127.0.0.1:{host.port}/x.png": "TLS failed"}  # a plain-HTTP server spoken to in TLS
        for url, reason in cases.items():
            status, body = _ask(trusting, url)
            assert (status, body["error"]["message"]) == (400, message(reason)), url
            assert body["error"]["code"] == "image_fetch_failed"
    # the details are in the server's log, for its operator
    assert "ConnectionRefusedError" in caplog.text and "BadStatusLine" in caplog.text and "SSL" in caplog.text
    assert f"127.0.0.1:{closed}" in caplog.text
    assert _pending(trusting) == 0  # the failed requests gave their places back


def _self_signed(tmp_path, name: str):
    try:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem"),
                        "-days", "1", "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}"],
                       check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("no openssl to make a certificate")
    return tmp_path / "cert.pem", tmp_path / "key.pem"


def test_https_sends_the_host_name_and_checks_the_certificate(tmp_path, dns, monkeypatch):
    cert, key = _self_signed(tmp_path, "images.test")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    names = []
    server.sni_callback = lambda sock, name, context: names.append(name)
    dns["images.test"] = ["127.0.0.1"]
    with Host({"/red.png": send_png}, tls=server) as host:
        url = host.url("/red.png", scheme="https", host="images.test")
        assert refusal(url).message == message("the TLS certificate is not valid")  # not one the system trusts
        monkeypatch.setattr(fetch_module._TLSConnection, "_context", ssl.create_default_context(cafile=str(cert)))
        assert fetch(url) == PNG
    assert names == ["images.test", "images.test"]  # SNI is the URL's host, though the connection went to an IP
    assert host.hits == [("/red.png", f"images.test:{host.port}")]


def test_urls_without_a_host_are_refused_when_parsed():
    settings = ServeSettings(allow_image_urls=True)
    for url in ("http:///x.png", "https://", "http://example.com:99999/x.png", "http://example.com:port/x.png"):
        with pytest.raises(ApiError) as caught:
            parse_chat_request({"messages": [image_message("?", url)]}, settings, "m")
        assert (caught.value.param, caught.value.code) == (PARAM, "invalid_image_url"), url
    assert ServeSettings(image_url_allow_networks=["10.0.0.0/8", "::1"]).image_url_allow_networks[1].num_addresses == 1
    with pytest.raises(ValueError):
        ServeSettings(image_url_allow_networks=("not a network",))


# -- the queue ---------------------------------------------------------------------------------------------------

def test_a_request_fetching_its_image_holds_its_place_in_the_queue(served_model):
    """--max-queue 1: while one request waits for its image, a second is refused (before, it went through,
    since only prepared requests counted); then the place is free again."""
    arrived, release = threading.Event(), threading.Event()

    def slow(handler):
        arrived.set()
        release.wait(10)
        send_png(handler)

    settings = ServeSettings(max_tokens=2, max_queue=1, allow_image_urls=True, image_url_allow_networks=LOCAL)
    hello = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with Host({"/slow.png": slow}) as host, LiveServer(create_app_for(served_model, settings)) as live, \
            httpx.Client(base_url=live.url, timeout=30) as http, ThreadPoolExecutor(1) as pool:
        try:
            first = pool.submit(http.post, "/v1/chat/completions",
                                json={"messages": [image_message("what?", host.url("/slow.png"))], "max_tokens": 2})
            assert arrived.wait(10)
            assert _pending(live) == 1
            second = http.post("/v1/chat/completions", json=hello)
            assert second.status_code == 429 and second.json()["error"]["code"] == "queue_full"
        finally:
            release.set()
        assert first.result().status_code == 200
        assert _until_pending(live, 0) == 0
        assert http.post("/v1/chat/completions", json=hello).status_code == 200


def test_a_request_still_uploading_holds_its_place_in_the_queue(served_model, caplog):
    caplog.set_level(logging.WARNING, logger="vlmkit.serve")
    settings = ServeSettings(max_tokens=2, max_queue=1)
    hello = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with LiveServer(create_app_for(served_model, settings)) as live:
        upload = socket.create_connection(("127.0.0.1", live.port), timeout=10)
        try:
            upload.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 10000\r\n\r\n{\"messages\": [")  # and the rest never comes
            assert _until_pending(live, 1) == 1
            refused = httpx.post(live.url + "/v1/chat/completions", json=hello, timeout=30)
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
        finally:
            upload.close()  # the client gives up: its place is given back
        assert _until_pending(live, 0) == 0
        assert httpx.post(live.url + "/v1/chat/completions", json=hello, timeout=30).status_code == 200
    assert "unexpected error" not in caplog.text  # a client that leaves is no server error
