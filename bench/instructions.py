"""What one publish costs the server in CPU instructions, counted, not timed:
each server runs under valgrind's callgrind while one publisher sends N
publishes back-to-back over one keep-alive connection (bench/run.py's K=0
throughput row), once with N1 and once with N2; the difference divided by
N2 - N1 is the server's instructions per publish, start-up left out.

    python3 bench/instructions.py                  # longpoll and floor
    python3 bench/instructions.py --baseline DIR   # and an older checkout's longpoll.py

Wall-clock rows on a small shared machine vary by ±20 % from run to run;
these counts vary by well under 1 %, so a change to the publish path shows
here before it can be told apart from noise in bench/run.py. Counts are of
the server's user-space instructions (Python, C, libc; the kernel's work
in its system calls is not counted), so they rank the work each server
does on its own side of the sockets. Needs valgrind (apt-get install
valgrind); a run takes about a minute per server.
"""
import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run  # noqa: E402 (bench/run.py: the publisher, the folder of longpoll.py)


def publisher(port, publishes):
    """The publisher, a process of its own (valgrind does not follow it)."""
    return [sys.executable, os.path.abspath(__file__), "--publish", str(port), str(publishes)]


def serve_longpoll(folder, publishes):
    """Under valgrind: a longpoll server, until the publisher is done."""
    sys.path.insert(0, folder)
    import longpoll
    server = longpoll.make_server("127.0.0.1", 0)

    def publish():
        subprocess.run(publisher(server.server_address[1], publishes), check=True)
        server.shutdown()
    thread = threading.Thread(target=publish)
    thread.start()
    server.serve_forever()
    thread.join()


def serve_floor(publishes):
    """Under valgrind: bench/servers/floor.py, until the publisher is done."""
    sys.path.insert(0, os.path.join(HERE, "servers"))
    import floor

    async def main():
        state = floor.State()
        server = await asyncio.get_running_loop().create_server(
            lambda: floor.Conn(state), "127.0.0.1", 0)
        proc = await asyncio.create_subprocess_exec(
            *publisher(server.sockets[0].getsockname()[1], publishes))
        await proc.wait()
    asyncio.run(main())


def count(name, folder, publishes):
    """The server's instructions for a life with *publishes* publishes."""
    out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                          sys.executable, os.path.abspath(__file__), "--serve", name, folder,
                          str(publishes)], capture_output=True, text=True)
    found = re.search(r"I\s+refs:\s+([\d,]+)", out.stderr)
    if out.returncode or found is None:
        raise SystemExit(f"{name} failed under valgrind:\n{out.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default="longpoll,floor")
    parser.add_argument("--baseline", metavar="DIR",
                        help="a folder holding another longpoll.py, run as longpoll-baseline")
    parser.add_argument("--publishes", default="1000,3000", metavar="N1,N2")
    parser.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--publish", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.publish:
        run.publish_blocking("127.0.0.1", *args.publish)
        return
    if args.serve:
        name, folder, publishes = args.serve
        if name == "floor":
            serve_floor(int(publishes))
        else:
            serve_longpoll(folder, int(publishes))
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is missing: apt-get install valgrind")
    servers = {name: run.ROOT for name in args.servers.split(",")}
    if args.baseline:
        servers["longpoll-baseline"] = os.path.abspath(args.baseline)
    low, high = (int(n) for n in args.publishes.split(","))
    per = {}
    for name, folder in servers.items():
        print(f"{name}: {low} and {high} publishes under callgrind ...", file=sys.stderr)
        per[name] = (count(name, folder, high) - count(name, folder, low)) / (high - low)
    floor = per.get("floor")
    print(f"`python3 bench/instructions.py {' '.join(sys.argv[1:])}`".replace(" `", "`"))
    print()
    print("| server | instructions per publish | vs floor |")
    print("|---|---:|---:|")
    for name, value in per.items():
        ratio = f"{value / floor:.2f}×" if floor else "–"
        print(f"| {name} | {value:,.0f} | {ratio} |")


if __name__ == "__main__":
    main()
