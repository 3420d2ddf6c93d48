"""`braze serve` against slow and hostile clients: read timeouts for headers and bodies, a
concurrency limit, and the Host-header check (DNS rebinding). One server with a short
--read-timeout, talked to through raw sockets (a slowloris sends what no HTTP library will).
The bounds on waiting are hang guards, generous multiples of the timeout.
"""

from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest

pytest.importorskip("openai")

from braze.serving.hosts import host_name, hosts_to_answer  # noqa: E402
from serve_helpers import Server  # noqa: E402

READ_TIMEOUT = 2.0
GUARD = 30.0          # seconds a test waits for what should happen after READ_TIMEOUT


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    s = Server(store.artifact("llama"), tmp_path_factory.mktemp("guards"),
               "--read-timeout", str(READ_TIMEOUT), "--limit-concurrency", "4",
               "--allowed-hosts", "api.example.com,*.corp.example")
    try:
        yield s
    finally:
        s.stop()


def _connect(server) -> socket.socket:
    u = urlsplit(server.url)
    sock = socket.create_connection((u.hostname, u.port), timeout=GUARD)
    return sock


def _read_until_closed(sock) -> bytes:
    """Everything the server sends until it closes the connection (socket timeout: GUARD)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _healthy(server) -> bool:
    return httpx.get(server.url + "/health", timeout=GUARD).status_code == 200


def test_trickled_headers_are_disconnected_while_others_are_served(server):
    sock = _connect(server)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    start = time.monotonic()
    closed = False
    while time.monotonic() - start < GUARD:
        try:
            sock.sendall(b"X-Slow: 1\r\n")     # a header line every half second, never the end
        except OSError:                        # reset: the server closed it
            closed = True
            break
        assert _healthy(server)                # everyone else is still answered
        sock.settimeout(0.5)
        try:
            if sock.recv(1024) == b"":
                closed = True
                break
        except socket.timeout:
            pass
    assert closed, "the slow client was never disconnected"
    assert "no complete request headers" in server.stderr()


def test_a_silent_connection_is_closed(server):
    sock = _connect(server)
    assert _read_until_closed(sock) == b""


def test_trickled_body_gets_408_and_is_disconnected(server):
    sock = _connect(server)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\"")
    reply = _read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b'"code":"request_timeout"' in reply.replace(b" ", b"") and b"x-request-id" in reply
    assert _healthy(server)


def test_concurrency_limit_answers_503(server):
    """Past --limit-concurrency uvicorn answered a bare text/plain "Service Unavailable"
    without X-Request-Id (so a gateway could not tie it to its request): it is an
    OpenAI-shaped 503 naming the flag, with the client's X-Request-Id (or a fresh one)."""
    idle = [_connect(server) for _ in range(3)]       # with this request: 4 connections
    try:
        r = httpx.get(server.url + "/health", timeout=GUARD, headers={"X-Request-Id": "over-1"})
        assert r.status_code == 503
        assert r.headers.get("x-request-id") == "over-1"
        err = r.json()["error"]
        assert err["type"] == "service_unavailable" and "--limit-concurrency" in err["message"]
        r = httpx.get(server.url + "/health", timeout=GUARD)
        assert r.status_code == 503 and r.headers.get("x-request-id")
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + GUARD
    while not _healthy(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _healthy(server)


@pytest.mark.parametrize("host, status", [
    ("127.0.0.1:8000", 200), ("localhost", 200), ("LOCALHOST.:1", 200), ("[::1]:8000", 200),
    ("127.1.2.3", 200), ("api.example.com", 200), ("x.corp.example", 200),
    ("attacker.example:8000", 400), ("localhost.attacker.example", 400), ("corp.example", 400),
    ("example.com", 400), ("[::2]", 400),
])
def test_host_header_check(server, host, status):
    r = httpx.get(server.url + "/v1/models", headers={"Host": host}, timeout=GUARD)
    assert r.status_code == status, r.text
    if status == 400:
        err = r.json()["error"]
        assert err["code"] == "host_not_allowed" and "--allowed-hosts" in err["message"]
        assert host.split(":")[0] in err["message"] or host in err["message"]
        assert r.headers.get("x-request-id")


@pytest.mark.parametrize("bind, option, want", [
    ("127.0.0.1", None, ["localhost"]),
    ("::1", "a.example", ["localhost", "a.example"]),
    ("localhost", "*", None),
    ("0.0.0.0", None, None),
    ("0.0.0.0", "A.Example, *.b.example", ["a.example", "*.b.example"]),
])
def test_hosts_to_answer(bind, option, want):
    assert hosts_to_answer(bind, option) == want


@pytest.mark.parametrize("header, name", [
    ("Example.COM:8000", "example.com"), ("[::1]:80", "::1"), ("[::1]", "::1"),
    ("host.", "host"), ("::1", "::1"), ("10.0.0.1", "10.0.0.1"),
])
def test_host_name(header, name):
    assert host_name(header) == name
