"""A weights mirror over real HTTP on a loopback port, for the download tests.

Serves the files of a folder as `http.server` does, and two faults a real mirror has: a path
under `/cut/` sends its Content-Length, then half the bytes, then closes the connection; a
path under `/nolength/` sends the bytes with no Content-Length (the end is the connection's
close).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _MirrorHandler(SimpleHTTPRequestHandler):
    def do_GET(self) -> None:
        for prefix, send in (("/cut/", self._send_half), ("/nolength/", self._send_unsized)):
            if self.path.startswith(prefix):
                file = Path(self.directory) / self.path.removeprefix(prefix)
                if file.is_file():
                    send(file.read_bytes())
                else:
                    self.send_error(404)
                return
        super().do_GET()

    def _send_half(self, data: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True

    def _send_unsized(self, data: bytes) -> None:
        self.protocol_version = "HTTP/1.0"
        self.send_response(200)
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True

    def log_message(self, *args) -> None:  # quiet: pytest shows stderr of failures only
        pass


@contextmanager
def http_mirror(folder: Path) -> Iterator[str]:
    """The base URL (`http://127.0.0.1:<port>`) of a mirror serving `folder`, while in use."""
    handler = functools.partial(_MirrorHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
