"""What a publish costs in each store, in-process (no HTTP): Hub.publish
with memory, sqlite and Redis, as microseconds per publish and as a ratio
to memory measured in the same run.

    python3 bench/publish.py                    # 5,000 publishes per store
    python3 bench/publish.py --count 20000 --module DIR   # another checkout's longpoll.py

The Redis row uses a redis-server this script starts on a free port (no
persistence), as bench/run.py does. bench/run.py measures the same over
HTTP, with the server in a process of its own.
"""
import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def redis_server():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit("redis-server did not start")
            time.sleep(0.05)


def measure(longpoll, store, count):
    hub = longpoll.Hub(store=store, retention=1000)
    try:
        for i in range(200):  # warm up: connections, the scripts loaded, the file made
            hub.publish("warm", i)
        started = time.perf_counter()
        for i in range(count):
            hub.publish("bench", "a message of some thirty bytes")
        return (time.perf_counter() - started) / count * 1e6
    finally:
        hub.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--module", metavar="DIR", default=ROOT,
                        help="the folder whose longpoll.py to measure")
    args = parser.parse_args()
    sys.path.insert(0, os.path.abspath(args.module))
    import longpoll
    folder = tempfile.mkdtemp()
    stores = [("memory", None), ("sqlite", f"sqlite:{folder}/bench.db")]
    redis = None
    if shutil.which("redis-server"):
        redis, url = redis_server()
        stores.append(("redis", url))
    try:
        rows = [(name, measure(longpoll, store, args.count)) for name, store in stores]
    finally:
        if redis is not None:
            redis.terminate()
            redis.wait(10)
        shutil.rmtree(folder, ignore_errors=True)
    command = "python3 bench/publish.py " + " ".join(sys.argv[1:])
    print(f"`{command.strip()}` — Python {sys.version.split()[0]}, {args.count:,} publishes\n")
    print("| store | µs per publish | publishes/s | vs memory |")
    print("|---|---:|---:|---:|")
    memory = rows[0][1]
    for name, micros in rows:
        print(f"| {name} | {micros:,.1f} | {1e6 / micros:,.0f} | {memory / micros:.2f}× |")


if __name__ == "__main__":
    main()
