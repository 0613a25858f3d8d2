"""The HTTP server against PROTOCOL.md, with real sockets and http.client."""
import http.client
import json
import select
import selectors
import socket
import threading

import pytest

import longpoll
from conftest import parked_on, parse_raw, raw, request, wait_until

# The protocol as served, by serve and by the ASGI app (conftest: asgi_too).
pytestmark = pytest.mark.asgi_too


def publish(server, channel, message, **headers):
    resp = request(server, "POST", f"/channels/{channel}", message, headers)
    assert resp.status == 201, resp
    return resp.json


def poll(server, path, timeout=10):
    resp = request(server, "GET", path, timeout=timeout)
    assert resp.status == 200, resp
    return resp.json


def in_thread(fn, *args):
    out = []
    t = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    t.start()
    return t, out


# -- publish ----------------------------------------------------------------

def test_plain_publish_and_read(server):
    created = publish(server, "news", "hello")
    assert set(created) == {"id", "channel", "time"} and created["channel"] == "news"
    body = poll(server, "/channels/news?since=0")
    assert body["messages"] == [{"id": created["id"], "channel": "news",
                                 "time": created["time"], "message": "hello"}]
    assert body["cursor"] and "gap" not in body


def test_json_publish_with_title_and_priority(server):
    body = json.dumps({"message": {"build": 42, "ok": True}, "title": "CI", "priority": 4})
    publish(server, "ci", body, **{"Content-Type": "application/json; charset=utf-8"})
    (msg,) = poll(server, "/channels/ci?since=0")["messages"]
    assert msg["message"] == {"build": 42, "ok": True}
    assert (msg["title"], msg["priority"]) == ("CI", 4)


def test_plain_publish_with_utf8_title_and_named_priority(server):
    publish(server, "ci", "déjà vu".encode(), Title="Bûild ✓".encode().decode("latin-1"),
            Priority="urgent")
    (msg,) = poll(server, "/channels/ci?since=0")["messages"]
    assert (msg["message"], msg["title"], msg["priority"]) == ("déjà vu", "Bûild ✓", 5)


def test_json_message_may_be_any_json_value(server):
    for value in [None, 0, -1.5, "s", [1, [2]], {"a": {"b": None}}, True]:
        publish(server, "v", json.dumps({"message": value}), **{"Content-Type": "application/json"})
    got = [m["message"] for m in poll(server, "/channels/v?since=0")["messages"]]
    assert got == [None, 0, -1.5, "s", [1, [2]], {"a": {"b": None}}, True]


def test_chunked_publish(server):
    host, port = server.server_address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("POST", "/channels/c", body=iter([b"hel", b"lo"]))  # sent chunked
    assert conn.getresponse().status == 201
    conn.close()
    assert poll(server, "/channels/c?since=0")["messages"][0]["message"] == "hello"


def test_an_empty_body_is_refused_and_an_empty_string_is_a_message(server):
    assert request(server, "POST", "/channels/e", b"").status == 400
    publish(server, "e", b'{"message": ""}', **{"Content-Type": "application/json"})
    assert poll(server, "/channels/e?since=0")["messages"][0]["message"] == ""


# -- subscribe --------------------------------------------------------------

def test_poll_without_since_waits_for_the_next_message(server):
    publish(server, "news", "old")
    t, out = in_thread(poll, server, "/channels/news")
    wait_until(lambda: server.waiting == 1, what="the poll to park")
    publish(server, "news", "new")
    t.join(10)
    assert [m["message"] for m in out[0]["messages"]] == ["new"]


def test_timeout_answers_empty_with_a_cursor_that_misses_nothing(server):
    publish(server, "news", "seen")
    body = poll(server, "/channels/news?since=0")
    empty = poll(server, f"/channels/news?since={body['cursor']}&timeout=0.05")
    assert empty["messages"] == []
    publish(server, "news", "between two requests")
    later = poll(server, f"/channels/news?since={empty['cursor']}&timeout=0")
    assert [m["message"] for m in later["messages"]] == ["between two requests"]


def test_timeout_zero_answers_at_once(server):
    assert poll(server, "/channels/x?timeout=0")["messages"] == []


def test_timeout_is_clamped_to_the_server_maximum(make_server):
    server = make_server(max_timeout=0.05)
    assert poll(server, "/channels/x?timeout=1e9")["messages"] == []


