"""A stand-in for a service outside Hangar, run in a network namespace the test made: it
records each request's method, path and headers as a JSON line in LOG and answers 200 with
BODY. Usage: recording_server.py ADDR PORT LOG BODY"""

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ADDR, PORT, LOG, BODY = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4].encode()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def handle_any(self):
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n) if n else b""
        with open(LOG, "a") as f:
            f.write(json.dumps({
                "method": self.command,
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body": body.decode("utf-8", "replace"),
            }) + "\n")
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    do_GET = do_POST = do_PUT = handle_any


ThreadingHTTPServer((ADDR, PORT), Handler).serve_forever()
