"""A folder served over HTTP on 127.0.0.1, for tests of the real download code paths
(the ``server`` fixture in conftest.py)."""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from fedkd.data.download import Resource


@dataclass
class Server:
    """A folder served over HTTP on 127.0.0.1; ``hits`` lists the paths requested."""

    folder: Path
    url: str
    hits: list[str] = field(default_factory=list)

    def add(self, name: str, blob: bytes) -> Resource:
        """Serve ``blob`` as ``name``; a resource for it with the right md5 (no provides)."""
        (self.folder / name).write_bytes(blob)
        return Resource((self.url + name,), md5(blob), ())


def md5(blob: bytes) -> str:
    return hashlib.md5(blob).hexdigest()


@contextmanager
def serve(folder: Path) -> Iterator[Server]:
    """Serve ``folder`` until the context ends."""
    folder.mkdir(parents=True, exist_ok=True)
    hits: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            super().do_GET()

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=folder))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield Server(folder, f"http://127.0.0.1:{httpd.server_address[1]}/", hits)
    finally:
        httpd.shutdown()
        httpd.server_close()
