"""Rate limits (429) and capacity limits (503), per client."""
import http.client
import threading

import pytest

import longpoll
from conftest import request, wait_until

AUTH = longpoll.Auth({"hammer": {"read": ["*"], "write": ["*"]},
                      "honest": {"read": ["*"], "write": ["*"]}})

pytestmark = pytest.mark.asgi_too


def bearer(token, **extra):
    return {"Authorization": f"Bearer {token}", **extra}


@pytest.mark.parametrize("keep_alive", [False, True])
def test_a_hammering_client_gets_429_and_another_is_unaffected(make_server, keep_alive):
    """Also on one keep-alive connection, where each publish after the first
    reuses the decision made for the one before it, but not its budget."""
    server = make_server(auth=AUTH, publish_rate=5, publish_burst=10)
    statuses, honest = [], []
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10) \
        if keep_alive else None
    for i in range(40):
        resp = request(server, "POST", "/channels/x", str(i), bearer("hammer"), conn=conn)
        statuses.append(resp.status)
        if resp.status == 429:
            assert int(resp.headers["Retry-After"]) >= 1 and resp.json["error"]
        if i % 8 == 0:  # meanwhile, an honest client publishes now and then
            honest.append(request(server, "POST", "/channels/x", "hi", bearer("honest")).status)
    assert statuses[:10] == [201] * 10 and statuses.count(429) >= 25
    assert honest == [201] * 5
    assert server.rate_limited == statuses.count(429)
    if conn is not None:
        conn.close()


def test_addresses_are_limited_apart_behind_a_trusted_proxy(make_server):
    server = make_server(trust_proxy=True, request_rate=1, request_burst=3)
    one = [request(server, "GET", "/channels/x?timeout=0",
                   headers={"X-Forwarded-For": "203.0.113.7"}).status for _ in range(5)]
    other = request(server, "GET", "/channels/x?timeout=0",
                    headers={"X-Forwarded-For": "198.51.100.2"}).status
    assert one == [200, 200, 200, 429, 429] and other == 200
    assert request(server, "GET", "/health",
                   headers={"X-Forwarded-For": "203.0.113.7"}).status == 200  # never limited


def test_loopback_is_not_limited(make_server):
    server = make_server(request_rate=1, request_burst=1)
    assert all(request(server, "GET", "/channels/x?timeout=0").status == 200 for _ in range(5))


def test_waiting_limits_give_503_and_spare_others(make_server):
    server = make_server(auth=AUTH, max_waiting_per_client=2, max_waiting=3)
    answers = []

    def park(token):
        answers.append(request(server, "GET", "/channels/w?timeout=30", headers=bearer(token)))

    threads = [threading.Thread(target=park, args=("hammer",)) for _ in range(2)]
    for t in threads:
        t.start()
    wait_until(lambda: server.waiting == 2)
    third = request(server, "GET", "/channels/w?timeout=30", headers=bearer("hammer"))
    assert third.status == 503 and third.headers["Retry-After"] == "5"
    honest = threading.Thread(target=park, args=("honest",))
    honest.start()
    wait_until(lambda: server.waiting == 3)
    full = request(server, "GET", "/channels/w?timeout=30", headers=bearer("honest"))
    assert full.status == 503  # the whole server is at its limit
    server.hub.publish("w", "go")
    for t in threads + [honest]:
        t.join(10)
    assert sorted(a.status for a in answers) == [200, 200, 200]
    wait_until(lambda: server.waiting == 0)
    assert not server._parked_by  # every slot given back


@pytest.mark.serve_only  # (serve's own loop)
def test_slow_loris_connections_do_not_stop_honest_clients(server):
    import socket
    import time
    host, port = server.server_address[:2]
    loris = []
    for _ in range(300):  # each sends part of a request head, then a byte now and then
        sock = socket.create_connection((host, port), timeout=5)
        sock.sendall(b"GET /channels/x HTTP/1.1\r\nHost: a\r\nX-Slow: ")
        loris.append(sock)
    wait_until(lambda: len(server._connections) >= 300)
    try:
        for round_ in range(3):
            for sock in loris:
                sock.sendall(b"a")
            started = time.monotonic()
            waiter = threading.Thread(target=lambda: results.append(
                request(server, "GET", "/channels/honest?timeout=10")))
            results = []
            waiter.start()
            wait_until(lambda: server.waiting >= 1)
            assert request(server, "POST", "/channels/honest", f"m{round_}").status == 201
            waiter.join(5)
            assert results[0].json["messages"][0]["message"] == f"m{round_}"
            assert time.monotonic() - started < 1.0
    finally:
        for sock in loris:
            sock.close()


def test_a_new_channel_past_max_channels_gets_503_and_old_ones_still_work(make_server):
    server = make_server(longpoll.Hub(max_channels=3))
    assert [request(server, "POST", f"/channels/{c}", "x").status for c in "abc"] == [201] * 3
    refused = request(server, "POST", "/channels/d", "x")
    assert refused.status == 503 and refused.headers["Retry-After"] == "10"
    assert "no room for new channels" in refused.json["error"]
    # polls and event streams on a new channel are refused the same way, before any stream
    assert request(server, "GET", "/channels/d?timeout=5").status == 503
    assert request(server, "GET", "/channels/a,d?timeout=5").status == 503
    events = request(server, "GET", "/channels/d/events")
    assert events.status == 503 and events.headers["Content-Type"].startswith("application/json")
    assert request(server, "POST", "/channels/a", "y").status == 201
    batch = request(server, "GET", "/channels/a,b,c?since=0").json
    assert [m["message"] for m in batch["messages"]] == ["x", "x", "x", "y"]
    assert server.waiting == 0 and server.hub.channel_count == 3


def test_expired_channels_make_room_and_still_report_the_gap():
    hub = longpoll.Hub(max_channels=2, max_age=0.05)
    old = hub.publish("a", "soon gone").id
    hub.publish("b", "soon gone")
    wait_until(lambda: _publishes(hub, "c"), what="expired channels to make room")
    assert hub.channel_count <= 2
    batch = hub.read("a", old)  # "a" was forgotten; its reader is told of the loss
    assert batch.gap and batch.messages == []
    assert not hub.read("a", batch.cursor).gap


def _publishes(hub, channel):
    try:
        hub.publish(channel, "new")
        return True
    except longpoll.LongpollError as error:
        assert error.status == 503
        return False
