"""``saelab browse``: serve the feature pages on 127.0.0.1 with the standard library's
``http.server`` (the pages also work opened as files)."""

from __future__ import annotations

import functools
import logging
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

log = logging.getLogger(__name__)


class _Handler(SimpleHTTPRequestHandler):
    """Static files of one directory; ``/`` goes to the cross-variant page."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path in ("/", "/index.html"):
            self.send_response(302)
            self.send_header("Location", "/compare/index.html")
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        log.debug(format, *args)


def make_server(directory: str | Path, port: int) -> ThreadingHTTPServer:
    """An HTTP server of ``directory`` bound to 127.0.0.1:``port`` (0: any free port).

    Raises:
        FileNotFoundError: ``directory`` does not exist.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no feature pages at {directory} (run dvc repro first)")
    handler = functools.partial(_Handler, directory=str(directory))
    return ThreadingHTTPServer(("127.0.0.1", port), handler)
