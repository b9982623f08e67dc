"""A service for deployment tests (standard library only), run as `python3 -c SOURCE PORT`.

GET /        "version $VERSION"
GET /slow    the same, a third of a second later
GET /crash   the process exits with code 3 (no answer)
Each request is logged on stdout: "served PATH".
"""

import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms stall between

    def do_GET(self):
        if self.path == "/crash":
            print("crashing on request", flush=True)
            os._exit(3)
        if self.path == "/slow":
            time.sleep(0.3)
        body = ("version " + os.environ.get("VERSION", "1")).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        print("served", self.path, flush=True)


print("listening on", sys.argv[1], flush=True)
ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Handler).serve_forever()
