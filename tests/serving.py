"""Helpers for the server's tests: a server on a free loopback port, the official openai client
for it, and raw HTTP for what the client hides (status lines, headers, malformed requests)."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import openai

from domainlm.serve.server import APIServer, make_server


@contextlib.contextmanager
def running(engine, **kw: Any) -> Iterator[APIServer]:
    server = make_server(engine, **kw)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def client(server: APIServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1",
                         api_key="x", max_retries=0, timeout=120)


def request(server: APIServer, method: str, path: str, body: Any = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    """(status, headers, body parsed as JSON when it is JSON, else text)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=120)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    try:
        conn.request(method, path, body=data, headers={"Content-Type": "application/json",
                                                       **(headers or {})})
        r = conn.getresponse()
        raw = r.read()
        kind = r.getheader("Content-Type") or ""
        parsed = json.loads(raw) if raw and kind.startswith("application/json") else raw.decode()
        return r.status, dict(r.getheaders()), parsed
    finally:
        conn.close()


def raw_exchange(server: APIServer, data: bytes) -> bytes:
    """Send bytes as they are; everything the server answers until it closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=30) as s:
        s.sendall(data)
        s.settimeout(3)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except TimeoutError:
            pass
        return out


def json_body(response: bytes) -> tuple[int, dict]:
    """Status and JSON body of one raw HTTP response."""
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    return status, json.loads(body[:length])
