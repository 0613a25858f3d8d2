"""Where the server's time goes: bench/run.py's fan-out or throughput row
against `python3 -m longpoll serve` run under cProfile, then the functions
that cost most, as shares of the loop thread's time and as microseconds per
delivered message (fan-out) or per publish (throughput).

    python3 bench/breakdown.py fanout --clients 1000      # 50 messages to 1,000 parked
    python3 bench/breakdown.py throughput                  # 2,000 publishes, nobody parked
    python3 bench/breakdown.py throughput --subscribers 100 --top 40

cProfile slows the server down about twofold, evenly enough that the shares
are what to read; the absolute figures are bench/run.py's. Only the loop
thread is profiled: worker threads (large bodies, Redis) are not.
"""
import argparse
import asyncio
import cProfile
import os
import pstats
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run  # noqa: E402  (bench/run.py: its servers, load and measurements)


def serve_profiled(out, argv):
    """`longpoll serve` with its loop thread under cProfile; the stats go
    to *out* when the loop ends (SIGTERM)."""
    sys.path.insert(0, os.path.dirname(HERE))
    import longpoll
    serve_forever = longpoll.Server.serve_forever

    def profiled(self, *args, **kwargs):
        profile = cProfile.Profile()
        profile.enable()
        try:
            serve_forever(self, *args, **kwargs)
        finally:
            profile.disable()
            profile.dump_stats(out)

    longpoll.Server.serve_forever = profiled
    return longpoll.main(argv)


def main():
    if sys.argv[1:2] == ["--serve"]:
        sys.exit(serve_profiled(sys.argv[2], sys.argv[3:]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("row", choices=("fanout", "throughput"))
    parser.add_argument("--clients", type=int, default=1000, help="N for fan-out")
    parser.add_argument("--messages", type=int, default=50)
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--subscribers", type=int, default=0, help="K for throughput")
    parser.add_argument("--publishes", type=int, default=2000)
    parser.add_argument("--store", help="serve --store URL (sqlite:FILE, redis://...)")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    out = os.path.join(tempfile.mkdtemp(), "serve.prof")
    command = [sys.executable, os.path.abspath(__file__), "--serve", out, "serve",
               "--port", "0", "-q", "--max-timeout", "3600"]
    if args.store:
        command += ["--store", args.store]
    run.SERVERS["longpoll-profiled"] = command
    if args.row == "fanout":
        row = asyncio.run(run.fanout("longpoll-profiled", args.clients, args.messages,
                                     args.rate, 0.5, 60.0))
        unit, count = "delivery", row["delivered"]
    else:
        row = asyncio.run(run.throughput("longpoll-profiled", args.subscribers,
                                         args.publishes, 60.0))
        unit, count = "publish", args.publishes
    stats = pstats.Stats(out)
    waiting = sum(own for (_, _, name), (_, _, own, _, _) in stats.stats.items()
                  if name in ("<method 'poll' of 'select.epoll' objects>",
                              "<method 'select' of 'select.epoll' objects>"))
    busy = stats.total_tt - waiting  # (the loop's time blocked in epoll is not work)
    per = max(count, 1)
    plural = {"publish": "publishes", "delivery": "deliveries"}[unit]
    print(f"`python3 bench/breakdown.py {' '.join(sys.argv[1:])}`: the loop thread worked "
          f"{busy:.2f} s under cProfile (and waited {waiting:.2f} s in epoll) for "
          f"{count:,} {plural}: {busy / per * 1e6:.1f} µs of work per {unit}, profiled.\n")
    print(f"| function | share of the work | µs per {unit} | calls per {unit} |")
    print("|---|---:|---:|---:|")
    rows = sorted(((key, value) for key, value in stats.stats.items()
                   if "select.epoll" not in key[2]), key=lambda item: -item[1][2])
    for (filename, line, name), (_, calls, own, _, _) in rows[:args.top]:
        where = f"{os.path.basename(filename)}:{line}({name})" if line else name
        print(f"| `{where}` | {own / busy * 100:.1f} % | {own / per * 1e6:.2f} | "
              f"{calls / per:.2f} |")


if __name__ == "__main__":
    main()
