"""The urllib client against real servers: retries, failover, resume, stop."""
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import longpoll
from conftest import wait_until
from longpoll import Client, Hub, LongpollError


def crash(server):
    """Stop a server abruptly, as a killed process would: no answers, every
    connection cut, the (shared) hub left as it is."""
    server.shutdown()
    server.server_close()


def dead_url():
    """A URL on which nothing listens (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class Collector:
    """Iterates a subscription in a thread and keeps what it yields."""

    def __init__(self, subscription):
        self.subscription = subscription
        self.messages = []
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            for message in self.subscription:
                self.messages.append(message)
        except Exception as exc:  # surfaced by the test
            self.error = exc

    def wait_for(self, count, timeout=15):
        wait_until(lambda: len(self.messages) >= count or self.error, timeout,
                   what=f"{count} messages")
        assert self.error is None, self.error
        return [m["message"] for m in self.messages]

    def stop(self):
        self.subscription.close()
        self.thread.join(5)
        assert not self.thread.is_alive()


class Stub(BaseHTTPRequestHandler):
    """Answers from a script of (status, headers, body); counts requests."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.server.requests.append((self.command, self.path, time.monotonic(),
                                     dict(self.headers)))
        status, headers, body = self.server.script.pop(0) if self.server.script else (
            200, {}, {"messages": [], "cursor": "a-0"})
        data = json.dumps(body).encode()
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    server.requests, server.script = [], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_publish_and_poll(server):
    client = Client(server.url)
    created = client.publish("news", {"n": 1}, title="T", priority=3)
    assert created["channel"] == "news"
    body = client.poll("news", since="0")
    assert body["messages"][0] == {"id": created["id"], "channel": "news",
                                   "time": created["time"], "message": {"n": 1},
                                   "title": "T", "priority": 3}
    empty = client.poll("news", since=body["cursor"], timeout=0)
    assert empty["messages"] == [] and empty["cursor"] == body["cursor"]
    assert client.health()["status"] == "ok"


def test_server_errors_are_raised_with_status_and_words(server):
    client = Client(server.url)
    with pytest.raises(LongpollError) as info:
        client.poll("news", since="not-a-cursor")
    assert info.value.status == 400 and "since" in info.value.message
    with pytest.raises(LongpollError) as info:
        client.publish("news", "x", priority=9)
    assert info.value.status == 400


def test_subscribe_yields_every_message_in_order_and_keeps_its_cursor(server):
    sub = Client(server.url, timeout=5).subscribe("news")
    collector = Collector(sub)
    wait_until(lambda: server.waiting == 1)
    for i in range(50):
        server.hub.publish("news", i)
    assert collector.wait_for(50) == list(range(50))
    collector.stop()
    server.hub.publish("news", "after the stop")
    resumed = Client(server.url).poll("news", since=sub.cursor)
    assert [m["message"] for m in resumed["messages"]] == ["after the stop"]


def test_subscribe_to_several_channels(server):
    collector = Collector(Client(server.url, timeout=5).subscribe(["a", "b"], since="0"))
    for i in range(6):
        server.hub.publish("ab"[i % 2], i)
    assert collector.wait_for(6) == list(range(6))
    collector.stop()


def test_breaking_out_mid_batch_resumes_from_the_last_yielded(server):
    for i in range(5):
        server.hub.publish("ch", i)
    sub = Client(server.url).subscribe("ch", since="0")
    for message in sub:
        if message["message"] == 2:
            break
    assert [m["message"] for m in Client(server.url).poll("ch", since=sub.cursor)["messages"]] \
        == [3, 4]


def test_close_cuts_a_held_poll_short(server):
    sub = Client(server.url, timeout=60).subscribe("quiet")
    collector = Collector(sub)
    wait_until(lambda: server.waiting == 1)
    started = time.monotonic()
    collector.stop()  # asserts the thread ended
    assert time.monotonic() - started < 5 and collector.error is None


def test_gap_is_surfaced_on_the_next_message(server):
    stale = Hub().publish("ch", "from another server").id
    server.hub.publish("ch", "kept")
    sub = Client(server.url).subscribe("ch", since=stale)
    message = next(iter(sub))
    assert message["message"] == "kept" and message["gap"] is True and sub.gaps == 1


def test_failover_between_servers_sharing_history_loses_and_repeats_nothing(make_server):
    hub = Hub()
    a, b = make_server(hub=hub), make_server(hub=hub)
    client = Client([a.url, b.url], timeout=5, backoff=0.01)
    collector = Collector(client.subscribe("ch", since="0"))
    for i in range(10):
        hub.publish("ch", i)
    collector.wait_for(10)
    wait_until(lambda: a.waiting + b.waiting == 1)
    crash(a)  # mid-stream: the held poll on A is cut
    for i in range(10, 20):
        hub.publish("ch", i)
    assert collector.wait_for(20) == list(range(20))
    assert client.urls[client._current] == b.url
    assert not any(m.get("gap") for m in collector.messages)
    collector.stop()


