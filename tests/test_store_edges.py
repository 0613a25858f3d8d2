"""The edges of the stores: a hung Redis, Redis losing its data, repeated
publishes, and /receive takers that die or hold a lease."""
import json
import threading
import time

import pytest

import longpoll
from conftest import request, wait_until


def timed(server, path):
    started = time.monotonic()
    resp = request(server, "GET", path, timeout=10)
    return resp, time.monotonic() - started


def test_a_hung_redis_stalls_only_the_requests_that_need_it(own_redis, make_server):
    server = make_server(longpoll.Hub(store=own_redis.url))
    created = longpoll.Client(server.url).publish("a", "x")
    history, seq = created["id"].rsplit("-", 1)
    ahead = f"{history}-{int(seq) + 5}"  # a cursor past what this server has seen
    own_redis.pause()
    answers = []
    try:
        slow = [threading.Thread(target=lambda method=method, path=path: answers.append(
                    request(server, method, path, "y" if method == "POST" else None, timeout=30)))
                for method, path in [("GET", "/receive?timeout=0"),
                                     ("GET", f"/channels/a?since={ahead}&timeout=0"),
                                     ("POST", "/channels/a")] * 3]
        for t in slow:
            t.start()
        wait_until(lambda: len(server._connections) >= 9)
        for _ in range(5):
            health, took = timed(server, "/health")
            assert health.status == 200 and took < 0.1, took
            poll, took = timed(server, "/channels/a?since=0&timeout=0")
            assert poll.json["messages"][0]["message"] == "x" and took < 0.1, took
    finally:
        own_redis.resume()
    for t in slow:
        t.join(30)
        assert not t.is_alive()
    for resp in answers:  # each got an answer: a 503 from the store, a gap, or its own
        assert resp.status in (201, 503) or resp.json.get("gap") or "message" in resp.json, resp


def test_a_publish_redis_never_answers_gets_503_and_the_next_one_goes_through(
        own_redis, make_server):
    """A publish is sent to Redis from the server's loop, and answered when
    Redis answers: one Redis holds past the store's timeout gets a 503 (and
    for a second after, so do the others, at once), while the loop goes on."""
    server = make_server(longpoll.Hub(store=own_redis.url))
    assert request(server, "POST", "/channels/a", "before").status == 201
    server.hub.store.client.timeout = 0.5
    own_redis.pause()
    try:
        answer = []
        publisher = threading.Thread(target=lambda: answer.append(
            request(server, "POST", "/channels/a", "held", timeout=30)))
        publisher.start()
        wait_until(lambda: server.hub.store.failures, what="the publish to time out")
        publisher.join(10)
        assert not publisher.is_alive()
        assert answer[0].status == 503 and answer[0].headers["Retry-After"] == "1", answer
        health, took = timed(server, "/health")
        assert health.status == 200 and took < 0.1
    finally:
        own_redis.resume()
    wait_until(lambda: request(server, "POST", "/channels/a", "after").status == 201,
               what="publishing to work again")
    assert [m for m in everything(server, "a")[0]][-1] == "after"


def test_a_redis_restart_costs_no_request(own_redis, make_server):
    """Connections that Redis closed while idle are not reused: the first
    publish and take after a restart are answered, not refused."""
    server = make_server(longpoll.Hub(store=own_redis.url))
    for _ in range(3):
        assert request(server, "POST", "/channels/default", "before").status == 201
    own_redis.restart()
    assert request(server, "POST", "/channels/default", "after").status == 201
    assert request(server, "GET", "/receive?timeout=0").json["message"] == "after"


# -- Redis loses its data --------------------------------------------------------------

def wipe(redis_url):
    import redis
    admin = redis.Redis.from_url(redis_url)
    admin.flushdb()
    admin.close()


def publish(server, channel, message):
    resp = request(server, "POST", f"/channels/{channel}", message)
    assert resp.status == 201, resp
    return resp.json["id"]


def everything(server, channel, since="0"):
    batch = server.hub.read(channel, since, limit=1000)
    return [m.message for m in batch.messages], batch.gap


def test_redis_wiped_then_a_server_restarted_all_servers_agree_again(make_server, redis_url):
    a, b = (make_server(longpoll.Hub(store=redis_url)) for _ in range(2))
    old = [publish(a if i % 2 else b, "w", f"old{i}") for i in range(6)]
    wipe(redis_url)
    c = make_server(longpoll.Hub(store=redis_url))  # b's restart, before any publish
    for i, server in enumerate((a, b, c, a, b, c)):  # every server can publish at once
        started = time.monotonic()
        publish(server, "w", f"new{i}")
        assert time.monotonic() - started < 1.0
    expected = [f"new{i}" for i in range(6)]
    for server in (a, b, c):  # all readers see the same messages, in one order
        wait_until(lambda: everything(server, "w")[0][-6:] == expected, timeout=5,
                   what="the new messages on every server")
        assert server.hub.history == c.hub.history
        got, gap = everything(server, "w", old[2])  # an old cursor: exact, or a gap
        assert gap or got == [f"old{i}" for i in range(3, 6)] + expected, (got, gap)


