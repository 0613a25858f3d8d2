"""Shared fixtures: real longpoll servers on ephemeral ports, real HTTP."""
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import longpoll  # noqa: E402

E2E = os.environ.get("LONGPOLL_E2E") == "1"

# A shell without job control starts background commands with Ctrl-C
# ignored, and children inherit that: the tests that press Ctrl-C on a
# `python -m longpoll` process would then wait for it in vain. Children of
# a handled SIGINT start with the default again.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def wait_until(predicate, timeout=10.0, interval=0.01, what="condition"):
    """Poll *predicate* until it is true or *timeout* passes (then fail)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


class Clock:
    """A wall clock a test moves by hand: set as ``hub.clock``, it stamps
    messages and drives expiry, schedules and silence alerts."""

    def __init__(self, now=1_800_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


def parked_on(server, channel):
    """How many requests *server* holds parked (polls and streams) on
    *channel*: a test publishes "from now on" only once its reader waits."""
    while True:
        try:
            if isinstance(server, AsgiServer):  # (its waiting requests, by their watch)
                return sum(len(watch.waiters) for (names, _), watch in list(
                    server.app._watches.items()) if channel in names)
            groups = list(server.waiters.groups.values())
            return sum(len(g.conns) for g in groups if channel in g.key[0])
        except RuntimeError:  # changed by the loop thread while read: again
            continue


class Response:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    @property
    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<Response {self.status} {self.body[:200]!r}>"


def request(server, method, path, body=None, headers=None, timeout=10, conn=None):
    """One real HTTP request with http.client; reuses *conn* if given."""
    own = conn is None
    if own:
        host, port = server.server_address[:2]
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        if isinstance(body, str):
            body = body.encode()
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return Response(resp.status, resp.headers, resp.read())
    finally:
        if own:
            conn.close()


def raw(server, data, timeout=5):
    """Send raw bytes; return what the server sends, up to the end of its
    first complete response or until it closes the connection."""
    return talk(server, data, timeout, until=_complete)


def _complete(data):
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def parse_raw(data):
    """(status, json body) of the first response in *data*."""
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    return status, json.loads(body[:length])


@pytest.fixture
def make_server():
    """Factory: a started server on 127.0.0.1 port 0; closed on teardown."""
    servers = []

    def factory(hub=None, port=0, **options):
        options.setdefault("read_timeout", 10.0)
        server = longpoll.make_server("127.0.0.1", port, hub, **options).start()
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.close()
        assert server._thread is None or not server._thread.is_alive()


@pytest.fixture
def server(request, make_server):
    """A started server; for a test marked ``asgi_too``, also (a second
    run) the ASGI app under uvicorn: the two implementations must agree."""
    if getattr(request, "param", "serve") == "asgi":
        served = AsgiServer()
        yield served
        served.close()
    else:
        yield make_server()


def pytest_configure(config):
    config.addinivalue_line("markers", "asgi_too: run with the server fixture as serve "
                            "and as longpoll.asgi_app under uvicorn")
    config.addinivalue_line("markers", "serve_only: not with asgi_too (a test of serve's "
                            "own HTTP reader or loop, which a host server replaces)")


def pytest_generate_tests(metafunc):
    marked = metafunc.definition.get_closest_marker
    if "server" in metafunc.fixturenames and marked("asgi_too") and not marked("serve_only"):
        metafunc.parametrize("server", ["serve", "asgi"], indirect=True)


class AsgiServer:
    """``longpoll.asgi_app`` served by uvicorn from a thread of this process
    on a free port: what a test needs of a ``Server`` (``url``, ``hub``,
    ``waiting``, ``requests``, ``close``)."""

    def __init__(self, hub=None, **options):
        try:
            import uvicorn
        except ImportError:
            if E2E:
                pytest.fail("uvicorn is missing (pip install uvicorn)")
            pytest.skip("uvicorn is missing (pip install uvicorn)")
        self.app = longpoll.asgi_app(hub, **options)
        self.hub = self.app.hub
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.server_address = sock.getsockname()
        self.url = "http://%s:%d" % self.server_address
        self._uvicorn = uvicorn.Server(uvicorn.Config(
            self.app, log_level="warning", lifespan="on", ws_max_size=1 << 20,
            timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [sock]},
                                        daemon=True)
        self._thread.start()
        wait_until(lambda: self._uvicorn.started, what="uvicorn to start")

    @property
    def waiting(self):
        return self.app.waiting

    @property
    def requests(self):
        return self.app.requests

    def close(self):
        self.app.close()  # (answers the waiting requests, so uvicorn need not wait for them)
        self._uvicorn.should_exit = True
        self._thread.join(10)
        assert not self._thread.is_alive()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server on a free port, for the session: its base URL."""
    import shutil
    import subprocess
    if not shutil.which("redis-server"):
        if E2E:
            pytest.fail("redis-server is missing (apt-get install redis-server)")
        pytest.skip("redis-server is missing (apt-get install redis-server)")
    try:
        import redis
    except ImportError:
        if E2E:
            pytest.fail("the redis package is missing (pip install -e '.[test]')")
        pytest.skip("the redis package is missing (pip install -e '.[test]')")
    folder = tmp_path_factory.mktemp("redis")
    for _ in range(5):  # a free port can be taken between the check and the bind
        port = free_port()
        proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=port, socket_connect_timeout=1)
        try:
            wait_until(lambda: proc.poll() is not None or _pings(client), timeout=10,
                       what="redis-server to start")
        finally:
            client.close()
        if proc.poll() is None:
            break
    else:
        pytest.fail("redis-server would not start")
    yield f"redis://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


