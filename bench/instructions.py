"""What one publish costs the server in CPU instructions, counted, not timed:
each server runs under valgrind's callgrind while one publisher sends N
publishes back-to-back over one keep-alive connection (bench/run.py's K=0
throughput row), once with N1 and once with N2; the difference divided by
N2 - N1 is the server's instructions per publish, start-up left out.
With --fanout, what one delivery costs: 200 long-polls parked (`longpoll
bench` as the load, in a process of its own), M1 and then M2 messages at
2/s, the difference divided by 200 * (M2 - M1) deliveries (each answer,
and the re-poll that follows it).

    python3 bench/instructions.py                  # longpoll and floor
    python3 bench/instructions.py --baseline DIR   # and an older checkout's longpoll.py
    python3 bench/instructions.py --fanout         # per delivery, about 3 minutes

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
import importlib.util
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


def serve_longpoll(folder, load, count):
    """Under valgrind: a longpoll server, until its load is done. Its
    longpoll.py is *folder*'s, loaded under a name of its own: the one
    bench/run.py imports (for its load generator) is this checkout's."""
    spec = importlib.util.spec_from_file_location("longpoll_served",
                                                  os.path.join(folder, "longpoll.py"))
    longpoll = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(longpoll)
    server = longpoll.make_server("127.0.0.1", 0)

    def publish():
        subprocess.run(LOADS[load](server.server_address[1], count), check=True,
                       cwd=run.ROOT, stdout=subprocess.DEVNULL)
        server.shutdown()
    thread = threading.Thread(target=publish)
    thread.start()
    server.serve_forever()
    thread.join()


def fan_out(port, messages):
    """The load of a --fanout count: `longpoll bench` against *port*."""
    return [sys.executable, "-m", "longpoll", "bench", f"http://127.0.0.1:{port}",
            "--clients", str(FANOUT_CLIENTS), "--messages", str(messages), "--rate", "2",
            "--generators", "1", "-q"]


FANOUT_CLIENTS = 200
LOADS = {"publish": publisher, "fanout": fan_out}


def serve_floor(load, count):
    """Under valgrind: bench/servers/floor.py, until its load is done."""
    sys.path.insert(0, os.path.join(HERE, "servers"))
    import floor

    async def main():
        state = floor.State()
        server = await asyncio.get_running_loop().create_server(
            lambda: floor.Conn(state), "127.0.0.1", 0)
        proc = await asyncio.create_subprocess_exec(
            *LOADS[load](server.sockets[0].getsockname()[1], count), cwd=run.ROOT,
            stdout=asyncio.subprocess.DEVNULL)
        await proc.wait()
    asyncio.run(main())


def count(name, folder, load, n):
    """The server's instructions for a life with *n* publishes (or, with
    the fanout load, *n* messages to its subscribers)."""
    out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                          sys.executable, os.path.abspath(__file__), "--serve", name, folder,
                          load, str(n)], capture_output=True, text=True)
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
    parser.add_argument("--fanout", action="store_true",
                        help="instructions per delivery to parked long-polls instead")
    parser.add_argument("--messages", default="10,30", metavar="M1,M2",
                        help="with --fanout: the two runs' messages (default 10,30)")
    parser.add_argument("--serve", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--publish", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.publish:
        run.publish_blocking("127.0.0.1", *args.publish)
        return
    if args.serve:
        name, folder, load, n = args.serve
        if name == "floor":
            serve_floor(load, int(n))
        else:
            serve_longpoll(folder, load, int(n))
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is missing: apt-get install valgrind")
    servers = {name: run.ROOT for name in args.servers.split(",")}
    if args.baseline:
        servers["longpoll-baseline"] = os.path.abspath(args.baseline)
    load, what = ("fanout", "messages") if args.fanout else ("publish", "publishes")
    low, high = (int(n) for n in (args.messages if args.fanout else args.publishes).split(","))
    per_unit = FANOUT_CLIENTS * (high - low) if args.fanout else high - low
    per = {}
    for name, folder in servers.items():
        print(f"{name}: {low} and {high} {what} under callgrind ...", file=sys.stderr)
        per[name] = (count(name, folder, load, high) - count(name, folder, load, low)) / per_unit
    floor = per.get("floor")
    print(f"`python3 bench/instructions.py {' '.join(sys.argv[1:])}`".replace(" `", "`"))
    print()
    unit = f"delivery ({FANOUT_CLIENTS} long-polls)" if args.fanout else "publish"
    print(f"| server | instructions per {unit} | vs floor |")
    print("|---|---:|---:|")
    for name, value in per.items():
        ratio = f"{value / floor:.2f}×" if floor else "–"
        print(f"| {name} | {value:,.0f} | {ratio} |")


if __name__ == "__main__":
    main()
