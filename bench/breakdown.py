"""Where the server's time goes: bench/run.py's fan-out or throughput row
against `python3 -m longpoll serve` run under cProfile, then the functions
that cost most, as shares of the loop thread's time and as microseconds per
delivered message (fan-out) or per publish (throughput).

    python3 bench/breakdown.py fanout --clients 1000      # 30 messages to 1,000 parked
    python3 bench/breakdown.py throughput                  # 2,000 publishes, nobody parked
    python3 bench/breakdown.py throughput --subscribers 100 --top 40
    python3 bench/breakdown.py --output docs/performance.md   # both, into the page

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
    parser.add_argument("row", choices=("fanout", "throughput"), nargs="?", default="fanout")
    parser.add_argument("--clients", type=int, default=1000, help="N for fan-out")
    parser.add_argument("--messages", type=int, default=30)
    parser.add_argument("--rate", type=float, default=4.0,
                        help="fan-out messages per second: low enough that the profiled "
                             "loop (twice as slow) keeps up, as the real one does at 10/s")
    parser.add_argument("--subscribers", type=int, default=0, help="K for throughput")
    parser.add_argument("--publishes", type=int, default=2000)
    parser.add_argument("--store", help="serve --store URL (sqlite:FILE, redis://...)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--output", metavar="FILE",
                        help="run both rows (fan-out at --clients, throughput with K=0) "
                             "and write them as the section \"Where the time goes\" of "
                             "FILE (docs/performance.md), replacing the one there")
    args = parser.parse_args()
    if args.output:
        return write_section(args)
    print(report(*profile(args, args.row), args.top))


def profile(args, row):
    """Run one row against a profiled serve: (stats, unit, count)."""
    out = os.path.join(tempfile.mkdtemp(), "serve.prof")
    command = [sys.executable, os.path.abspath(__file__), "--serve", out, "serve",
               "--port", "0", "-q", "--max-timeout", "3600"]
    if args.store:
        command += ["--store", args.store]
    run.SERVERS["longpoll-profiled"] = command
    if row == "fanout":
        result = asyncio.run(run.fanout("longpoll-profiled", args.clients, args.messages,
                                        args.rate, 0.5, 60.0))
        return pstats.Stats(out), "delivery", result["delivered"]
    asyncio.run(run.throughput("longpoll-profiled", args.subscribers, args.publishes, 60.0))
    return pstats.Stats(out), "publish", args.publishes


START, END = "<!-- breakdown: bench/breakdown.py --output writes this section -->", \
    "<!-- end of breakdown -->"


def write_section(args):
    fanout = report(*profile(args, "fanout"), args.top)
    args.subscribers = 0
    publish = report(*profile(args, "throughput"), args.top)
    section = f"""{START}
## Where the time goes

`python3 bench/breakdown.py --output docs/performance.md` runs bench/run.py's
fan-out row (N={args.clients:,}) and its throughput row (K=0) against a
`serve` whose loop thread runs under cProfile, and sorts the loop's own
time into stages: reading the request (head, parameters, body), routing
with auth and rate limits, the hub (store, read, encode), waiting and
fan-out, writing the answer (response head, metrics, log), and the loop
with its socket calls (`send`, `recv`, `epoll` bookkeeping; the time
blocked in `epoll` is not work and is left out). cProfile slows every
call down, so read the shares; the µs are inflated about twofold against
the tables above. The fan-out row publishes {args.rate:g} messages a second:
slow enough that the profiled loop keeps up, as the real one does at 10
(a loop that falls behind answers most re-polls at once from what it
already read, a different path from the one measured in the tables).

### Per delivery: N={args.clients:,} parked, {args.messages} messages at {args.rate:g}/s

{fanout}
### Per publish: one keep-alive publisher, nobody parked