def _pings(client):
    try:
        return client.ping()
    except Exception:
        return False


@pytest.fixture
def redis_url(redis_server):
    """A Redis database emptied for this test."""
    import redis
    client = redis.Redis.from_url(redis_server + "/0")
    client.flushdb()
    client.close()
    return redis_server + "/0"


def talk(server, data, timeout=5, source=None, pieces=None, until=None):
    """Send *data* raw (in *pieces* of these sizes, if given) from *source*
    (an address to bind), then read until the server closes, goes quiet
    for *timeout* seconds, or what it sent satisfies *until*; return it."""
    host, port = server.server_address[:2]
    sock = socket.create_connection((host, port), timeout=timeout,
                                    source_address=(source, 0) if source else None)
    with sock:
        try:
            if pieces:
                at = 0
                for size in pieces:
                    sock.sendall(data[at:at + size])
                    at += size
                sock.sendall(data[at:])
            else:
                sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before taking it all
        received = b""
        while until is None or not until(received):
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                if until is not None:
                    raise
                break
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
    return received


def strict_responses(data):
    """The responses in *data* as a strict HTTP parser (h11) reads them:
    [(status, {lower-case header: value}, body)]. Fails on anything h11
    refuses; stops after a response that closes the connection."""
    import h11
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(data)
    conn.receive_data(b"")  # and then the server closed (or went quiet)
    out = []
    while True:
        conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        status, headers, body = None, None, b""
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                if status is None and out:  # closed between two responses
                    return out
                raise
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
        if status is None:
            return out
        out.append((status, headers, body))
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
            return out
        conn.start_next_cycle()


class RedisProcess:
    """A redis-server of a test's own (no persistence, on a free port), which
    the test may pause (SIGSTOP), resume, wipe, stop and start again."""

    def __init__(self, folder, password=None, unixsocket=None):
        import shutil
        if not shutil.which("redis-server"):
            if E2E:
                pytest.fail("redis-server is missing (apt-get install redis-server)")
            pytest.skip("redis-server is missing (apt-get install redis-server)")
        redis = pytest.importorskip("redis")
        self.port = free_port()
        extra = ["--requirepass", password] if password else []
        if unixsocket:
            extra += ["--unixsocket", str(unixsocket)]
        self.command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                        "--save", "", "--appendonly", "no", "--dir", str(folder), *extra]
        self.url = f"redis://{':' + password + '@' if password else ''}127.0.0.1:{self.port}/0"
        self.admin = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        self.start()

    def start(self):
        """Start redis-server (again, after ``stop``: empty) on its port."""
        import subprocess
        self.proc = subprocess.Popen(self.command, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_until(lambda: _pings(self.admin), what="redis-server to start")

    def stop(self):
        """Stop redis-server: its data is gone (no persistence), and so is
        every connection to it."""
        self.proc.terminate()
        self.proc.wait(10)

    def restart(self):
        self.stop()
        self.start()

    def pause(self):
        import signal
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self):
        import signal
        self.proc.send_signal(signal.SIGCONT)

    def wipe(self):
        self.admin.flushdb()

    def close(self):
        if self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            self.proc.wait(10)
        self.admin.close()


