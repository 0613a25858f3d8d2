"""longpoll's ASGI app (longpoll.asgi_app) under uvicorn, one worker: what
mounting longpoll in an ASGI app costs against `longpoll serve`'s own loop.
The same settings as bench/run.py gives serve.

    pip install uvicorn && python bench/servers/asgi_uvicorn.py --port 0
"""
import argparse
import os
import socket
import sys

import uvicorn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import longpoll  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(4096)  # (before the line below: the bench connects at once)
    app = longpoll.asgi_app(retention=100000, max_timeout=3600, max_waiting=100000)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", backlog=4096,
                                           timeout_keep_alive=3600))
    print("listening on http://127.0.0.1:%d" % sock.getsockname()[1], file=sys.stderr,
          flush=True)
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