def test_after_a_wipe_an_old_cursor_never_skips_silently(make_server, redis_url):
    a = make_server(longpoll.Hub(store=redis_url))
    ids = [publish(a, "s", f"m{i}") for i in range(10)]
    wipe(redis_url)
    for i in range(10, 13):
        publish(a, "s", f"m{i}")
    restarted = make_server(longpoll.Hub(store=redis_url))
    got, gap = everything(restarted, "s", ids[2])
    assert gap and got == ["m10", "m11", "m12"]
    got, gap = everything(a, "s", ids[2])  # the server that saw it all
    assert gap or got == [f"m{i}" for i in range(3, 13)]
    assert restarted.hub.history == a.hub.history


def test_a_wiped_redis_is_reseeded_within_a_second(make_server, redis_url):
    import redis
    a = make_server(longpoll.Hub(store=redis_url))
    ids = [publish(a, "r", f"m{i}") for i in range(3)]
    wipe(redis_url)
    admin = redis.Redis.from_url(redis_url)
    try:
        wait_until(lambda: admin.get("longpoll:history"), timeout=2.5,
                   what="a running server to re-seed Redis")
        assert int(admin.get("longpoll:seq")) >= 3  # numbers are never reused
    finally:
        admin.close()
    joined = make_server(longpoll.Hub(store=redis_url))  # joins the history, no fork
    assert joined.hub.history == a.hub.history
    assert everything(joined, "r", ids[0])[1]  # what Redis lost is a gap there
    new = publish(joined, "r", "after")
    assert int(new.rsplit("-", 1)[1]) > int(ids[-1].rsplit("-", 1)[1])
    wait_until(lambda: everything(a, "r", ids[-1])[0] == ["after"])


# -- idempotent publish --------------------------------------------------------------------

KEYED = {"Idempotency-Key": "job-42-done"}