{publish}{END}
"""
    try:
        with open(args.output, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        text = ""
    if START in text and END in text:
        text = text[:text.index(START)] + section.rstrip("\n") + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote the breakdown into {args.output}", file=sys.stderr)
    return 0


# Where each part of longpoll.py belongs: by class, then module functions.
STAGES = {
    "read the request": ("RequestReader", "Request", "_parse_query", "_header_name",
                         "_channels_in_path", "_check_channels", "check_channel",
                         "param_timeout", "param_limit", "publish_body", "handle_poll",
                         "handle_publish", "handle_send", "handle_events", "handle"),
    "route, auth, limits": ("decide", "route", "token", "client_address", "client_key",
                            "limit", "cors_headers", "on_worker", "auth", "RateLimit",
                            "Auth"),
    "hub: store, read, encode": ("Hub", "Channel", "Message", "Batch", "Position",
                                 "IdempotencyKeys", "WorkQueue", "Store", "SqliteStore",
                                 "RedisStore", "_RedisClient", "_encode", "_decode",
                                 "_decode_publish", "_verbatim", "_Verbatim", "_sse_events",
                                 "json"),
    "wait and fan out": ("Waiters", "_Group"),
    "write the answer": ("HTTPProtocol", "_response", "_json_body", "Metrics",
                         "_error_response", "json", "isEnabledFor", "formatdate"),
    "loop and socket calls": ("Loop", "Connection", "_Epoll", "_Selector", "HoldTimers",
                              "selectors", "socket"),
}


def owners():
    """longpoll.py's line numbers -> the class (or module function) there."""
    path = os.path.join(os.path.dirname(HERE), "longpoll.py")
    spans, current = [], None
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.startswith("class "):
                current = line[6:].split("(")[0].split(":")[0].strip()
            elif line.startswith("def "):
                current = line[4:].split("(")[0].strip()
            elif line[:1] not in ("", " ", "\n", "#", ")", "@") and not line.startswith('"'):
                current = None
            spans.append(current)
    return spans


def stage_of(key, spans):
    filename, line, name = key
    base = os.path.basename(filename)
    if base == "longpoll.py":
        owner = spans[line - 1] if 0 < line <= len(spans) else None
        if owner in ("Handler", "Server"):  # their methods belong to several stages
            for stage, parts in STAGES.items():
                if name in parts:
                    return stage
        for stage, parts in STAGES.items():
            if owner in parts:
                return stage
        return "other"
    if base in ("encoder.py", "decoder.py", "__init__.py") and "json" in filename:
        return "hub: store, read, encode"
    if base == "selectors.py" or "_socket.socket" in name or "select.epoll" in name:
        return "loop and socket calls"
    if name in ("isEnabledFor", "formatdate"):
        return "write the answer"
    return "other"


def report(stats, unit, count, top):
    """The breakdown as Markdown: time per stage, then the costliest functions."""
    waiting = sum(own for (_, _, name), (_, _, own, _, _) in stats.stats.items()
                  if "of 'select.epoll' objects" in name)
    busy = stats.total_tt - waiting  # (the loop's time blocked in epoll is not work)
    per = max(count, 1)
    plural = {"publish": "publishes", "delivery": "deliveries"}[unit]
    spans = owners()
    stages: dict[str, float] = {}
    for key, (_, _, own, _, callers) in stats.stats.items():
        if "of 'select.epoll' objects" in key[2]:
            continue
        stage = stage_of(key, spans)
        if stage == "other" and callers:  # a builtin (len, dict.get, ...): its callers' stages
            for caller, (_, _, part, _) in callers.items():
                owner = stage_of(caller, spans)
                stages[owner] = stages.get(owner, 0.0) + part
            continue
        stages[stage] = stages.get(stage, 0.0) + own
    lines = [f"`python3 bench/breakdown.py {' '.join(sys.argv[1:])}`: the loop thread "
             f"worked {busy:.2f} s under cProfile (and waited {waiting:.2f} s in epoll) for "
             f"{count:,} {plural}: {busy / per * 1e6:.1f} µs of work per {unit}, profiled.",
             "", f"| stage | share of the work | µs per {unit}, profiled |", "|---|---:|---:|"]
    for stage, own in sorted(stages.items(), key=lambda item: -item[1]):
        lines.append(f"| {stage} | {own / busy * 100:.0f} % | {own / per * 1e6:.1f} |")
    lines += ["", f"| function | share of the work | µs per {unit} | calls per {unit} |",
              "|---|---:|---:|---:|"]
    rows = sorted(((key, value) for key, value in stats.stats.items()
                   if "select.epoll" not in key[2]), key=lambda item: -item[1][2])
    for (filename, line, name), (_, calls, own, _, _) in rows[:top]:
        where = f"{os.path.basename(filename)}:{line}({name})" if line else name
        lines.append(f"| `{where}` | {own / busy * 100:.1f} % | {own / per * 1e6:.2f} | "
                     f"{calls / per:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
