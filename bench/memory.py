"""Memory under clients that never read: the server's RSS over time.

    python bench/memory.py                       # 4 streams, 1 MiB at 20/s for 30 s
    python bench/memory.py --streams 8 --seconds 10 --retention 50

Starts `python -m longpoll serve` (this checkout's, or --module DIR's),
opens N event streams (SSE) that never read a byte (small receive
buffers), then publishes messages of --size bytes at --rate per second for
--seconds over one keep-alive connection, sampling the server's RSS from
/proc every 0.2 s. Prints RSS at rest, the peak, the RSS once the
publishing stopped and the streams were cut, and how many were cut
(/metrics). --retention bounds the channel's own history (which is kept
whatever the clients do: retention x size bytes).
"""
import argparse
import http.client
import os
import re
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--size", type=int, default=1 << 20)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--retention", type=int, default=20)
    parser.add_argument("--module", default=ROOT, help="folder holding the longpoll.py to run")
    args = parser.parse_args()
    proc = subprocess.Popen(
        [sys.executable, "-m", "longpoll", "serve", "--port", "0", "--retention",
         str(args.retention), "--max-body", str(args.size + 1024)],
        cwd=args.module, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        while url is None:
            line = proc.stderr.readline()
            if not line:
                raise SystemExit("the server did not start")
            match = re.search(r"listening on http://([\d.]+):(\d+)", line)
            if match:
                host, port = match.group(1), int(match.group(2))
                url = True
        streams = []
        for _ in range(args.streams):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((host, port))
            sock.sendall(b"GET /channels/mem/events HTTP/1.1\r\nHost: b\r\n\r\n")
            streams.append(sock)
        time.sleep(0.5)
        at_rest = rss_mb(proc.pid)
        conn = http.client.HTTPConnection(host, port, timeout=30)
        body = b"m" * args.size
        peak, start = at_rest, time.monotonic()
        sent = 0
        while time.monotonic() - start < args.seconds:
            conn.request("POST", "/channels/mem", body)
            conn.getresponse().read()
            sent += 1
            next_at = start + sent / args.rate
            while time.monotonic() < next_at:
                peak = max(peak, rss_mb(proc.pid))
                time.sleep(min(0.2, max(0.0, next_at - time.monotonic())))
            peak = max(peak, rss_mb(proc.pid))
        time.sleep(1.0)
        after = rss_mb(proc.pid)
        conn.request("GET", "/metrics")
        metrics = conn.getresponse().read().decode()
        cut = re.search(r"longpoll_slow_clients_cut_total (\d+)", metrics)
        print(f"`python bench/memory.py --streams {args.streams} --size {args.size} "
              f"--rate {args.rate:g} --seconds {args.seconds:g} --retention {args.retention}`")
        print()
        print("| published | RSS at rest MB | peak RSS MB | RSS after MB | streams cut |")
        print("|---:|---:|---:|---:|---:|")
        print(f"| {sent} x {args.size} B | {at_rest:.0f} | {peak:.0f} | {after:.0f} | "
              f"{cut.group(1) if cut else 'n/a'} of {args.streams} |")
        for sock in streams:
            sock.close()
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