def test_limit(server):
    for i in range(5):
        publish(server, "l", str(i))
    first = poll(server, "/channels/l?since=0&limit=3")
    assert [m["message"] for m in first["messages"]] == ["0", "1", "2"]
    rest = poll(server, f"/channels/l?since={first['cursor']}&limit=3")
    assert [m["message"] for m in rest["messages"]] == ["3", "4"]


def test_gap_when_retention_dropped_messages(make_server):
    server = make_server(hub=longpoll.Hub(retention=2))
    cursor = poll(server, "/channels/g?timeout=0")["cursor"]
    for i in range(4):
        publish(server, "g", str(i))
    body = poll(server, f"/channels/g?since={cursor}")
    assert body["gap"] is True and [m["message"] for m in body["messages"]] == ["2", "3"]


def test_cursor_from_before_a_restart_is_a_gap(make_server):
    before = make_server()
    publish(before, "r", "lost")
    stale = poll(before, "/channels/r?since=0")["cursor"]
    after = make_server()
    publish(after, "r", "kept")
    body = poll(after, f"/channels/r?since={stale}")
    assert body["gap"] is True and [m["message"] for m in body["messages"]] == ["kept"]


def test_broadcast_every_waiting_client_gets_every_message(server):
    threads = [in_thread(poll, server, "/channels/b") for _ in range(10)]
    wait_until(lambda: server.waiting == 10)
    publish(server, "b", "to all")
    for t, out in threads:
        t.join(10)
        assert [m["message"] for m in out[0]["messages"]] == ["to all"]


def test_several_channels_in_one_poll(server):
    for i, ch in enumerate("abcab"):
        publish(server, ch, str(i))
    body = poll(server, "/channels/a,b,c?since=0")
    assert [(m["channel"], m["message"]) for m in body["messages"]] == [
        ("a", "0"), ("b", "1"), ("c", "2"), ("a", "3"), ("b", "4")]


def test_sixty_subscribers_passing_cursors_get_all_300_in_order_once(server):
    """Bar: 60 subscribers, 300 messages back-to-back: all, in order, once."""
    results = {}
    ready = threading.Barrier(61)

    def subscriber(n):
        host, port = server.server_address
        conn = http.client.HTTPConnection(host, port, timeout=30)
        cursor = request(server, "GET", "/channels/bar?timeout=0", conn=conn).json["cursor"]
        ready.wait(10)
        got = []
        while len(got) < 300:
            body = request(server, "GET", f"/channels/bar?since={cursor}&timeout=10",
                           conn=conn).json
            got += [m["message"] for m in body["messages"]]
            cursor = body["cursor"]
        conn.close()
        results[n] = got

    threads = [threading.Thread(target=subscriber, args=(n,)) for n in range(60)]
    for t in threads:
        t.start()
    ready.wait(10)
    host, port = server.server_address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    for i in range(300):
        assert request(server, "POST", "/channels/bar", str(i), conn=conn).status == 201
    conn.close()
    for t in threads:
        t.join(60)
    assert len(results) == 60
    assert all(got == [str(i) for i in range(300)] for got in results.values())


# -- compatibility with the classic Flask tutorial ---------------------------

def test_send_and_receive_like_the_flask_tutorial(server):
    resp = request(server, "POST", "/send", json.dumps({"message": "hi"}),
                   {"Content-Type": "application/json"})
    assert (resp.status, resp.json) == (200, {"status": "Message sent."})
    resp = request(server, "GET", "/receive")
    assert (resp.status, resp.json) == (200, {"message": "hi"})
    # broadcast subscribers still see it
    assert poll(server, "/channels/default?since=0")["messages"][0]["message"] == "hi"


def test_receive_waits_and_each_message_goes_to_one_caller(server):
    threads = [in_thread(request, server, "GET", "/receive?timeout=20") for _ in range(3)]
    wait_until(lambda: server.waiting == 3)
    for i in range(3):
        request(server, "POST", "/send", json.dumps({"message": i}),
                {"Content-Type": "application/json"})
    got = []
    for t, out in threads:
        t.join(10)
        got.append(out[0].json["message"])
    assert sorted(got) == [0, 1, 2]


def test_receive_times_out_with_null(server):
    resp = request(server, "GET", "/receive?timeout=0.05")
    assert (resp.status, resp.json) == (200, {"message": None})


# -- operations ---------------------------------------------------------------

