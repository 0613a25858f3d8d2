"""Baseline: the floor. A minimal stdlib asyncio server that keeps a list of
pre-encoded messages, answers a poll with a backlog at once, and on a
publish writes one pre-encoded response to every parked socket. It does
nothing else (no validation, no retention, no timeouts): what any
long-poll server must at least pay on this machine.

    python bench/servers/floor.py --port 0
"""
import argparse
import asyncio
import json
import re
import socket
import sys
import time

LENGTH = re.compile(rb"content-length:\s*(\d+)", re.I)
QUERY = re.compile(rb"[?&](since|limit)=(\d+)")


def response(status, body):
    return (b"HTTP/1.1 %d OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % (status, len(body)) + body)


class State:
    def __init__(self):
        self.messages = []      # pre-encoded message objects
        self.parked = []        # transports waiting at the head


class Conn(asyncio.Protocol):
    def __init__(self, state):
        self.state, self.buf = state, bytearray()

    def connection_made(self, transport):
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc):
        try:
            self.state.parked.remove(self.transport)
        except ValueError:
            pass

    def data_received(self, data):
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end])
            match = LENGTH.search(head)
            length = int(match.group(1)) if match else 0
            if len(self.buf) < end + 4 + length:
                return
            body = bytes(self.buf[end + 4:end + 4 + length])
            del self.buf[:end + 4 + length]
            self.handle(head.split(b" ", 2), head, body)

    def handle(self, line, head, body):
        state = self.state
        if line[0] == b"POST":
            message = json.loads(body)["message"]
            n = len(state.messages) + 1
            state.messages.append(b'{"id":"%d","channel":"bench","time":%f,"message":%s}'
                                  % (n, time.time(), json.dumps(message).encode()))
            data = response(200, b'{"messages":[' + state.messages[-1] + b'],"cursor":"%d"}' % n)
            for transport in state.parked:  # one pre-encoded answer for all
                transport.write(data)
            state.parked.clear()
            self.transport.write(response(201, b'{"id":"%d"}' % n))
        elif line[1] == b"/health":
            self.transport.write(response(200, b'{"status":"ok","waiting":%d}' % len(state.parked)))
        else:
            query = dict(QUERY.findall(line[1]))
            since = int(query.get(b"since", len(state.messages)))
            limit = int(query.get(b"limit", 100))
            if since < len(state.messages):
                batch = state.messages[since:since + limit]
                self.transport.write(response(200, b'{"messages":[' + b",".join(batch)
                                              + b'],"cursor":"%d"}' % (since + len(batch))))
            else:
                state.parked.append(self.transport)


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    state = State()
    server = await asyncio.get_running_loop().create_server(
        lambda: Conn(state), "127.0.0.1", args.port, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    print(f"listening on http://127.0.0.1:{port}", file=sys.stderr, flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