def test_subscribe_survives_a_server_restart(make_server):
    first = make_server()
    port = first.server_address[1]
    collector = Collector(Client(first.url, timeout=5, backoff=0.05,
                                 max_backoff=0.2).subscribe("ch"))
    wait_until(lambda: first.waiting == 1)
    first.hub.publish("ch", "before")
    collector.wait_for(1)
    first.close()
    second = longpoll.make_server("127.0.0.1", port).start()
    try:
        wait_until(lambda: second.waiting == 1, what="the client to come back")
        second.hub.publish("ch", "after")
        assert collector.wait_for(2) == ["before", "after"]
        assert collector.messages[1]["gap"] is True  # the restart lost history
    finally:
        collector.stop()
        second.close()


def test_failover_skips_a_dead_server(server):
    server.hub.publish("ch", "x")
    client = Client([dead_url(), server.url], backoff=0.01)
    assert client.poll("ch", since="0")["messages"][0]["message"] == "x"
    assert client.publish("ch", "y")["channel"] == "ch"


def test_retries_then_gives_up_against_a_dead_server():
    client = Client(dead_url(), retries=2, backoff=0.01)
    with pytest.raises(LongpollError) as info:
        client.poll("ch")
    assert info.value.status is None and "refused" in info.value.message.lower()


def test_backoff_grows_exponentially_with_jitter_and_a_cap():
    client = Client(backoff=0.5, max_backoff=8)
    for failures, ceiling in [(0, 0.5), (1, 1), (2, 2), (3, 4), (4, 8), (10, 8), (100, 8)]:
        delays = [client._delay(failures) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 100  # jittered
    assert client._delay(0, retry_after=5) == 5


def test_503_and_429_are_retried_honouring_retry_after(stub):
    stub.script[:] = [(503, {"Retry-After": "1"}, {"error": "busy"}),
                      (429, {"Retry-After": "0"}, {"error": "slow down"})]
    body = Client(stub.url, backoff=0.01).poll("ch")
    assert body["messages"] == [] and len(stub.requests) == 3
    assert stub.requests[1][2] - stub.requests[0][2] >= 1.0


def test_publish_is_retried_only_when_surely_not_taken(stub):
    stub.script[:] = [(503, {"Retry-After": "0"}, {"error": "busy"}),
                      (201, {}, {"id": "a-1", "channel": "ch", "time": 1.0})]
    assert Client(stub.url, backoff=0.01).publish("ch", "x")["id"] == "a-1"
    assert len(stub.requests) == 2
    stub.requests.clear()
    stub.script[:] = [(500, {}, {"error": "boom"})]
    with pytest.raises(LongpollError) as info:
        Client(stub.url, backoff=0.01).publish("ch", "x")
    assert info.value.status == 500 and len(stub.requests) == 1  # may have been published


def test_subscribe_retries_5xx_and_raises_on_4xx(stub):
    stub.script[:] = [(502, {}, {"error": "bad gateway"}),
                      (200, {}, {"messages": [{"id": "a-1", "channel": "ch", "time": 1,
                                               "message": "m"}], "cursor": "a-1"}),
                      (403, {}, {"error": "forbidden"})]
    sub = Client(stub.url, backoff=0.01).subscribe("ch")
    it = iter(sub)
    assert next(it)["message"] == "m"
    with pytest.raises(LongpollError) as info:
        next(it)
    assert info.value.status == 403 and sub.cursor == "a-1"
    assert "since=a-1" in stub.requests[-1][1]


def test_socket_timeout_is_longer_than_the_hold():
    client = Client(timeout=30)
    assert client._socket_timeout(30) > 30


def test_client_needs_a_url():
    with pytest.raises(ValueError):
        Client([])


def test_publish_retries_carry_one_idempotency_key(stub):
    stub.script[:] = [(502, {}, {"error": "bad gateway"}),
                      (201, {}, {"id": "a-1", "channel": "ch", "time": 1.0})]
    assert Client(stub.url, backoff=0.01).publish("ch", "x")["id"] == "a-1"
    keys = [headers.get("Idempotency-Key") for *_, headers in stub.requests]
    assert len(keys) == 2 and keys[0] and keys[0] == keys[1]
    stub.requests.clear()
    stub.script[:] = [(201, {}, {"id": "a-2", "channel": "ch", "time": 1.0})]
    Client(stub.url).publish("ch", "y")
    assert stub.requests[0][3]["Idempotency-Key"] != keys[0]  # a key per publish