def test_health_counts_parked_requests(server):
    publish(server, "h", "x")
    t, _ = in_thread(poll, server, "/channels/h")
    wait_until(lambda: request(server, "GET", "/health").json["waiting"] == 1)
    body = request(server, "GET", "/health").json
    assert body["status"] == "ok" and body["channels"] == 1 and body["uptime"] >= 0
    publish(server, "h", "y")
    t.join(10)
    assert request(server, "GET", "/health").json["waiting"] == 0
    assert request(server, "HEAD", "/health").body == b""


def test_index_says_how_to_use_it(server):
    resp = request(server, "GET", "/")
    assert resp.status == 200 and b"curl" in resp.body


# -- errors -------------------------------------------------------------------

JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize("method,path,body,headers,status", [
    ("GET", "/channels/bad$name", None, {}, 400),
    ("GET", "/channels/" + "x" * 65, None, {}, 400),
    ("GET", "/channels/", None, {}, 400),
    ("GET", "/channels/a,,b", None, {}, 400),
    ("GET", "/channels/" + ",".join(f"c{i}" for i in range(33)), None, {}, 400),
    ("GET", "/channels/x?since=bogus", None, {}, 400),
    ("GET", "/channels/x?since=-1", None, {}, 400),
    ("GET", "/channels/x?timeout=-1", None, {}, 400),
    ("GET", "/channels/x?timeout=abc", None, {}, 400),
    ("GET", "/channels/x?timeout=nan", None, {}, 400),
    ("GET", "/channels/x?limit=0", None, {}, 400),
    ("GET", "/channels/x?limit=1001", None, {}, 400),
    ("GET", "/channels/x?limit=ten", None, {}, 400),
    ("POST", "/channels/x", b"{not json", JSON, 400),
    ("POST", "/channels/x", b'{"message": 1, "title": 7}', JSON, 400),
    ("POST", "/channels/x", b'', JSON, 400),
    ("POST", "/channels/x", b'{"message": NaN}', JSON, 400),
    ("POST", "/channels/x", b'{"message": 1, "priority": 9}', JSON, 400),
    ("POST", "/channels/x", b'{"message": 1, "priority": "loud"}', JSON, 400),
    ("POST", "/channels/x", b'{"message": 1, "title": 7}', JSON, 400),
    ("POST", "/channels/x", b'{"message": 1, "title": "' + b"t" * 257 + b'"}', JSON, 400),
    ("POST", "/channels/x", b"[" * 100000, JSON, 400),
    ("POST", "/channels/x", b"\xff\xfe bad utf-8", {}, 400),
    ("POST", "/channels/x", b"ok", {"Priority": "9"}, 400),
    ("POST", "/channels/x", b"ok", {"Title": "\xff".encode("latin-1").decode("latin-1")}, 400),
    ("POST", "/channels/a,b", b"ok", {}, 400),
    ("POST", "/send", b"{bad", JSON, 400),
    ("GET", "/receive?timeout=x", None, {}, 400),
    ("GET", "/nowhere", None, {}, 404),
    ("GET", "/channels", None, {}, 404),
    ("DELETE", "/channels/x", None, {}, 405),
    ("PATCH", "/channels/x", b"x", {}, 405),
    ("POST", "/health", b"x", {}, 405),
    ("GET", "/send", None, {}, 405),
    ("POST", "/receive", None, {}, 405),
    ("POST", "/channels/x", b"x" * ((1 << 20) + 1), {}, 413),
], ids=lambda v: repr(v)[:40] if isinstance(v, (str, bytes)) else None)
def test_bad_requests_get_their_status_with_a_json_error(server, method, path, body, headers,
                                                         status):
    resp = request(server, method, path, body, headers)
    assert resp.status == status, resp
    assert resp.headers["Content-Type"] == "application/json"
    assert isinstance(resp.json["error"], str) and resp.json["error"]
    if status == 405:
        assert resp.headers["Allow"]
    assert server.hub.read("x", "0").messages == []


def test_405_names_the_allowed_methods(server):
    resp = request(server, "DELETE", "/channels/x")
    assert resp.headers["Allow"] == "GET, POST, PUT"


def test_oversized_body_is_refused_before_it_is_sent(make_server):
    server = make_server(max_body=100)
    data = raw(server, b"POST /channels/x HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n"
                       b"Expect: 100-continue\r\n\r\n")
    status, body = parse_raw(data)
    assert status == 413 and "100" in body["error"]


