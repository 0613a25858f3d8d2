"""Benchmark matrix: longpoll against baselines measured in the same run.

    python3 -m pip install -r bench/requirements.txt   # tornado, for its baseline
    python3 bench/run.py                               # the whole matrix, as Markdown tables
    python3 bench/run.py --output docs/performance.md   # ... and the page in docs/
    python3 bench/run.py --servers longpoll,floor --clients 1000 --idle-seconds 2

Servers (each started fresh for every row, as a subprocess of this script):
  longpoll   python -m longpoll serve
  longpoll-baseline the same, from the folder --baseline DIR (an older checkout);
                    longpoll-baseline-sqlite and -redis with its stores
  longpoll-ws       the same, its subscribers on WebSockets (/channels/bench/ws)
  longpoll-sqlite   the same with --store sqlite:FILE (a new file per row)
  longpoll-redis    the same with --store redis://... (a redis-server this
                    script starts on a free port, emptied for every row)
  threaded   bench/servers/threaded.py: a blocked thread per waiting client
  tornado    bench/servers/tornado_server.py: Tornado 6
  floor      bench/servers/floor.py: writes one pre-encoded answer to every parked socket
  asgi       bench/servers/asgi_uvicorn.py: longpoll.asgi_app under uvicorn (one worker)

Fan-out rows (``longpoll bench``'s fan-out): park N subscribers (raw
HTTP/1.1 keep-alive sockets, asyncio) in a worker process, wait until
/health reports them all waiting, measure the server's CPU over
--idle-seconds with everyone parked, then publish M messages at R per
second from this process, each carrying its send time; every subscriber
passes back its cursor. Reported: delivered/expected (and any repeat),
latency p50/p99/max, server CPU per delivered message (from
/proc/PID/stat), RSS and threads, and the load generator's busiest worker's
share of a core. (The publisher once shared an event loop with the
subscribers: at N=5,000 their answers kept it from its schedule by up to
200 ms, and it then sent two messages at once, by a different rhythm for
each server.) --fanout-repeat R runs the fan-out rows in rounds.

Throughput rows: K subscribers parked (0 or 100), then P publishes
back-to-back over one keep-alive connection: publishes/s, and with K > 0
deliveries/s (K*P over the time until every subscriber has all P). The
publisher there is a plain blocking socket in a process of its own, so
that the client's own cost (an asyncio round trip costs about as much as
the fastest server's work) does not flatten the differences between servers.
"""
import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import os
import re
import resource
import socket
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import longpoll  # noqa: E402 (its load generator: python3 -m longpoll bench)
BASELINE = ROOT  # --baseline DIR: where longpoll-baseline's longpoll.py is
HERE = os.path.dirname(os.path.abspath(__file__))
SERVERS = {
    # (retention above any row's message count: a subscriber that falls far
    # behind would get a gap instead of the messages, and the row would
    # measure retention, not delivery)
    "longpoll": [sys.executable, "-m", "longpoll", "serve", "--port", "0", "-q",
                 "--max-timeout", "3600", "--retention", "100000"],
    "threaded": [sys.executable, os.path.join(HERE, "servers", "threaded.py"), "--port", "0"],
    "tornado": [sys.executable, os.path.join(HERE, "servers", "tornado_server.py"), "--port", "0"],
    "floor": [sys.executable, os.path.join(HERE, "servers", "floor.py"), "--port", "0"],
    "asgi": [sys.executable, os.path.join(HERE, "servers", "asgi_uvicorn.py"), "--port", "0"],
}
LENGTH = re.compile(rb"[Cc]ontent-[Ll]ength:\s*(\d+)")


# -- the server under test ------------------------------------------------------------

STORES = {"longpoll-sqlite": "sqlite", "longpoll-redis": "redis"}


class Redis:
    """A redis-server of the benchmark's own, on a free port."""
    url = None

    @classmethod
    def start(cls):
        if cls.url is None:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            cls.proc = subprocess.Popen(["redis-server", "--port", str(port), "--save", "",
                                         "--appendonly", "no"], stdout=subprocess.DEVNULL)
            cls.url = f"redis://127.0.0.1:{port}/0"
            for _ in range(100):
                if subprocess.run(["redis-cli", "-p", str(port), "ping"],
                                  capture_output=True).returncode == 0:
                    break
                time.sleep(0.05)
        subprocess.run(["redis-cli", "-u", cls.url, "flushdb"], capture_output=True, check=True)
        return cls.url


