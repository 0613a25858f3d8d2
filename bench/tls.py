"""What TLS costs: plain HTTP against HTTPS on the same server build, same run.

    python bench/tls.py                 # needs the openssl command

Rows: publishes/s back-to-back over one keep-alive connection; connections
per second (a new connection, one request, closed: where the handshake
shows); and one message fanned out to N parked keep-alive clients (time
until all have it). Each row runs `python -m longpoll serve` fresh, with and
without --certfile, and prints the ratio TLS/plain.
"""
import argparse
import http.client
import os
import re
import ssl
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def serve(*extra):
    proc = subprocess.Popen([sys.executable, "-m", "longpoll", "serve", "--port", "0", "-q",
                             *extra], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        match = re.search(r"listening on https?://([\d.]+):(\d+)", line)
        if match:
            return proc, match.group(1), int(match.group(2))
    raise RuntimeError("the server did not start")


def connect(host, port, context):
    if context is None:
        return http.client.HTTPConnection(host, port, timeout=30)
    return http.client.HTTPSConnection("localhost", port, timeout=30, context=context)


def publishes(host, port, context, count):
    conn = connect(host, port, context)
    start = time.perf_counter()
    for i in range(count):
        conn.request("POST", "/channels/b", str(i))
        conn.getresponse().read()
    conn.close()
    return count / (time.perf_counter() - start)


def connections(host, port, context, count):
    start = time.perf_counter()
    for _ in range(count):
        conn = connect(host, port, context)
        conn.request("GET", "/health")
        conn.getresponse().read()
        conn.close()
    return count / (time.perf_counter() - start)


def fanout(host, port, context, clients):
    conns = [connect(host, port, context) for _ in range(clients)]
    for conn in conns:
        conn.request("GET", "/channels/f?timeout=60")
    while True:  # until all are parked
        probe = connect(host, port, context)
        probe.request("GET", "/health")
        if b'"waiting":%d' % clients in probe.getresponse().read().replace(b" ", b""):
            break
        time.sleep(0.05)
    done = threading.Barrier(2)
    start = time.perf_counter()

    def read_all():
        for conn in conns:
            conn.getresponse().read()
        done.wait()

    threading.Thread(target=read_all, daemon=True).start()
    probe.request("POST", "/channels/f", "go")
    probe.getresponse().read()
    done.wait()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--publishes", type=int, default=3000)
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--clients", type=int, default=500)
    args = parser.parse_args()
    folder = tempfile.mkdtemp()
    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", key, "-out", cert],
                   check=True, capture_output=True)
    context = ssl.create_default_context(cafile=cert)
    rows = [("publishes/s, one keep-alive connection", publishes, args.publishes, True),
            ("new connections/s (one request each)", connections, args.connections, True),
            (f"one message to {args.clients} parked clients (ms until all have it)", fanout,
             args.clients, False)]
    print(f"`python bench/tls.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
          f"— {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
          f"{ssl.OPENSSL_VERSION}, {time.strftime('%Y-%m-%d')}\n")
    print("| measure | plain HTTP | HTTPS | HTTPS / plain |\n|---|---:|---:|---:|")
    for title, measure, amount, higher_is_better in rows:
        results = []
        for tls in (False, True):
            proc, host, port = serve(*(["--certfile", cert, "--keyfile", key] if tls else []))
            try:
                results.append(measure(host, port, context if tls else None, amount))
            finally:
                proc.terminate()
                proc.wait(10)
        plain, secure = results if higher_is_better else [r * 1000 for r in results]
        print(f"| {title} | {plain:,.0f} | {secure:,.0f} | {secure / plain:.2f}× |")


if __name__ == "__main__":
    main()
