"""What pattern subscriptions cost a publish, in-process: Hub.publish with
100 subscriptions waiting on a pattern (``ci-*``) against 100 waiting on
the channel itself (``ci-main``), as microseconds per publish and as a
ratio measured in the same run. Each round parks the 100 (``Hub.watch``,
as a server's waiting requests do), then times the publish that wakes
them; rows take turns, seven times, and the best turn of each is shown.

    python3 bench/patterns.py                  # 2,000 rounds each
    python3 bench/patterns.py --rounds 10000 --module DIR   # another checkout's longpoll.py

Two shapes: 100 subscribers on one pattern (what 100 browsers of one page
are), and 100 distinct patterns (``ci-0*`` ... ``ci-99*``) against 100
distinct channels of which the publish reaches one. The issue's bar: the
pattern rows cost at most 1.5x their plain rows.
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(longpoll, names, channel, rounds):
    """µs per publish to *channel*, with one watch on each of *names*
    parked before each publish, over *rounds* publishes."""
    hub = longpoll.Hub(retention=100)
    for name in range(200):
        hub.publish(f"other-{name}", 0)  # channels besides: a pattern must pass them by

    def noop():
        pass

    spent = 0.0
    for _ in range(rounds):
        cancels = [hub.watch(name, noop) for name in names]
        started = time.perf_counter()
        hub.publish(channel, "a message of some thirty bytes")
        spent += time.perf_counter() - started
        for cancel in cancels:
            cancel()
    hub.close()
    return spent / rounds * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--module", metavar="DIR", default=ROOT,
                        help="the folder whose longpoll.py to measure")
    args = parser.parse_args()
    sys.path.insert(0, os.path.abspath(args.module))
    import longpoll

    rows = [
        ("100 on one channel", ["ci-main"] * 100, "ci-main"),
        ("100 on one pattern", ["ci-*"] * 100, "ci-main"),
        ("100 channels, one published to", [f"ci-{i}" for i in range(100)], "ci-7"),
        ("100 patterns, one matching", [f"ci-{i}*" for i in range(100)], "ci-7"),
    ]
    # Rows take turns, seven times; each row's best turn is reported (this
    # machine's noise only ever adds time).
    results = {label: float("inf") for label, _, _ in rows}
    for _ in range(7):
        for label, names, channel in rows:
            results[label] = min(results[label], measure(longpoll, names, channel,
                                                         args.rounds))
    print(f"`python3 bench/patterns.py {' '.join(sys.argv[1:])}`".replace(" `", "`"))
    print()
    print("| subscriptions waiting | µs per publish | vs plain |")
    print("|---|---:|---:|")
    for (label, _, _), plain in zip(rows, [rows[0][0], rows[0][0], rows[2][0], rows[2][0]]):
        print(f"| {label} | {results[label]:.1f} | {results[label] / results[plain]:.2f}× |")


if __name__ == "__main__":
    main()
