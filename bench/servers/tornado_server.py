"""Baseline: Tornado 6 speaking the same protocol, the way its chat demo
long-polls (a message buffer and a tornado.locks.Condition).

    pip install tornado && python bench/servers/tornado_server.py --port 0
"""
import argparse
import asyncio
import datetime
import json
import sys
import time

import tornado.httpserver
import tornado.locks
import tornado.netutil
import tornado.web


class Buffer:
    def __init__(self):
        self.messages = []
        self.cond = tornado.locks.Condition()
        self.waiting = 0


class Channel(tornado.web.RequestHandler):
    async def get(self, name):
        buf = self.application.buffer
        since = self.get_argument("since", None)
        since = len(buf.messages) if since is None else int(since)
        timeout = float(self.get_argument("timeout", "30"))
        limit = int(self.get_argument("limit", "100"))
        deadline = time.monotonic() + timeout
        buf.waiting += 1
        try:
            while len(buf.messages) <= since:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                await buf.cond.wait(timeout=datetime.timedelta(seconds=remaining))
        finally:
            buf.waiting -= 1
        if self.request.connection.stream.closed():
            return
        messages = buf.messages[since:since + limit]
        self.write({"messages": messages, "cursor": str(since + len(messages))})

    def post(self, name):
        buf = self.application.buffer
        data = json.loads(self.request.body)
        msg = {"id": str(len(buf.messages) + 1), "channel": name, "time": time.time(),
               "message": data["message"]}
        buf.messages.append(msg)
        buf.cond.notify_all()
        self.set_status(201)
        self.write({"id": msg["id"], "channel": name, "time": msg["time"]})


class Health(tornado.web.RequestHandler):
    def get(self):
        self.write({"status": "ok", "waiting": self.application.buffer.waiting})


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    app = tornado.web.Application([(r"/channels/([^/]+)", Channel), (r"/health", Health)])
    app.buffer = Buffer()
    server = tornado.httpserver.HTTPServer(app, idle_connection_timeout=3600)
    sockets = tornado.netutil.bind_sockets(args.port, "127.0.0.1", backlog=4096)
    server.add_sockets(sockets)
    port = sockets[0].getsockname()[1]
    print(f"listening on http://127.0.0.1:{port}", file=sys.stderr, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
