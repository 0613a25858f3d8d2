"""Idle cost of parked long-poll clients.

Starts `python -m longpoll serve` as a subprocess, measures its CPU over a
window with no client (the baseline, same run), parks N raw HTTP/1.1
clients, waits until /health reports them all waiting, measures the same
window again, then publishes one message and checks every client got it.

    python bench/idle.py --clients 500 --seconds 10

Prints a Markdown table. CPU is read from /proc/PID/stat (Linux only).
"""
import argparse
import asyncio
import json
import os
import re
import resource
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def status(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return {"rss_mb": int(out["VmRSS"].split()[0]) / 1024, "threads": int(out["Threads"])}


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=10) as resp:
        return json.loads(resp.read())


def start_server() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "longpoll", "serve", "--port", "0", "-q",
                             "--max-timeout", "600"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        match = re.search(r"listening on (http://\S+)", line)
        if match:
            return proc, match.group(1)
    raise RuntimeError("server did not start")


def measure(pid: int, seconds: float) -> float:
    """Fraction of one core the process used over *seconds*."""
    before, start = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - before) / (time.monotonic() - start)


async def park(host: str, port: int, n: int) -> list:
    clients = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /channels/idle?timeout=600 HTTP/1.1\r\nHost: bench\r\n\r\n")
        clients.append((reader, writer))
    return clients


async def collect(clients: list, timeout: float) -> int:
    async def one(reader):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
        body = json.loads(await reader.readexactly(length))
        return len(body["messages"]) == 1
    results = await asyncio.wait_for(asyncio.gather(*(one(r) for r, _ in clients)), timeout)
    for _, writer in clients:
        writer.close()
    return sum(results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.clients * 2 + 100)), hard))

    proc, url = start_server()
    host, port = url.rsplit("//", 1)[1].rsplit(":", 1)
    try:
        baseline = measure(proc.pid, args.seconds)
        base_status = status(proc.pid)
        loop = asyncio.new_event_loop()
        clients = loop.run_until_complete(park(host, int(port), args.clients))
        deadline = time.monotonic() + 60
        while health(url)["waiting"] < args.clients:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {health(url)['waiting']} clients parked")
            time.sleep(0.1)
        parked = measure(proc.pid, args.seconds)
        parked_status = status(proc.pid)
        req = urllib.request.Request(url + "/channels/idle", data=b"wake", method="POST")
        urllib.request.urlopen(req, timeout=10).close()
        delivered = loop.run_until_complete(collect(clients, 60))
    finally:
        proc.terminate()
        proc.wait(10)

    print(f"`python bench/idle.py --clients {args.clients} --seconds {args.seconds:g}`\n")
    print("| state | CPU (% of one core) | RSS (MB) | threads |")
    print("|---|---:|---:|---:|")
    print(f"| no client (baseline) | {baseline * 100:.2f} | {base_status['rss_mb']:.1f} | "
          f"{base_status['threads']} |")
    print(f"| {args.clients} parked | {parked * 100:.2f} | {parked_status['rss_mb']:.1f} | "
          f"{parked_status['threads']} |")
    print(f"\nparked minus baseline: {(parked - baseline) * 100:.2f} % of one core; "
          f"one publish delivered to {delivered}/{args.clients}")
    return 0 if delivered == args.clients else 1


if __name__ == "__main__":
    sys.exit(main())