@pytest.fixture
def own_redis(tmp_path):
    redis = RedisProcess(tmp_path)
    yield redis
    redis.close()


@pytest.fixture(autouse=True)
def no_feed_thread_outlives_its_test():
    """A hub on a shared store that a test forgets to close goes on writing
    to Redis (its feed thread re-seeds a wiped database): fail that test."""
    yield
    import threading

    def feeds():
        return [t for t in threading.enumerate() if t.name == "longpoll-redis-feed"]
    wait_until(lambda: not feeds(), timeout=10, what="every Redis feed thread to end "
               "(close every Hub a test opens)")


# -- WebSocket, by hand (RFC 6455): for frames no library would send ----------

WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's own example key


class Stream:
    """A raw SSE client: reads events as they come."""

    def __init__(self, server, path, headers=""):
        host, port = server.server_address[:2]
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n{headers}\r\n".encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.sock.recv(65536)
        self.head, _, self.buf = self.buf.partition(b"\r\n\r\n")

    def blocks(self, count, timeout=10):
        """The next *count* blank-line-separated blocks (events or comments)."""
        deadline = time.monotonic() + timeout
        out = []
        while len(out) < count:
            if b"\n\n" in self.buf:
                block, _, self.buf = self.buf.partition(b"\n\n")
                out.append(block.decode())
                continue
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            assert chunk, f"stream closed after {out}"
            self.buf += chunk
        return out

    def events(self, count, timeout=10):
        """The next *count* events, skipping comments: [(id, event, data)]."""
        out = []
        while len(out) < count:
            for block in self.blocks(1, timeout):
                fields = dict(line.split(": ", 1) for line in block.split("\n")
                              if not line.startswith(":"))
                if fields:
                    out.append((fields.get("id"), fields.get("event"),
                                json.loads(fields["data"])))
        return out

    def close(self):
        self.sock.close()


def ws_open(server, path="/channels/ws/ws", headers=None, timeout=5):
    """A raw socket that has done the WebSocket handshake on *path*; returns
    (socket, status, head, rest): the bytes after the head are *rest*."""
    host, port = server.server_address[:2]
    sock = socket.create_connection((host, port), timeout=timeout)
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Key: {WS_KEY}",
             "Sec-WebSocket-Version: 13"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return sock, int(head.split(b" ", 2)[1]), head, rest


