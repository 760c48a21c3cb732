"""Running the app under uvicorn on 127.0.0.1 in a thread, and raw HTTP for what the openai client hides."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import uvicorn


@contextlib.contextmanager
def running(app):
    """Serve ``app`` on a free port of 127.0.0.1; yields the base URL (``http://127.0.0.1:PORT``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def post(url: str, body, headers: dict | None = None) -> tuple[int, dict | str]:
    """POST ``body`` (bytes sent as is, else JSON); (status, parsed JSON or text)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    return _send(req)


def get(url: str, headers: dict | None = None) -> tuple[int, dict | str]:
    return _send(urllib.request.Request(url, headers=headers or {}))


def _send(req) -> tuple[int, dict | str]:
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, raw = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read().decode()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw
