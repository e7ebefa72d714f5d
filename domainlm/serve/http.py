"""An HTTP/1.1 server whose idle connections cost no thread: a selector holds every open
connection, a fixed pool of worker threads serves the requests that arrive on them, and a
connection idle for longer than idle_timeout is closed.

The standard library's ThreadingHTTPServer gives each connection a thread for its whole life,
so idle keep-alive connections (350 of them held 355 threads) cost a thread each and nothing
ever closed them. Here the threads are the pool's (at most `workers`) plus this loop's, however
many sockets are open; request parsing is still BaseHTTPRequestHandler's.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from typing import Any

WORKERS = 64  # requests served at once (each generation holds one worker while it runs)
IDLE_TIMEOUT = 30.0  # seconds a keep-alive connection may wait for its next request
REQUEST_TIMEOUT = 60.0  # seconds a client may take to send a request, or to read a response
MAX_CONNECTIONS = 1024  # open connections; beyond it the longest-idle one is closed


class ConnectionHandler(BaseHTTPRequestHandler):
    """BaseHTTPRequestHandler for a connection that outlives one call: set up once, then
    `handle_one_request` each time the connection has a request."""

    server: Any

    def __init__(self, request: socket.socket, client_address: Any, server: Any) -> None:
        # Unlike BaseRequestHandler.__init__, do not handle (and close) the connection here.
        self.request, self.client_address, self.server = request, client_address, server
        self.close_connection = False
        self.setup()

    def pending(self) -> bool:
        """Whether the next request is already buffered (a pipelining client): the selector
        would not see those bytes, they were read off the socket."""
        try:
            self.connection.setblocking(False)
            return bool(self.rfile.peek(1))
        except (OSError, ValueError):
            return False
        finally:
            try:
                self.connection.settimeout(self.server.request_timeout)
            except OSError:
                pass

    def close(self) -> None:
        try:
            self.finish()
        except OSError:
            pass
        try:
            self.connection.close()
        except OSError:
            pass


class HTTPServer:
    """Serves `handler` (a ConnectionHandler subclass) on address; port 0 picks a free port
    (server_address says which). serve_forever() in one thread, shutdown() from another."""

    def __init__(self, address: tuple[str, int], handler: type[ConnectionHandler], *,
                 workers: int = WORKERS, idle_timeout: float = IDLE_TIMEOUT,
                 request_timeout: float = REQUEST_TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.handler, self.workers = handler, workers
        self.idle_timeout, self.request_timeout = idle_timeout, request_timeout
        self.max_connections = max_connections
        self.socket = socket.create_server(address, backlog=256)
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.socket, selectors.EVENT_READ, "accept")
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._idle: dict[socket.socket, tuple[ConnectionHandler, float]] = {}
        self._returned: deque[ConnectionHandler] = deque()
        self._busy = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="domainlm-http")
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()

    @property
    def connections(self) -> tuple[int, int]:
        """(open connections, of which idle)."""
        idle = len(self._idle)
        return idle + self._busy, idle

    def serve_forever(self) -> None:
        self._stopped.clear()
        try:
            while not self._stop.is_set():
                tick = min(1.0, max(self.idle_timeout / 4, 0.01))
                for key, _ in self._selector.select(timeout=tick):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        self._rearm()
                    else:
                        self._dispatch(key.fileobj)
                self._expire()
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop serve_forever (from another thread) and wait until it has returned."""
        self._stop.set()
        self._wake()
        self._stopped.wait()

    def server_close(self) -> None:
        for handler, _ in list(self._idle.values()):
            handler.close()
        self._idle.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
        for s in (self.socket, self._wake_r, self._wake_w):
            s.close()
        self._selector.close()

    # ------------------------------------------------------------------ the selector thread

    def _accept(self) -> None:
        while True:
            try:
                sock, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if self.connections[0] >= self.max_connections and not self._close_oldest():
                sock.close()  # every connection is busy: the client may retry
                continue
            sock.setblocking(True)
            sock.settimeout(self.request_timeout)
            self._park(self.handler(sock, address, self))

    def _park(self, handler: ConnectionHandler) -> None:
        try:
            self._selector.register(handler.connection, selectors.EVENT_READ, handler)
        except (ValueError, OSError):  # closed meanwhile
            handler.close()
            return
        self._idle[handler.connection] = (handler, time.monotonic())

    def _dispatch(self, conn: Any) -> None:
        handler, _ = self._idle.pop(conn)
        self._selector.unregister(conn)
        with self._lock:
            self._busy += 1
        self._pool.submit(self._serve, handler)

    def _rearm(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        while self._returned:
            self._park(self._returned.popleft())

    def _expire(self) -> None:
        now = time.monotonic()
        for conn, (handler, since) in list(self._idle.items()):
            if now - since > self.idle_timeout:
                self._drop(conn, handler)

    def _close_oldest(self) -> bool:
        if not self._idle:
            return False
        conn = min(self._idle, key=lambda c: self._idle[c][1])
        self._drop(conn, self._idle[conn][0])
        return True

    def _drop(self, conn: Any, handler: ConnectionHandler) -> None:
        del self._idle[conn]
        self._selector.unregister(conn)
        handler.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    # ------------------------------------------------------------------ the worker threads

    def _serve(self, handler: ConnectionHandler) -> None:
        try:
            handler.handle_one_request()
            while not handler.close_connection and handler.pending():
                handler.handle_one_request()
        except Exception:  # noqa: BLE001 - a broken connection: close it, keep serving
            handler.close_connection = True
        with self._lock:
            self._busy -= 1
        if handler.close_connection or self._stop.is_set():
            handler.close()
        else:
            self._returned.append(handler)
            self._wake()
