"""An unmodified-style server for ``fdbroker exec NAME -- python3 brokered_http_app.py``: it serves HTTP on the
listener it inherits as fd 3 (``LISTEN_FDS=1``, the socket-activation protocol) and never binds anything."""

import http.server
import os
import socket

assert os.environ.get("LISTEN_FDS") == "1", "expected one socket-activation descriptor"


class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"served on a brokered listener\n")

    def log_message(self, format: str, *args: object) -> None:
        pass


srv = http.server.ThreadingHTTPServer(("", 0), Hello, bind_and_activate=False)
srv.socket.close()
srv.socket = socket.socket(fileno=3)
srv.serve_forever()
