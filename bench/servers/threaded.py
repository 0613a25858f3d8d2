"""Baseline: one blocked thread per waiting client, written the obvious way.

ThreadingHTTPServer, a list of messages and a Condition: each waiting
request sleeps in cond.wait(), each publish calls notify_all(), and every
woken thread encodes its own answer. TCP_NODELAY is set (without it a
keep-alive client waits 40 ms per request for a delayed ACK).

    python bench/servers/threaded.py --port 0
"""
import argparse
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *args):
        pass

    def send_json(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        state = self.server
        if url.path == "/health":
            return self.send_json(200, {"status": "ok", "waiting": state.waiting})
        timeout = float(query.get("timeout", 30))
        limit = int(query.get("limit", 100))
        with state.cond:
            since = int(query["since"]) if "since" in query else len(state.messages)
            deadline = time.monotonic() + timeout
            state.waiting += 1
            while len(state.messages) <= since:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                state.cond.wait(remaining)
            state.waiting -= 1
            messages = state.messages[since:since + limit]
        self.send_json(200, {"messages": messages, "cursor": str(since + len(messages))})

    def do_POST(self):
        data = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        state = self.server
        with state.cond:
            msg = {"id": str(len(state.messages) + 1), "channel": "bench",
                   "time": time.time(), "message": data["message"]}
            state.messages.append(msg)
            state.cond.notify_all()
        self.send_json(201, {"id": msg["id"], "channel": "bench", "time": msg["time"]})


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    ThreadingHTTPServer.request_queue_size = 4096
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.messages, server.cond, server.waiting = [], threading.Condition(), 0
    print(f"listening on http://127.0.0.1:{server.server_address[1]}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