class ServerProcess:
    def __init__(self, name):
        self.name = name
        command, self.folder = SERVERS.get(name, SERVERS["longpoll"]), None
        store = STORES.get(name.replace("-baseline", ""))  # longpoll-baseline-sqlite too
        if store == "sqlite":
            self.folder = tempfile.mkdtemp()
            command = command + ["--store", f"sqlite:{self.folder}/bench.db"]
        elif store == "redis":
            command = command + ["--store", Redis.start()]
        cwd = BASELINE if name.startswith("longpoll-baseline") else ROOT
        self.proc = subprocess.Popen(command, cwd=cwd, stderr=subprocess.PIPE, text=True)
        for line in self.proc.stderr:
            match = re.search(r"listening on http://([\d.]+):(\d+)", line)
            if match:
                self.host, self.port = match.group(1), int(match.group(2))
                break
        else:
            raise RuntimeError(f"{name} did not start")
        self.pid = self.proc.pid

    def cpu(self):
        return longpoll._pid_cpu(self.pid)  # (what longpoll bench --pid reads too)

    def status(self):
        with open(f"/proc/{self.pid}/status") as f:
            threads = next(line for line in f if line.startswith("Threads:"))
        return longpoll._pid_rss(self.pid), int(threads.split()[1])

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)


# -- clients: longpoll's own load generator (python3 -m longpoll bench) ------------------

def target(server):
    """The bench channel of *server*, published to without a ttl (as the
    peers take it, and as the rows have always measured)."""
    return longpoll.BenchTarget(server.host, server.port, "bench", ttl=None)


async def park(server, run, count, timeout=180):
    """*count* subscribers on the bench channel (WebSockets for a -ws
    server), once /health says they all wait."""
    subscribers = await longpoll.bench_subscribe(
        target(server), run, count, "ws" if server.name.endswith("-ws") else "poll")
    deadline = time.monotonic() + timeout

    async def waiting():
        try:  # (a server drowning in its clients may not answer at all)
            return (await asyncio.wait_for(health(server.host, server.port), 10))["waiting"]
        except (asyncio.TimeoutError, OSError):
            return 0

    while await waiting() < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server.name}: not all {count} subscribers parked")
        await asyncio.sleep(0.1)
    return subscribers


async def health(host, port):
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: bench\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    body = await reader.readexactly(int(LENGTH.search(head).group(1)))
    writer.close()
    return json.loads(body)


def Run(expected):
    """What the subscribers of a row received (``longpoll.BenchTally``),
    with a future set when all *expected* deliveries came."""
    tally = longpoll.BenchTally(expected)
    tally.done = asyncio.get_running_loop().create_future()
    return tally


def publish_blocking(host, port, count):
    """(start, end) of *count* publishes back-to-back over one keep-alive
    connection (``longpoll.bench_publish_blocking``)."""
    start, end, _ = longpoll.bench_publish_blocking(
        longpoll.BenchTarget(host, port, "bench", ttl=None), count)
    return start, end


close_all = longpoll.bench_close


# -- the two kinds of row -----------------------------------------------------------

