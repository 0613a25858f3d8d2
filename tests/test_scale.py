"""The selector-loop design under many clients: correctness, not speed
(speed is bench/run.py's job)."""
import json
import logging
import resource
import selectors
import socket
import threading
import time

import pytest

from conftest import wait_until

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft < hard:
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
MANY = min(2000, (hard - 200) // 2)  # each client costs this process two descriptors


class RawClient:
    __slots__ = ("sock", "buf", "cursor", "got", "answers", "answered_at", "closed", "sent")

    def __init__(self, sock):
        self.sock, self.buf, self.cursor, self.sent = sock, b"", None, 0.0
        self.got, self.answers, self.answered_at, self.closed = [], [], [], False


class RawPollers:
    """N raw HTTP/1.1 keep-alive sockets long-polling, all in one thread."""

    def __init__(self, server, count, channel, hold=60, repoll=True):
        self.selector = selectors.DefaultSelector()
        self.channel, self.hold, self.repoll = channel, hold, repoll
        self.clients = []
        host, port = server.server_address[:2]
        for _ in range(count):
            sock = socket.create_connection((host, port), timeout=10)
            sock.setblocking(False)
            client = RawClient(sock)
            self.clients.append(client)
            self.selector.register(sock, selectors.EVENT_READ, client)
            self.poll(client)

    def poll(self, client):
        since = "" if client.cursor is None else f"&since={client.cursor}"
        client.sent = time.monotonic()
        client.sock.sendall(f"GET /channels/{self.channel}?timeout={self.hold}{since} "
                            f"HTTP/1.1\r\nHost: t\r\n\r\n".encode())

    def run_until(self, predicate, timeout=30):
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "timed out"
            for key, _ in self.selector.select(0.1):
                self._read(key.data)

    def _read(self, client):
        data = client.sock.recv(65536)
        if not data:
            self.selector.unregister(client.sock)
            client.closed = True
            return
        client.buf += data
        while b"\r\n\r\n" in client.buf:
            head, _, rest = client.buf.partition(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            if len(rest) < length:
                return
            body, client.buf = json.loads(rest[:length]), rest[length:]
            client.answers.append((int(head.split()[1]), head, body))
            client.answered_at.append(time.monotonic())
            client.got += [m["message"] for m in body["messages"]]
            client.cursor = body["cursor"]
            if self.repoll and b"Connection: close" not in head:
                self.poll(client)

    def close(self):
        for client in self.clients:
            client.sock.close()
        self.selector.close()


@pytest.fixture
def pollers():
    made = []

    def make(*args, **kwargs):
        made.append(RawPollers(*args, **kwargs))
        return made[-1]

    yield make
    for p in made:
        p.close()


def test_thousands_of_parked_clients_all_get_every_message(server, pollers):
    threads_before = threading.active_count()
    clients = pollers(server, MANY, "scale")
    wait_until(lambda: server.waiting == MANY, timeout=30, what=f"{MANY} parked")
    assert threading.active_count() - threads_before <= 2  # a loop, not a thread each
    for i in range(5):
        server.hub.publish("scale", i)
    clients.run_until(lambda: all(len(c.got) >= 5 for c in clients.clients))
    assert all(c.got == [0, 1, 2, 3, 4] for c in clients.clients)


def test_a_burst_reaches_everyone_in_batches_once_and_in_order(server, pollers):
    clients = pollers(server, 200, "burst")
    wait_until(lambda: server.waiting == 200)
    for i in range(300):
        server.hub.publish("burst", i)
    clients.run_until(lambda: all(len(c.got) >= 300 for c in clients.clients))
    assert all(c.got == list(range(300)) for c in clients.clients)


def test_holds_end_on_time_while_the_loop_is_busy(server, pollers):
    clients = pollers(server, 1000, "quiet", hold=1, repoll=False)
    wait_until(lambda: server.waiting == 1000)
    busy = pollers(server, 100, "busy")  # and a stream of work meanwhile
    stop = threading.Event()

    def publish():
        while not stop.is_set():
            server.hub.publish("busy", "x")
            time.sleep(0.001)

    publisher = threading.Thread(target=publish)
    publisher.start()
    try:
        deadline = time.monotonic() + 10
        while not all(c.answers for c in clients.clients):
            assert time.monotonic() < deadline
            for key, _ in clients.selector.select(0.05):
                clients._read(key.data)
            for key, _ in busy.selector.select(0):
                busy._read(key.data)
    finally:
        stop.set()
        publisher.join(5)
    waited = [c.answered_at[0] - c.sent for c in clients.clients]
    assert all(c.answers[0][0] == 200 and c.answers[0][2]["messages"] == []
               for c in clients.clients)
    assert min(waited) >= 0.99 and max(waited) < 4.0, (min(waited), max(waited))


def test_clients_that_leave_while_parked_are_dropped_quietly(server, pollers, caplog):
    clients = pollers(server, 200, "leave")
    wait_until(lambda: server.waiting == 200)
    for client in clients.clients[:100]:
        clients.selector.unregister(client.sock)
        client.sock.close()
    wait_until(lambda: server.waiting == 100, what="the server to notice")
    server.hub.publish("leave", "still here")
    staying = clients.clients[100:]
    clients.run_until(lambda: all(c.got for c in staying))
    assert all(c.got == ["still here"] for c in staying)
    assert len(server._connections) == 100
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_close_with_thousands_parked_answers_all_within_3_s(make_server, pollers):
    server = make_server()
    clients = pollers(server, MANY, "parked", repoll=False)
    wait_until(lambda: server.waiting == MANY, timeout=30)
    started = time.monotonic()
    server.close(timeout=2.5)
    assert time.monotonic() - started < 3.0
    clients.run_until(lambda: all(c.answers for c in clients.clients))
    for client in clients.clients:
        status, head, body = client.answers[0]
        assert status == 200 and body["messages"] == [] and b"Connection: close" in head


class _Held:
    """What HoldTimers reads and writes of a connection."""
    __slots__ = ("timer", "entry")

    def __init__(self):
        self.timer = self.entry = None


def test_hold_timers_end_each_hold_once_on_time_and_stay_small():
    """Holds started, ended, restarted sooner and later, in random order,
    against a model: every due hold comes up once, none that ended or moved
    later; the heap stays bounded by the live holds, not by the history; the
    time to look again is never later than the first hold due."""
    import random
    import longpoll
    timers, conns = longpoll.HoldTimers(), [_Held() for _ in range(40)]
    rng, model = random.Random(7), {}
    now = time.monotonic()  # the clock the checks pass: 100 s a step, ahead of the real one
    for step in range(30000):
        conn = rng.choice(conns)
        if rng.random() < 0.4:
            timers.hold(conn, None)
            model.pop(conn, None)
        else:  # due 30 s or 70 s away from any check: the real clock's drift cannot matter
            model[conn] = due = now + rng.choice((30, 130, 230, 100030))
            timers.hold(conn, due - time.monotonic())
        if step % 100 == 99:
            now += 100
            due = {c for c, at in model.items() if at <= now}
            assert set(timers.expired(now)) == due
            for c in due:
                del model[c]
                assert c.timer is None
            assert len(timers.heap) <= 2 * 1024 + 2 * len(conns)
    first = min(model.values())  # next_due may be early (a stale entry), never late
    assert timers.next_due() < first + 1
    assert timers.expired(first - 1) == [] and abs(timers.next_due() - first) < 1
