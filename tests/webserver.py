"""Real servers for the web tests: the app in a uvicorn thread, or `clip-pacl serve` as its own process."""

import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn

HEADERS = {"X-Requested-With": "clip-pacl"}  # what the page sends with every request


def post(url: str, headers: dict | None = None, **kwargs) -> httpx.Response:
    """A POST as the page sends it (with the header the server requires of every POST)."""
    return httpx.post(url, headers={**HEADERS, **(headers or {})}, **kwargs)


@contextmanager
def running(app):
    """A real uvicorn server for `app` on 127.0.0.1 and a free port, in a background thread."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_process(*args: str):
    """`clip-pacl serve ARGS --port P` as a subprocess; yields (url, process) once /api/health answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "clip_pacl_app.cli.main", "serve", *args, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "clip-pacl serve did not come up"
            try:
                httpx.get(f"{url}/api/health", timeout=5).raise_for_status()
                break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(30)
        proc.stderr.close()


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """Resident memory of a process (Linux /proc): VmRSS now, or VmHWM, its peak so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def raw_request(url: str, method: str, target: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, bytes]:
    """One HTTP request exactly as written: the target unnormalised (`..`, %-escapes), these headers (Host too)."""
    port = int(url.rsplit(":", 1)[1])
    lines = [f"{method} {target} HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items()),
             f"Content-Length: {len(body)}", "Connection: close", "", ""]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall("\r\n".join(lines).encode() + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), payload