async def fanout(name, clients, messages, rate, idle_seconds, drain):
    """One fan-out row: ``longpoll bench``'s fan-out (the subscribers in a
    worker process, the publisher here, so that the publishes keep their
    schedule however busy the subscribers are), with the idle server's
    CPU, memory and threads measured once all wait."""
    server = ServerProcess(name)
    idle = {}

    async def parked():
        cpu0, t0 = server.cpu(), time.monotonic()
        await asyncio.sleep(idle_seconds)
        idle["share"] = (server.cpu() - cpu0) / (time.monotonic() - t0)
        idle["rss"], idle["threads"] = server.status()

    try:
        out = await longpoll.BenchRun(
            target(server), "fanout", clients=clients, messages=messages, rate=rate,
            transport="ws" if name.endswith("-ws") else "poll", drain=drain,
            server_pid=server.pid, on_parked=parked).arun()
    finally:
        server.stop()
    if not idle or not out["delivered"]:
        raise RuntimeError(out.get("error") or f"{name}: not all {clients} subscribers parked")
    if out.get("error"):  # (a drowning baseline: the row shows what came)
        print(f"  {name} at N={clients}: {out['error']}", file=sys.stderr)
    return {
        "server": name, "clients": clients, "delivered": out["delivered"],
        "expected": clients * messages, "repeats": out["duplicates"], "gaps": out["gaps"],
        "p50": out["latency_p50_ms"] / 1000, "p99": out["latency_p99_ms"] / 1000,
        "max": out["latency_max_ms"] / 1000, "cpu_us": out["server_cpu_us_per_delivery"],
        "generator": out["generator_cpu"],
        "rss": idle["rss"], "threads": idle["threads"], "idle": idle["share"],
    }


async def throughput(name, subscribers_count, publishes, drain):
    server = ServerProcess(name)
    subscribers = []
    try:
        run = Run(subscribers_count * publishes)
        subscribers = await park(server, run, subscribers_count)
        with concurrent.futures.ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn")) as pool:
            start, published = await asyncio.get_running_loop().run_in_executor(
                pool, publish_blocking, server.host, server.port, publishes)
        if subscribers_count:
            try:
                await asyncio.wait_for(asyncio.shield(run.done), drain)
            except asyncio.TimeoutError:
                pass
        finished = run.done.result() if run.done.done() else time.monotonic()
        close_all(subscribers)
        return {
            "server": name, "subscribers": subscribers_count,
            "publishes_per_s": publishes / (published - start),
            "deliveries_per_s": run.delivered / (finished - start) if subscribers_count else None,
            "delivered": run.delivered, "expected": run.expected, "repeats": run.repeats,
            "gaps": run.gaps,
        }
    finally:
        close_all(subscribers)
        server.stop()