@pytest.mark.parametrize("data,status", [
    (b"garbage\r\n\r\n", 400),
    (b"\x00\x01\x02\xff\r\n\r\n", 400),
    (b"GET /channels/x HTTP/9.9\r\n\r\n", 505),
    (b"GET / HTTP/1.1\r\nBad header line\r\n\r\n", 400),
    (b"GET " + b"/" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nX: " + b"y" * 70000 + b"\r\n\r\n", 431),
    (b"POST /channels/x HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400),
    (b"POST /channels/x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
    (b"POST /channels/x HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    (b"POST /channels/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    (b"GET /\r\n\r\n", 400),
    (b"\x1c\r\n\r\n", 400),  # whitespace to str.split(): found by hypothesis
    (b" \t \r\n\r\n", 400),
], ids=lambda v: repr(v)[:40] if isinstance(v, bytes) else None)
@pytest.mark.serve_only  # (under ASGI the host server reads the HTTP)
def test_raw_garbage_gets_a_json_error_and_harms_nobody(server, data, status):
    publish(server, "keep", "stored")
    parked, out = in_thread(poll, server, "/channels/keep?since=" + server.hub.cursor)
    wait_until(lambda: server.waiting == 1)
    got, body = parse_raw(raw(server, data))
    assert got == status and body["error"]
    publish(server, "keep", "still delivered")
    parked.join(10)
    assert [m["message"] for m in out[0]["messages"]] == ["still delivered"]
    assert len(server.hub.read("keep", "0").messages) == 2


def test_client_that_disconnects_mid_body_harms_nobody(server):
    host, port = server.server_address
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(b"POST /channels/x HTTP/1.1\r\nContent-Length: 100\r\n\r\nonly a part")
    publish(server, "x", "fine")
    assert [m["message"] for m in poll(server, "/channels/x?since=0")["messages"]] == ["fine"]


# -- connections --------------------------------------------------------------

def test_keep_alive_reuses_one_connection(server):
    host, port = server.server_address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.connect()
    sock = conn.sock
    for i in range(20):
        assert request(server, "POST", "/channels/k", str(i), conn=conn).status == 201
    assert request(server, "GET", "/channels/k?since=0&timeout=0", conn=conn).status == 200
    assert request(server, "GET", "/nowhere", conn=conn).status == 404
    assert conn.sock is sock  # never reconnected
    conn.close()


def test_keep_alive_after_a_long_poll_answer(server):
    host, port = server.server_address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    assert request(server, "GET", "/channels/k?timeout=0.01", conn=conn).status == 200
    sock = conn.sock
    assert request(server, "POST", "/channels/k", "x", conn=conn).status == 201
    assert conn.sock is sock
    conn.close()


def test_http_1_0_gets_an_answer_and_a_close(server):
    data = raw(server, b"GET /health HTTP/1.0\r\n\r\n")
    status, body = parse_raw(data)
    assert status == 200 and body["status"] == "ok"
    assert b"connection: close" in data.lower()  # (header names have no case)


def test_a_request_not_finished_in_time_gets_408_and_a_close(make_server):
    server = make_server(read_timeout=0.2)
    host, port = server.server_address
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n")  # and then nothing
        data = b""
        while chunk := sock.recv(4096):  # until the server hangs up (else: 5 s timeout)
            data += chunk
    status, body = parse_raw(data)
    assert status == 408 and body["error"]


def test_an_idle_connection_is_closed_after_the_read_timeout(make_server):
    server = make_server(read_timeout=0.2)
    host, port = server.server_address
    with socket.create_connection((host, port), timeout=5) as sock:
        assert sock.recv(100) == b""  # closed without a word (recv would time out at 5 s)
    wait_until(lambda: not server._connections)


def test_close_answers_every_parked_client(make_server):
    server = make_server()
    threads = [in_thread(request, server, "GET", "/channels/s") for _ in range(20)]
    wait_until(lambda: server.waiting == 20)
    server.close()
    for t, out in threads:
        t.join(5)
        assert out and out[0].status == 200 and out[0].headers["Connection"] == "close"


def test_close_does_not_hang_on_idle_keep_alive_connections(make_server):
    server = make_server(read_timeout=60)
    host, port = server.server_address
    conns = [http.client.HTTPConnection(host, port, timeout=10) for _ in range(5)]
    for conn in conns:
        assert request(server, "GET", "/health", conn=conn).status == 200
    wait_until(lambda: len(server._connections) == 5)
    server.close(timeout=2)
    assert not server._connections
    for conn in conns:
        conn.close()


def test_port_zero_reports_the_real_port(server):
    host, port = server.server_address
    assert port != 0 and server.url == f"http://127.0.0.1:{port}"


def test_three_channels_interleaved_come_in_publish_order_and_resume_with_one_cursor(server):
    for i in range(9):
        publish(server, "abc"[i % 3] + "3", str(i))
    first = poll(server, "/channels/a3,b3,c3?since=0&limit=4")
    assert [m["message"] for m in first["messages"]] == ["0", "1", "2", "3"]
    for i in range(9, 12):
        publish(server, "abc"[i % 3] + "3", str(i))
    rest = poll(server, f"/channels/a3,b3,c3?since={first['cursor']}")
    assert [m["message"] for m in rest["messages"]] == [str(i) for i in range(4, 12)]
    assert [m["channel"] for m in rest["messages"]] == ["b3", "c3", "a3"] * 2 + ["b3", "c3"]


@pytest.mark.parametrize("selector", ["_Epoll", "_Selector"])
def test_a_preferred_socket_comes_first_in_a_turn(selector):
    """A connection that publishes is read before the re-polls that were
    ready before it (Loop.prefer), on epoll and on selectors; after it is
    unregistered, its number can serve another socket unpreferred."""
    if selector == "_Epoll" and not hasattr(select, "epoll"):
        pytest.skip("no epoll on this system: the loop uses selectors")
    chosen = getattr(longpoll, selector)()
    pairs = [socket.socketpair() for _ in range(5)]
    try:
        for index, (ours, _) in enumerate(pairs):
            chosen.register(ours, selectors.EVENT_READ, index)
        chosen.prefer(pairs[3][0])
        for _, theirs in pairs:  # all ready, the preferred one among the last
            theirs.send(b"x")
        ready = [data for data, _ in chosen.ready(5)]
        assert ready[0] == 3 and sorted(ready) == [0, 1, 2, 3, 4]
        for ours, _ in pairs:
            ours.recv(1)
        chosen.unregister(pairs[3][0])
        pairs[3][0].close()
        pairs[3] = socket.socketpair()  # (likely the same number again)
        chosen.register(pairs[3][0], selectors.EVENT_READ, 5)
        pairs[0][1].send(b"x")
        pairs[3][1].send(b"x")
        assert [data for data, _ in chosen.ready(5)] == [0, 5]  # in the order they came
    finally:
        chosen.close()
        for ours, theirs in pairs:
            ours.close()
            theirs.close()


@pytest.mark.parametrize("selector", ["_Epoll", "_Selector"])
def test_the_loop_on_epoll_and_on_selectors(make_server, monkeypatch, selector):
    """The loop polls epoll itself on Linux, selectors' best elsewhere (macOS,
    BSD): each wakes a parked poll, writes more than the socket takes in
    pieces (waiting to write, then back to reading), and closes."""
    if selector == "_Epoll" and not hasattr(select, "epoll"):
        pytest.skip("no epoll on this system: the loop uses selectors")
    monkeypatch.setattr(longpoll, "_LoopSelector", getattr(longpoll, selector))
    server = make_server()
    assert type(server.loop._selector).__name__ == selector
    thread, out = in_thread(poll, server, "/channels/sel?timeout=10")
    wait_until(lambda: parked_on(server, "sel") == 1, what="the poll parked")
    publish(server, "sel", "woken")
    thread.join(10)
    assert not thread.is_alive() and out[0]["messages"][0]["message"] == "woken"
    with socket.create_connection(server.server_address[:2], timeout=10) as sock:
        sock.sendall(b"GET /channels/big/events HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_until(lambda: parked_on(server, "big") == 1, what="the stream open")
        for _ in range(8):  # more than the socket buffers take
            server.hub.publish("big", "y" * (1 << 20))
        wait_until(lambda: any(c.queued for c in list(server.loop.connections)),
                   what="the stream to wait for the socket")
        received = b""
        while received.count(b"\n\n") < 9:  # the opening, then 8 events: all of it
            received += sock.recv(1 << 20)
        assert publish(server, "sel", "after")  # and the loop goes on
    wait_until(lambda: not server.loop.connections, what="the closed one gone")