def ws_frame(payload, opcode=0x1, fin=True, mask=b"\x01\x02\x03\x04", rsv=0, length=None):
    """One client frame as given: masked with *mask* (None: unmasked), with
    *length* as the declared payload length if given (a lie, for tests)."""
    size = len(payload) if length is None else length
    first = (0x80 if fin else 0) | rsv << 4 | opcode
    masked = 0x80 if mask is not None else 0
    if size < 126:
        head = bytes((first, masked | size))
    elif size < 65536:
        head = bytes((first, masked | 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((first, masked | 127)) + size.to_bytes(8, "big")
    if mask is None:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class WsReader:
    """Reads a server's frames from a raw socket: (opcode, payload)."""

    def __init__(self, sock, rest=b""):
        self.sock, self.buf = sock, bytearray(rest)

    def _need(self, size):
        while len(self.buf) < size:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the server closed the connection")
            self.buf += chunk

    def frame(self):
        self._need(2)
        first, size = self.buf[0], self.buf[1] & 0x7F
        assert not self.buf[1] & 0x80, "a server's frames are never masked"
        start = 2
        if size == 126:
            self._need(4)
            size, start = int.from_bytes(self.buf[2:4], "big"), 4
        elif size == 127:
            self._need(10)
            size, start = int.from_bytes(self.buf[2:10], "big"), 10
        self._need(start + size)
        payload = bytes(self.buf[start:start + size])
        del self.buf[:start + size]
        return first & 0x0F, payload

    def close_code(self):
        """Frames up to the close: its code (and the socket's end after it)."""
        while True:
            opcode, payload = self.frame()
            if opcode == 0x8:
                return int.from_bytes(payload[:2], "big") if payload else None

    def text(self):
        """The next text frame, decoded as JSON (pings skipped)."""
        while True:
            opcode, payload = self.frame()
            if opcode == 0x1:
                return json.loads(payload)
            assert opcode in (0x9, 0xA), (opcode, payload)


# -- a real browser: the system's Chromium, driven by Playwright ---------------------

CHROMIUM = os.environ.get("CHROMIUM") or next(
    (found for name in ("chromium", "chromium-browser", "google-chrome")
     if (found := shutil.which(name))), "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 "--no-proxy-server"]


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (Debian's package; $CHROMIUM names another), for
    one test module at a time: Playwright's sync API runs an event loop in
    this thread while it lives, which would stop other modules' own
    asyncio.run(). No browser is downloaded."""
    problem = None
    if not shutil.which(CHROMIUM):
        problem = f"{CHROMIUM} is missing (apt-get install chromium, or set $CHROMIUM)"
    else:
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            problem = "playwright is missing (pip install playwright)"
    if problem:
        if E2E:
            pytest.fail(problem)
        pytest.skip(problem)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                    headless=True, timeout=60_000)
        yield browser
        browser.close()


class Page:
    """A browser tab at *url* (in a context of its own unless *context* is
    given), with its script errors and dialogs recorded."""

    def __init__(self, browser, url, context=None):
        self.page = (context or browser).new_page()
        self.page.set_viewport_size({"width": 900, "height": 520})
        self.errors, self.dialogs = [], []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error"
                     and "Content Security Policy" in m.text else None)
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        if url:
            self.page.goto(url)

    def texts(self):
        return self.page.locator("#log li .body").all_inner_texts()

    def wait_text(self, text, timeout=5000):
        self.page.locator("#log li .body", has_text=text).first.wait_for(timeout=timeout)

    def state(self):
        node = self.page.locator("#state")
        return node.get_attribute("class"), node.get_attribute("data-transport")


def publish_text(url, channel, text, title=None):
    """POST *text* to *channel* of the server at *url*."""
    headers = {"Title": title} if title else {}
    req = urllib.request.Request(f"{url}/channels/{channel}", data=text.encode(),
                                 headers=headers, method="POST")
    urllib.request.urlopen(req, timeout=10).close()


# -- a real nginx in front of a server ----------------------------------------------

NGINX = shutil.which("nginx") or next(
    (path for path in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.path.exists(path)),
    None)


def start_nginx(folder, server_block):
    """nginx on a free port, configured with *server_block* (its ``listen``
    line is added); returns (base URL, process). Skips (fails with E2E)
    without nginx."""
    if NGINX is None:
        problem = "nginx is missing (apt-get install nginx-light)"
        if E2E:
            pytest.fail(problem)
        pytest.skip(problem)
    port = free_port()
    block = server_block.replace("    # ...\n", f"    listen 127.0.0.1:{port};\n")
    assert f"listen 127.0.0.1:{port};" in block, "the server block needs a '    # ...' line"
    (folder / "nginx.conf").write_text(f"""
daemon off;
master_process off;
pid {folder}/nginx.pid;
error_log {folder}/error.log;
events {{}}
http {{
    access_log off;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
{block}
}}
""")
    proc = subprocess.Popen([NGINX, "-p", str(folder), "-c", str(folder / "nginx.conf")],
                            stderr=subprocess.PIPE)

    def listening():
        if proc.poll() is not None:
            raise AssertionError(f"nginx ended: {proc.stderr.read().decode()}")
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    wait_until(listening, what="nginx to listen")
    return f"http://127.0.0.1:{port}", proc