def _median_row(rows, key="publishes_per_s"):
    """Rounds of one row as one: the median run by *key* (publishes/s, or
    a fan-out's median latency), with the range, and every round's
    deliveries counted."""
    ordered = sorted(rows, key=lambda r: r[key])
    row = dict(ordered[len(ordered) // 2])
    row["range"] = (ordered[0][key], ordered[-1][key])
    for name in ("delivered", "expected", "repeats", "gaps"):
        row[name] = sum(r[name] for r in rows)
    return row


def _median_fanout(rows):
    """Rounds of one fan-out row as one: the round with the median p50
    latency (its p99 and max with it), the range of the p50s, and the
    median of the rounds' CPU per delivery, each on its own."""
    if len(rows) == 1:
        return rows[0]
    row = _median_row(rows, "p50")
    for name in ("cpu_us", "idle", "generator"):
        row[name] = statistics.median(r[name] for r in rows)
    return row


# -- the report ----------------------------------------------------------------------

def ms(seconds):
    return f"{seconds * 1000:,.0f}" if seconds == seconds else "–"


def fanout_table(rows):
    out = ["| server | N | delivered | latency p50 / p99 / max (ms) | CPU µs per delivery "
           "| vs floor | vs longpoll | vs tornado | RSS MB | threads | idle CPU % "
           "| generator CPU % |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        peers = {r["server"]: r for r in rows if r["clients"] == row["clients"]}

        def ratio(peer):
            other = peers.get(peer)
            return f"{row['cpu_us'] / other['cpu_us']:.2f}×" if other and other["delivered"] else "–"

        delivered = f"{row['delivered']:,}/{row['expected']:,}"
        if row["repeats"]:
            delivered += f" ({row['repeats']} repeated)"
        if row["gaps"]:
            delivered += f" ({row['gaps']} gaps)"
        latency = f"{ms(row['p50'])} / {ms(row['p99'])} / {ms(row['max'])}"
        if "range" in row:  # rounds: the median row, and the range of the p50s
            latency += f" ({ms(row['range'][0])}–{ms(row['range'][1])})"
        out.append(
            f"| {row['server']} | {row['clients']:,} | {delivered} | {latency} | "
            f"{row['cpu_us']:.1f} | {ratio('floor')} | {ratio('longpoll')} | "
            f"{ratio('tornado')} | {row['rss']:.0f} | {row['threads']} | "
            f"{row['idle'] * 100:.2f} | {row['generator'] * 100:.0f} |")
    return "\n".join(out)


def throughput_table(rows):
    out = ["| server | K subscribers | publishes/s (median, range) | vs floor | vs longpoll "
           "| vs tornado | deliveries/s | vs tornado | delivered |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        peer = next((r for r in rows if r["server"] == "tornado"
                     and r["subscribers"] == row["subscribers"]), None)
        memory = next((r for r in rows if r["server"] == "longpoll"
                       and r["subscribers"] == row["subscribers"]), None)
        floor = next((r for r in rows if r["server"] == "floor"
                      and r["subscribers"] == row["subscribers"]), None)
        pub_ratio = f"{row['publishes_per_s'] / peer['publishes_per_s']:.1f}×" if peer else "–"
        mem_ratio = (f"{row['publishes_per_s'] / memory['publishes_per_s']:.2f}×"
                     if memory else "–")
        floor_ratio = (f"{row['publishes_per_s'] / floor['publishes_per_s']:.2f}×"
                       if floor else "–")
        low, high = row.get("range", (row["publishes_per_s"],) * 2)
        spread = f" ({low:,.0f}–{high:,.0f})" if high > low else ""
        if row["deliveries_per_s"] is None:
            deliveries, del_ratio, delivered = "–", "–", "–"
        else:
            deliveries = f"{row['deliveries_per_s']:,.0f}"
            del_ratio = (f"{row['deliveries_per_s'] / peer['deliveries_per_s']:.1f}×"
                         if peer and peer["deliveries_per_s"] else "–")
            delivered = f"{row['delivered']:,}/{row['expected']:,}"
            if row["repeats"]:
                delivered += f" ({row['repeats']} repeated)"
            if row["gaps"]:
                delivered += f" ({row['gaps']} gaps)"
        out.append(f"| {row['server']} | {row['subscribers']} | {row['publishes_per_s']:,.0f}"
                   f"{spread} | {floor_ratio} | {mem_ratio} | {pub_ratio} | {deliveries} | "
                   f"{del_ratio} | {delivered} |")
    return "\n".join(out)


async def main_async(args):
    servers = args.servers.split(",")
    fanout_rows, throughput_rows, failed = [], [], []
    if args.warm_up and not args.throughput_only:
        # The first server a run starts measures slower than the same server
        # later in the run (the load generator's own first use of its sockets,
        # allocator and caches): one whole row, thrown away, takes that cost
        # so that the first row of the table is measured like the others.
        clients = min(int(n) for n in args.clients.split(","))
        print(f"warm-up (not reported): {servers[0]}, N={clients} ...",
              file=sys.stderr, flush=True)
        try:
            await fanout(servers[0], clients, args.messages, args.rate,
                         min(1.0, args.idle_seconds), args.drain)
        except Exception as exc:
            print(f"  warm-up failed: {exc!r}", file=sys.stderr)
    if not args.throughput_only:
        for clients in (int(n) for n in args.clients.split(",")):
            # Latency at a full core swings with when each side gets the CPU:
            # with --fanout-repeat, rounds of every server in turn, and the
            # median row of each by its median latency.
            runs = {name: [] for name in servers}
            for round_ in range(args.fanout_repeat):
                for name in servers:
                    print(f"fan-out: {name}, N={clients} ({round_ + 1}/{args.fanout_repeat})"
                          " ...", file=sys.stderr, flush=True)
                    try:
                        runs[name].append(await fanout(name, clients, args.messages, args.rate,
                                                       args.idle_seconds, args.drain))
                    except Exception as exc:  # one server failing must not end the matrix
                        print(f"  {name} failed at N={clients}: {exc!r}", file=sys.stderr)
                        failed.append(f"{name} at N={clients}: {exc!r}")
            fanout_rows += [_median_fanout(rows) for rows in runs.values() if rows]
    if not args.fanout_only:
        for count in (int(k) for k in args.subscribers.split(",")):
            # A ping-pong between two processes swings with where the
            # scheduler puts them: rounds of every server in turn, and the
            # median of each, so that drift over minutes hits all alike.
            runs: dict[str, list[dict]] = {name: [] for name in servers}
            for round_ in range(args.repeat):
                for name in servers:
                    print(f"throughput: {name}, K={count} ({round_ + 1}/{args.repeat}) ...",
                          file=sys.stderr, flush=True)
                    try:
                        runs[name].append(await throughput(name, count, args.publishes,
                                                           args.drain))
                    except Exception as exc:
                        print(f"  {name} failed at K={count}: {exc!r}", file=sys.stderr)
                        failed.append(f"{name} at K={count}: {exc!r}")
            throughput_rows += [_median_row(rows) for rows in runs.values() if rows]
    command = "python3 bench/run.py " + " ".join(sys.argv[1:])
    report = [f"`{command.strip()}` — {os.cpu_count()} cores, Python "
              f"{sys.version.split()[0]}, {time.strftime('%Y-%m-%d')}\n"]
    if fanout_rows:
        rounds = (f"; {args.fanout_repeat} rounds, each server in turn: the round with "
                  "the median p50 (the p50s' range in brackets), and the median CPU"
                  if args.fanout_repeat > 1 else "")
        report.append(f"Fan-out: {args.messages} messages at {args.rate:g}/s to N parked "
                      f"subscribers (idle CPU over {args.idle_seconds:g} s with all "
                      f"parked){rounds}.\n")
        report.append(fanout_table(fanout_rows) + "\n")
    if throughput_rows:
        report.append(f"Throughput: {args.publishes} publishes back-to-back over one "
                      "keep-alive connection, K subscribers parked; the median of "
                      f"{args.repeat} rounds, each server in turn (the range in brackets).\n")
        report.append(throughput_table(throughput_rows) + "\n")
    print("\n".join(report))
    if args.output:
        kept = ""  # the sections of `longpoll bench` and bench/breakdown.py: kept as they are
        try:
            with open(args.output, encoding="utf-8") as f:
                old = f.read()
            starts = [at for at in (old.find("<!-- longpoll bench:"),
                                    old.find("<!-- breakdown:")) if at >= 0]
            if starts:
                kept = "\n" + old[min(starts):]
        except FileNotFoundError:
            pass
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(PAGE.format(report="\n".join(report).rstrip() + "\n") + kept)
        print(f"wrote {args.output}", file=sys.stderr)
    if args.check:  # the smoke check: every row ran, and delivered everything once
        failed += [f"{row['server']}: delivered {row['delivered']:,} of {row['expected']:,}"
                   f", {row['repeats']} repeated" for row in fanout_rows + throughput_rows
                   if row.get("expected") and (row["delivered"] != row["expected"]
                                               or row["repeats"])]
        for problem in failed:
            print(f"check failed: {problem}", file=sys.stderr)
        return 1 if failed else 0
    return 0


# docs/performance.md, as --output writes it: this text, then the run's tables.
PAGE = """\
# Performance

This page is written by `bench/run.py --output docs/performance.md`; edit
the script, not the page. Every row starts its server afresh, and every
ratio is against a baseline measured in the same run on the same machine
(the load generator runs there too).

```sh
python3 -m pip install -r bench/requirements.txt   # tornado, for its baseline only
python3 bench/run.py --output docs/performance.md  # the whole matrix, about 30 minutes
```

- **longpoll**: `python3 -m longpoll serve`; **longpoll-sqlite** and
  **longpoll-redis** the same with `--store sqlite:FILE` and
  `--store redis://…` (a redis-server the script starts on a free port);
  **longpoll-ws** the same server with its subscribers on WebSockets
  (`/channels/bench/ws`) instead of long-polls.
- **floor**: `bench/servers/floor.py`, a minimal asyncio server that writes
  one pre-encoded answer to every parked socket and does nothing else: what
  any long-poll server must at least pay here.
- **tornado**: `bench/servers/tornado_server.py`, Tornado 6 in the pattern
  of its chat demo.
- **threaded**: `bench/servers/threaded.py`, one blocked thread per waiting
  client (`ThreadingHTTPServer` + `Condition.notify_all`).

Fan-out rows park N subscribers (raw keep-alive sockets, in a worker
process of `longpoll bench`), measure the server's CPU while all are
parked, then publish messages at a fixed rate from a process of their own,
each carrying its send time: delivered/expected, latency, server CPU per
delivered message (from `/proc`), memory and threads, and the share of a
core the load generator's busiest worker used. Throughput rows
publish back-to-back over one keep-alive connection from a separate
process, with K subscribers parked: publishes/s, and deliveries/s.

How to read it: CPU per delivery against the floor is the server's own
cost per message; latency grows once the one core the loop runs on is full
(then answers come in batches). A subscriber costs its machine about what
the server spends on it (the kernel's TCP work on both ends is most of
it), so near 100 % in the generator column the latency is mostly the
generator's own queue, for every server alike: on 2 cores, from about
N=5,000 at 10 messages a second. Serving parked clients costs the same with
every store, since reads come from memory; a publish costs one committed
insert with sqlite, and one script call to Redis (on a worker thread, so
the loop never waits). Run-to-run noise on a small machine is about ±20 %
for a fan-out row's CPU, and more for its latency once a core is full (the
floor's own median at N=5,000 ranged from 55 to 215 ms over five rounds):
`--fanout-repeat R` runs the fan-out rows in R rounds, every server in
turn, and shows the round with the median latency, with the range, and
the median CPU. A throughput row is a ping-pong between two processes,
which swings by ±40 % between identical runs with where the scheduler puts
them: it runs in rounds, every server in turn, and the median is shown
with the range. The first row of a run measures slower than the same
server later in it, so an untimed warm-up row comes first.
`python3 bench/memory.py` measures what slow readers cost in memory,
`python3 bench/tls.py` what TLS costs, and `python3 bench/instructions.py`
what a publish costs each server in instructions, counted under valgrind:
the K=0 row without its noise (under 1 % between runs), for telling a
change to the publish path apart; `--fanout` the same for one delivery to
a parked long-poll (its answer and the re-poll after it). `--baseline DIR`
runs an older checkout's `longpoll.py` beside this one.

{report}"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default="longpoll,longpoll-ws,floor,tornado,threaded")
    parser.add_argument("--baseline", metavar="DIR",
                        help="a folder holding another longpoll.py (e.g. a checkout of an "
                             "older commit), run as the server longpoll-baseline")
    parser.add_argument("--clients", default="1000,5000,10000", help="N for the fan-out rows")
    parser.add_argument("--messages", type=int, default=50)
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--drain", type=float, default=60.0,
                        help="seconds to wait for the last deliveries")
    parser.add_argument("--subscribers", default="0,100", help="K for the throughput rows")
    parser.add_argument("--publishes", type=int, default=5000)
    parser.add_argument("--fanout-repeat", type=int, default=1,
                        help="rounds of the fan-out rows (each server in turn); the round "
                             "with the median p50 latency is reported, with the range, and "
                             "the median CPU per delivery")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds of the throughput rows (each server in turn); the "
                             "median is reported, with the range")
    parser.add_argument("--no-warm-up", dest="warm_up", action="store_false",
                        help="skip the untimed fan-out row that runs first")
    parser.add_argument("--fanout-only", action="store_true")
    parser.add_argument("--throughput-only", action="store_true")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 unless every row ran and delivered every message once "
                             "(no timing is judged: CI runs a small matrix this way)")
    parser.add_argument("--output", metavar="FILE",
                        help="also write the page docs/performance.md is (its text, then "
                             "the tables)")
    args = parser.parse_args()
    global BASELINE
    BASELINE = os.path.abspath(args.baseline) if args.baseline else ROOT
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        status = asyncio.run(main_async(args))
    finally:
        if Redis.url:
            Redis.proc.terminate()
    sys.exit(status)


if __name__ == "__main__":
    main()
