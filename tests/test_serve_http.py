"""The server's HTTP layer: every client error is a 4xx JSON body in OpenAI's shape (wrong
methods, malformed request lines, bodies that are too large, too deep, not UTF-8 or not JSON,
numbers JSON cannot hold); idle connections cost no thread and are closed after the idle
timeout; pipelined requests on one connection are all answered."""

from __future__ import annotations

import select
import socket
import threading
import time

import pytest
from serving import client, json_body, raw_exchange, request, running
from test_generate import make_models

from domainlm.serve import Engine


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    folder, _ = make_models(tmp_path_factory.mktemp("serve-http"))
    return Engine(folder, name="base")


@pytest.fixture(scope="module")
def server(engine):
    with running(engine) as s:
        yield s


def is_openai_error(body) -> bool:
    return isinstance(body, dict) and set(body.get("error", {})) == {
        "message", "type", "param", "code"}


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS"])
def test_wrong_methods_are_405_json(server, method):
    for path, allowed in (("/v1/completions", "POST"), ("/v1/models", "GET")):
        status, headers, body = request(server, method, path, b"{}")
        assert status == 405 and headers["Allow"] == allowed and is_openai_error(body)
    status, _, body = request(server, method, "/nowhere", b"{}")
    assert status == 404 and is_openai_error(body)


def test_head_has_the_headers_of_get_and_no_body(server):
    status, headers, body = request(server, "HEAD", "/health")
    assert status == 200 and body == "" and int(headers["Content-Length"]) > 0


@pytest.mark.parametrize("data, status", [
    (b"[" * 100_000 + b"]" * 100_000, 400),  # deeper than Python's recursion limit
    (b'{"model": "base", "prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}", 400),
    (b'{"model": "base", "prompt": "\xff\xfe"}', 400),  # not UTF-8
    (b'{"model": "base", "prompt": "\\ud800"}', 400),  # a lone surrogate
    (b'{"model": "base", "prompt": "x", "temperature": NaN}', 400),
    (b'{"model": "base", "prompt": "x", "seed": 18446744073709551616}', 400),  # 2**64
    (b'{"model": "base", "prompt": "x", "max_tokens": 1e400}', 400),
    (b'{"model": "base", "prompt": "x"', 400),
    (b"", 400),
])
def test_malformed_bodies_are_400_json_and_the_server_keeps_serving(server, data, status):
    got, _, body = request(server, "POST", "/v1/completions", data)
    assert got == status and is_openai_error(body), body
    assert client(server).models.list().data[0].id == "base"


def test_oversized_chunked_and_garbage_requests_get_json(server):
    port_request = ("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                    "application/json\r\nContent-Length: {}\r\n\r\n")
    status, body = json_body(raw_exchange(server, port_request.format(17 * 2**20).encode()))
    assert status == 413 and is_openai_error(body)
    chunked = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n0\r\n\r\n")
    status, body = json_body(raw_exchange(server, chunked))
    assert status == 411 and is_openai_error(body)
    for garbage in (b"NONSENSE\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"BREW /pot HTTP/1.1\r\n\r\n",
                    b"GET /health HTTP/1.1\r\n" + b"X-Long: " + b"a" * 70_000 + b"\r\n\r\n"):
        status, body = json_body(raw_exchange(server, garbage))
        assert 400 <= status < 600 and is_openai_error(body), garbage[:20]
    assert request(server, "GET", "/health")[0] == 200


def test_pipelined_requests_on_one_connection_are_all_answered(server):
    one = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    out = raw_exchange(server, one * 3 + b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"
                       b"Connection: close\r\n\r\n")
    assert out.count(b"HTTP/1.1 200") == 4 and b'"object": "list"' in out


def closed(sock: socket.socket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_idle_connections_cost_no_thread_and_time_out(engine):
    before = threading.active_count()
    with running(engine, idle_timeout=1.0, workers=4) as server:
        port = server.server_address[1]
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(300)]
        deadline = time.monotonic() + 60
        while server.connections[0] < 300 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.connections == (300, 300)
        # The serving loop, at most the pool's 4 workers and the decoding thread: not 300.
        assert threading.active_count() - before <= 1 + 4 + 1
        r = client(server).completions.create(model="base", prompt="x", max_tokens=3)
        assert r.choices[0].text is not None
        assert threading.active_count() - before <= 1 + 4 + 1
        # Each idle connection is closed by the server once it has waited for the timeout.
        deadline = time.monotonic() + 60
        while not all(closed(s) for s in idle) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(closed(s) for s in idle)
        assert server.connections[0] == 0
        for s in idle:
            s.close()


def test_beyond_max_connections_the_longest_idle_is_closed(engine):
    with running(engine, max_connections=8) as server:
        port = server.server_address[1]
        socks = []
        for _ in range(12):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            time.sleep(0.02)
        deadline = time.monotonic() + 30
        while sum(closed(s) for s in socks[:4]) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(closed(s) for s in socks[:4]) and not any(closed(s) for s in socks[4:])
        assert server.connections[0] == 8
        for s in socks:
            s.close()


def test_a_client_that_leaves_mid_stream_frees_its_rows_and_threads(server, engine):
    body = (b'{"model": "base", "prompt": "The ledger", "max_tokens": 50, "n": 3, '
            b'"stream": true, "ignore_eos": true}')
    api = client(server)
    list(api.completions.create(model="base", prompt="x", max_tokens=2, n=3, stream=True))
    before = threading.active_count()  # the serving loop, a worker, the decoding thread
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                  b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
    deadline = time.monotonic() + 60
    stats = engine.scheduler.stats
    while (stats.running or threading.active_count() > before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stats.running == 0 and threading.active_count() <= before
    assert len(api.completions.create(model="base", prompt="x", max_tokens=3, n=2).choices) == 2
