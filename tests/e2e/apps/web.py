"""A small web server for tests, run inside sandboxes (standard library only).

GET  /echo          what arrived: path, query, headers (JSON)
POST /upload        the body's length and SHA-256 (JSON)
GET  /big?n=N       N bytes, streamed in chunks
GET  /events        Server-Sent Events: "one", then "two" once /tmp/go exists
"""

import hashlib
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms stall between

    def reply(self, status, body, kind="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        url = urlsplit(self.path)
        if url.path == "/echo":
            seen = {"path": url.path, "query": url.query, "headers": dict(self.headers.items())}
            return self.reply(200, json.dumps(seen).encode())
        if url.path == "/big":
            size = int(parse_qs(url.query)["n"][0])
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            chunk = b"z" * 65536
            while size:
                self.wfile.write(chunk[: min(size, len(chunk))])
                size -= min(size, len(chunk))
            return None
        if url.path == "/events":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            self.wfile.write(b"data: one\n\n")
            self.wfile.flush()
            while not os.path.exists("/tmp/go"):
                time.sleep(0.05)
            self.wfile.write(b"data: two\n\n")
            self.wfile.flush()
            self.close_connection = True
            return None
        if url.path == "/page":
            script = (
                b'fetch("echo").then(r => r.json())'
                b'.then(j => { document.getElementById("out").textContent = j.path; })'
            )
            page = b'<p id="out">waiting</p><script>' + script + b"</script>"
            return self.reply(200, page, "text/html")
        return self.reply(200, b"<h1>hello from the sandbox</h1>", "text/html")

    def do_POST(self):
        size = int(self.headers.get("Content-Length", "0"))
        digest = hashlib.sha256()
        left = size
        while left:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
        self.reply(200, json.dumps({"length": size - left, "sha256": digest.hexdigest()}).encode())

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Handler).serve_forever()
