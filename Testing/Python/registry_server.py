"""A small local HTTP file server for the registry tests, with controllable misbehaviour.

Each served path has a behaviour:
  "ok"         200 / 206 with Range support
  "drop:N"     the first request sends headers for the whole file, then N bytes, then closes;
               later requests behave like "ok" (so a resume can finish)
  "404"        404 Not Found
  "stall"      sends headers and the first 1 kB, then goes silent (until the server stops)
  "slow:S"     like "ok" but sleeps S seconds between 16 kB chunks (to overlap two clients)
Every request is recorded as (path, Range header or None) so tests can assert on resumes.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple


class _Handler(BaseHTTPRequestHandler):
    server: "FileServer._Server"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        state = self.server.state
        path = self.path
        range_header = self.headers.get("Range")
        with state.lock:
            state.requests.append((path, range_header))
            count = sum(1 for p, _ in state.requests if p == path)
        behaviour = state.behaviours.get(path, "ok")
        data = state.files.get(path)
        if data is None or behaviour == "404":
            self.send_error(404, "Not Found")
            return
        if behaviour.startswith("drop:") and count == 1:
            cut = int(behaviour.split(":", 1)[1])
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        start = 0
        match = re.match(r"bytes=(\d+)-$", range_header or "")
        if match:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if behaviour == "stall":
            self.wfile.write(body[:1024])
            self.wfile.flush()
            state.stop.wait(30)
            self.close_connection = True
            return
        delay = float(behaviour.split(":", 1)[1]) if behaviour.startswith("slow:") else 0.0
        step = 16 * 1024
        for offset in range(0, len(body), step):
            self.wfile.write(body[offset:offset + step])
            if delay:
                self.wfile.flush()
                time.sleep(delay)


class _State:
    def __init__(self) -> None:
        self.files: Dict[str, bytes] = {}
        self.behaviours: Dict[str, str] = {}
        self.requests: List[Tuple[str, Optional[str]]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()


class FileServer:
    """`with FileServer() as server: server.add("/a.bin", data, "drop:1000"); url = server.url("/a.bin")`."""

    class _Server(ThreadingHTTPServer):
        daemon_threads = True
        state: _State

        def handle_error(self, request: object, client_address: Tuple[str, int]) -> None:
            """A client hanging up mid-file is what the cancel and stall tests do; anything else is reported."""
            if isinstance(sys.exc_info()[1], ConnectionError):
                return
            super().handle_error(request, client_address)

    def __init__(self) -> None:
        self.state = _State()
        self._server = FileServer._Server(("127.0.0.1", 0), _Handler)
        self._server.state = self.state
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> "FileServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.state.stop.set()
        self._server.shutdown()
        self._server.server_close()

    def add(self, path: str, data: bytes, behaviour: str = "ok") -> str:
        self.state.files[path] = data
        self.state.behaviours[path] = behaviour
        return self.url(path)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{path}"

    def requests_for(self, path: str) -> List[Optional[str]]:
        """Range headers (None for a full request) of every request made for `path`."""
        with self.state.lock:
            return [r for p, r in self.state.requests if p == path]


def resolve_in_child(spec: str, registry: str, barrier: object, results: object) -> None:
    """Run in a separate process: wait for the sibling, then resolve (and download) the same model."""
    import hashlib

    from Med3DFMLib.registry import resolve_model

    barrier.wait()  # type: ignore[attr-defined]
    try:
        model = resolve_model(spec, registry=registry)
        digest = hashlib.sha256(model.weights.read_bytes()).hexdigest()
        results.put((model.source, str(model.weights), digest))  # type: ignore[attr-defined]
    except BaseException as err:  # report to the parent instead of dying silently
        results.put(("error", repr(err), ""))  # type: ignore[attr-defined]
