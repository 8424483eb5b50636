"""An unmodified-style server for ``fdbroker exec NAME -- python3 brokered_http_app.py``: it serves HTTP on the
listener it inherits as fd 3 (``LISTEN_FDS=1``, the socket-activation protocol) and never binds anything.

On SIGTERM it drains, as a server replaced without downtime must: it stops accepting (the listener stays open in
the broker and in its successor, which accept from then on), answers the requests it already accepted, closes its
copy of the listener and exits 0.
"""

import http.server
import os
import signal
import socket
import threading

assert os.environ.get("LISTEN_FDS") == "1", "expected one socket-activation descriptor"


class Hello(http.server.BaseHTTPRequestHandler):
    timeout = 5  # a connection that never sends its request must not hold up the drain (server_close joins)

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"served on a brokered listener\n")

    def log_message(self, format: str, *args: object) -> None:
        pass


srv = http.server.ThreadingHTTPServer(("", 0), Hello, bind_and_activate=False)
srv.daemon_threads = False  # server_close() waits for the requests in flight
srv.socket.close()
srv.socket = socket.socket(fileno=3)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
serving = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
serving.start()
stop.wait()
srv.shutdown()  # accepts nothing more
srv.server_close()  # joins the request threads, closes this copy of the listener