def publish_and_hang_up(server, body, key):
    """A keyed publish whose answer is never read: the connection is cut."""
    import socket
    with socket.create_connection(server.server_address[:2], timeout=5) as sock:
        sock.sendall(b"POST /channels/k HTTP/1.1\r\nHost: x\r\nIdempotency-Key: " + key
                     + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


def test_a_publish_retried_after_a_cut_is_stored_once(server):
    publish_and_hang_up(server, b"deploy", KEYED["Idempotency-Key"].encode())
    wait_until(lambda: server.hub.read("k", "0").messages, what="the first publish")
    (first,) = server.hub.read("k", "0").messages
    again = request(server, "POST", "/channels/k", "deploy", KEYED)
    assert again.status == 200 and again.json == {"id": first.id, "channel": "k",
                                                  "time": first.time}
    assert [m.message for m in server.hub.read("k", "0").messages] == ["deploy"]
    other = request(server, "POST", "/channels/k", "deploy", {"Idempotency-Key": "another"})
    assert other.status == 201  # another key is another publish
    assert request(server, "POST", "/channels/k", "x",
                   {"Idempotency-Key": "has space"}).status == 400


def test_a_key_holds_across_a_sqlite_restart(make_server, tmp_path):
    store = f"sqlite:{tmp_path / 'longpoll.db'}"
    first = make_server(longpoll.Hub(store=store))
    created = request(first, "POST", "/channels/k", "once", KEYED)
    assert created.status == 201
    first.close()
    second = make_server(longpoll.Hub(store=store))
    again = request(second, "POST", "/channels/k", "once", KEYED)
    assert again.status == 200 and again.json["id"] == created.json["id"]
    assert [m.message for m in second.hub.read("k", "0").messages] == ["once"]


def test_a_key_holds_across_two_servers_over_redis(make_server, redis_url):
    a, b = (make_server(longpoll.Hub(store=redis_url)) for _ in range(2))
    created = request(a, "POST", "/channels/k", "once", KEYED)
    assert created.status == 201
    again = request(b, "POST", "/channels/k", "once", KEYED)
    assert again.status == 200 and again.json["id"] == created.json["id"]
    publish(b, "k", "after")
    for server in (a, b):
        wait_until(lambda: everything(server, "k")[0] == ["once", "after"])


def test_a_key_is_forgotten_after_its_window():
    hub = longpoll.Hub(idempotency_window=0.05)
    first = hub.publish("k", "a", key="k1")
    assert hub.publish("k", "a", key="k1").replayed
    later = wait_until(lambda: (lambda m: None if m.replayed else m)(
        hub.publish("k", "a", key="k1")), what="the key to expire")
    assert later.seq > first.seq
    hub.close()


# -- /receive keeps what it hands out --------------------------------------------------------

@pytest.fixture(params=["memory", "sqlite", "redis"])
def queue_pair(request, make_server, tmp_path):
    """Two servers sharing one /receive queue (memory, sqlite: the same one)."""
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        return make_server(longpoll.Hub(store=url)), make_server(longpoll.Hub(store=url))
    url = "memory:" if request.param == "memory" else f"sqlite:{tmp_path / 'q.db'}"
    server = make_server(longpoll.Hub(store=url))
    return server, server


def receive(server, query="timeout=5"):
    resp = request(server, "GET", f"/receive?{query}")
    assert resp.status == 200, resp
    return resp.json


def test_a_taker_that_dies_before_reading_gives_its_message_back(queue_pair, caplog):
    import logging
    import socket
    import struct
    caplog.set_level(logging.INFO, logger="longpoll")
    a, b = queue_pair
    big = "x" * (4 << 20)  # more than the socket buffers take: the answer cannot be all written
    a.hub.publish("default", big)
    a.hub.publish("default", "small")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(a.server_address[:2])
    sock.sendall(b"GET /receive?timeout=5 HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_until(lambda: any(c.handed for c in a._connections), what="the answer to be under way")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # killed: a reset, before it read its answer
    wait_until(lambda: "went back to the queue" in caplog.text, what="the give-back")
    assert receive(b)["message"] == big  # the next taker gets it
    assert receive(b)["message"] == "small"
    assert receive(b, "timeout=0")["message"] is None  # each once


def test_a_leased_message_comes_back_unless_acknowledged(queue_pair):
    a, b = queue_pair
    for message in ("first", "second"):
        a.hub.publish("default", message)
    first = receive(a, "lease=0.5&timeout=0")
    second = receive(a, "lease=0.5&timeout=0")
    assert (first["message"], second["message"]) == ("first", "second") and first["receipt"]
    acked = request(b, "POST", "/receive/ack", json.dumps({"receipt": second["receipt"]}))
    assert acked.status == 200 and acked.json == {"acknowledged": True}
    wait_until(lambda: receive(b, "lease=0.5&timeout=0")["message"] == "first",
               what="the unacknowledged message to come back")
    # It comes back again once this lease ends, later than the acknowledged
    # one's would have: by then that one has not come back, so it never will.
    wait_until(lambda: receive(b, "lease=30&timeout=0")["message"] == "first",
               what="the message to come back a second time")
    assert receive(b, "timeout=0")["message"] is None
    late = request(b, "POST", "/receive/ack?receipt=" + first["receipt"])
    assert late.status == 409 and late.json["error"]
    assert request(a, "GET", "/receive?lease=0").status == 400


def test_a_parked_taker_gets_what_comes_back_without_a_publish(queue_pair):
    """A lease that ends, or a message given back on another server, wakes
    the takers parked meanwhile (within about a second): nothing is
    published that would wake them otherwise."""
    a, b = queue_pair
    a.hub.publish("default", "work")
    assert receive(a, "lease=0.5&timeout=0")["message"] == "work"
    assert receive(b, "timeout=20")["message"] == "work"  # parked when the lease ends
    a.hub.publish("default", "more")
    msg = a.hub.take("default", timeout=0)
    import threading
    got = []
    taker = threading.Thread(target=lambda: got.append(receive(b, "timeout=20")))
    taker.start()
    wait_until(lambda: b.waiting == 1, what="the taker to park")
    a.hub.give_back(msg)  # a's taker never got it
    taker.join(20)
    assert not taker.is_alive() and got[0]["message"] == "more"


def test_leases_and_the_queue_survive_kill_9(tmp_path):
    import signal
    from test_cli import Process, get_json
    store = f"sqlite:{tmp_path / 'q.db'}"
    server = Process("serve", "--port", "0", "--store", store)
    try:
        url = server.expect(r"listening on (http://\S+)").group(1)
        for message in ("kept", "acked", "next"):
            longpoll.Client(url).publish("default", message)
        leased = get_json(url + "/receive?lease=1&timeout=0")
        acked = get_json(url + "/receive?lease=1&timeout=0")
        import urllib.request
        urllib.request.urlopen(urllib.request.Request(
            url + "/receive/ack?receipt=" + acked["receipt"], data=b"", method="POST"),
            timeout=10).close()
        assert (leased["message"], acked["message"]) == ("kept", "acked")
    finally:
        server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    again = Process("serve", "--port", "0", "--store", store)
    try:
        url = again.expect(r"listening on (http://\S+)").group(1)
        assert get_json(url + "/receive?timeout=0")["message"] == "next"  # the mark held
        back = wait_until(lambda: get_json(url + "/receive?timeout=0")["message"] or None,
                          what="the lease to end")
        assert back == "kept"  # its lease ended while the server was down, or after
        assert get_json(url + "/receive?timeout=0")["message"] is None  # "acked" never
    finally:
        assert again.stop() == 0
