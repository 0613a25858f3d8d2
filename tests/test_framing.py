"""One request reader, strict per RFC 9112, and the bounds of the serving core.

Each test here is a defect an outside audit found in the core that had two
HTTP readers; the answers are read by h11, a strict HTTP parser.
"""
import http.client
import json
import resource
import socket
import threading
import time
import tracemalloc

import pytest
from hypothesis import given, settings, strategies as st

import longpoll
from conftest import request, strict_responses, talk, wait_until

HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture
def strict(make_server):
    """A server that would wait 30 s for the rest of a request (so an
    answer within the socket's 5 s shows it refused at once)."""
    return make_server(read_timeout=30.0)


def answers(server, data, **kwargs):
    return strict_responses(talk(server, data, **kwargs))


# -- smuggling openings: each is refused and the connection closed ---------------------

@pytest.mark.parametrize("data", [
    # Content-Length and Transfer-Encoding together
    b"POST /channels/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + HEALTH,
    # whitespace between a header name and its colon
    b"POST /channels/x HTTP/1.1\r\nHost: x\r\nContent-Length\t: 5\r\n\r\nhello" + HEALTH,
    # an obs-folded header line
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n folded\r\n\r\n" + HEALTH,
    # HTTP/1.0 with chunked
    b"POST /channels/x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    + HEALTH,
    # Transfer-Encoding twice
    b"POST /channels/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n" + HEALTH,
    b"POST /channels/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n" + HEALTH,
], ids=["cl+te", "space-before-colon", "obs-fold", "http1.0-chunked", "te-twice",
        "te-identity-then-chunked"])
def test_ambiguous_framing_is_refused_and_closes(strict, data):
    got = answers(strict, data)
    assert len(got) == 1, got  # nothing after it is read as a request
    status, headers, body = got[0]
    assert status in (400, 501) and json.loads(body)["error"]
    assert headers["connection"] == "close"
    assert strict.hub.read("x", "0").messages == []  # nothing was published


@pytest.mark.parametrize("data,status", [
    (b"GET /health HTTP/1.1\nHost: x\n\n", 400),                # bare LF
    (b"GET /health\r\n", 400),                                  # HTTP/0.9
    (b"POST /channels/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"100000000000000000000\r\n", 413),                        # a chunk of 2^80 bytes
    (b"GET /health HTTP/1.1\r\n\r\n", 400),                     # no Host
    (b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n", 400),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX: a\rb\r\n\r\n", 400),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX: a\x1bb\r\n\r\n", 400),
    (b"POST /channels/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0x5\r\nhello\r\n0\r\n\r\n", 400),
    (b"POST /channels/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"+5\r\nhello\r\n0\r\n\r\n", 400),
    (b"POST /channels/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0_5\r\nhello\r\n0\r\n\r\n", 400),
    (b"POST /channels/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"5\r\nhelloXX0\r\n\r\n", 400),                            # no CRLF after the data
    (b"GET /\x1b[31mred HTTP/1.1\r\nHost: x\r\n\r\n", 400),     # controls in the target
], ids=["bare-lf", "http0.9", "chunk-2^80", "no-host", "two-hosts", "nul", "bare-cr",
        "esc-in-value", "chunk-0x5", "chunk-+5", "chunk-0_5", "chunk-no-crlf", "esc-target"])
def test_bad_requests_are_refused_at_once(strict, data, status):
    started = time.monotonic()
    got = answers(strict, data)
    assert [s for s, _, _ in got] == [status]
    assert json.loads(got[0][2])["error"]
    assert time.monotonic() - started < 5  # not the 30 s read timeout's 408
    assert strict.hub.read("x", "0").messages == []


def test_absolute_form_is_accepted(strict):
    ((status, _, body),) = answers(
        strict, b"GET http://example.com/health HTTP/1.1\r\nHost: example.com\r\n"
                b"Connection: close\r\n\r\n")
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_a_repeated_header_block_is_checked_like_a_new_one():
    """Re-polls send the same header lines each time, and the reader reuses
    what it parsed of them; the request line, Host in HTTP/1.1 and the
    framing are still checked for every request."""
    block = b"Host: x\r\nAccept: */*\r\n\r\n"
    reader = longpoll.RequestReader()
    reader.feed(b"GET /channels/a?since=1 HTTP/1.1\r\n" + block +
                b"GET /channels/a?since=2 HTTP/1.1\r\n" + block)
    first, second = reader.read_head(), reader.read_head()
    assert (first.target, second.target) == ("/channels/a?since=1", "/channels/a?since=2")
    assert second.headers is first.headers  # the parse reused (headers are never changed)
    for data in (b"GET / HTTP/1.0\r\nAccept: */*\r\n\r\nGET / HTTP/1.1\r\nAccept: */*\r\n\r\n",
                 b"GET / HTTP/1.1\r\n" + block + b"GET /\x01 HTTP/1.1\r\n" + block,
                 b"GET / HTTP/1.1\r\n" + block + b"GET / HTTP/2.0\r\n" + block,
                 b"GET / HTTP/1.1\r\n" + block + b"GET /a\nb HTTP/1.1\r\n" + block,
                 b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                 b"POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"):
        reader = longpoll.RequestReader()
        reader.feed(data)
        good = reader.read_head()
        if good.has_body:
            assert reader.read_body() == b""
        with pytest.raises(longpoll.LongpollError) as caught:
            reader.read_head()
        assert caught.value.status in (400, 505), data


def test_a_get_with_a_body_keeps_the_next_pipelined_request(strict):
    data = (b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
            b"POST /channels/x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
            b"GET /channels/x?since=0&timeout=0 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    got = answers(strict, data)
    assert [s for s, _, _ in got] == [200, 201, 200]
    assert [m["message"] for m in json.loads(got[2][2])["messages"]] == ["hi"]


def test_a_channel_named_events_is_a_channel(server):
    assert request(server, "POST", "/channels/events", "e").status == 201
    resp = request(server, "GET", "/channels/events?since=0")
    assert resp.status == 200 and resp.json["messages"][0]["message"] == "e"


# -- the framing property -------------------------------------------------------------

valid_request = st.one_of(
    st.just(HEALTH),
    st.binary(max_size=300).map(lambda body: b"POST /channels/p HTTP/1.1\r\nHost: x\r\n"
                                b"Content-Length: %d\r\n\r\n" % len(body) + body),
    st.lists(st.binary(min_size=1, max_size=50), max_size=4).map(
        lambda chunks: b"POST /channels/p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
                       b"\r\n\r\n" + b"".join(b"%x;ext=1\r\n" % len(c) + c + b"\r\n"
                                              for c in chunks) + b"0\r\nTrailer: t\r\n\r\n"),
    st.just(b"GET /channels/p?since=0&timeout=0 HTTP/1.1\r\nHost: x\r\n\r\n"),
    st.just(b"\r\nGET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"),
)
mangled = st.tuples(valid_request, st.integers(0, 400), st.binary(min_size=1, max_size=3)).map(
    lambda t: t[0][:t[1]] + t[2] + t[0][t[1]:])


def read_all(data, pieces):
    """Feed *data* to a reader in *pieces*; what it reads: requests, then maybe one error."""
    reader, out, request, at = longpoll.RequestReader(max_body=1000), [], None, 0
    cuts = []
    for size in pieces:
        cuts.append(data[at:at + size])
        at += size
    cuts.append(data[at:])
    try:
        for piece in cuts:
            reader.feed(piece)
            while True:
                if request is None:
                    request = reader.read_head()
                    if request is None:
                        break
                body = reader.read_body() if request.has_body else b""
                if body is None:
                    break
                out.append((request.method, request.target, body))
                request = None
    except longpoll.LongpollError as error:
        out.append(error.status)
    return out


@settings(max_examples=400, deadline=None)
@given(stream=st.lists(st.one_of(valid_request, mangled), min_size=1, max_size=6),
       pieces=st.lists(st.integers(0, 60), max_size=30))
def test_any_cut_of_a_byte_stream_reads_as_the_same_requests(stream, pieces):
    data = b"".join(stream)
    whole = read_all(data, [])
    assert read_all(data, pieces) == whole
    assert read_all(data, [1] * len(data)) == whole
    for item in whole:  # a request, or a refusal with a 4xx/5xx status
        assert isinstance(item, tuple) or 400 <= item < 600


@pytest.fixture(scope="module")
def module_server():
    server = longpoll.make_server("127.0.0.1", 0, read_timeout=30.0).start()
    yield server
    server.close()
    assert not server._thread.is_alive()


@settings(max_examples=60, deadline=None)
@given(stream=st.lists(valid_request, min_size=1, max_size=5),
       pieces=st.lists(st.integers(1, 80), max_size=10))
def test_over_a_socket_every_request_gets_one_answer_in_order(module_server, stream, pieces):
    data = b"".join(stream) + b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    got = answers(module_server, data, pieces=pieces)
    assert len(got) == len(stream) + 1 and got[-1][0] == 200
    for sent, (status, _, _) in zip(stream, got):  # (a body that is not UTF-8 is a 400)
        assert status in ((201, 400) if sent.startswith(b"POST") else (200,))


# -- bounds -----------------------------------------------------------------------------

def test_a_lone_surrogate_is_a_400_not_a_500(server):
    json_type = {"Content-Type": "application/json"}
    for path, body in [("/channels/x", '{"message": "\\ud800"}'),
                       ("/channels/x", '{"message": "m", "title": "\\udfff"}'),
                       ("/channels/x", '{"message": {"\\ud800": 1}}'),
                       ("/send", '{"message": "\\ud800"}')]:
        resp = request(server, "POST", path, body, json_type)
        assert resp.status == 400 and "surrogate" in resp.json["error"], resp
    assert request(server, "GET", "/health").status == 200


def test_a_message_of_many_small_values_retains_little_memory(server):
    body = json.dumps({"message": [[]] * 300_000}, separators=(",", ":")).encode()
    assert len(body) < longpoll.MAX_BODY
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        assert request(server, "POST", "/channels/big", body,
                       {"Content-Type": "application/json"}).status == 201
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert retained < 5 << 20, f"{retained / 1e6:.1f} MB retained for a 1 MiB message"
    (msg,) = server.hub.read("big", "0").messages
    assert msg.message == [[]] * 300_000


def test_a_poll_answer_is_capped_in_bytes(make_server):
    server = make_server(max_answer=300_000)
    for i in range(5):
        server.hub.publish("fat", f"{i}" * 200_000)
    got, since = [], "0"
    while len(got) < 5:
        answer = request(server, "GET", f"/channels/fat?since={since}&timeout=0").json
        assert len(answer["messages"]) == 1  # each answer: one message, whatever the limit
        got += [m["message"][0] for m in answer["messages"]]
        since = answer["cursor"]
    assert got == list("01234")


def test_a_stream_that_never_reads_is_cut_and_others_go_on(make_server):
    server = make_server(max_queued=1 << 20, max_answer=1 << 20)
    host, port = server.server_address
    stuck = socket.create_connection((host, port), timeout=10)
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.sendall(b"GET /channels/s/events HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_until(lambda: server.waiting == 1)
    honest = http.client.HTTPConnection(host, port, timeout=10)
    for i in range(40):  # 40 MiB published; the stuck one may hold 1 MiB more than it read
        server.hub.publish("s", "x" * (1 << 20))
        if server.loop.cut:
            break
    wait_until(lambda: server.loop.cut == 1, what="the stuck stream to be cut")
    assert request(server, "GET", "/channels/s?since=0&timeout=0&limit=1",
                   conn=honest).status == 200
    wait_until(lambda: server.waiting == 0)
    stuck.close()
    honest.close()
    assert "longpoll_slow_clients_cut_total 1" in server.metrics_text()


def test_a_stream_that_fell_behind_once_is_not_cut_later(make_server):
    server = make_server(read_timeout=0.5, keepalive=0.2)
    host, port = server.server_address
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"GET /channels/b/events HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_until(lambda: server.waiting == 1)
        for _ in range(8):  # more than the socket buffers take: it falls behind
            server.hub.publish("b", "y" * (1 << 20))
        (conn,) = server._connections
        wait_until(lambda: conn.queued > 0, what="the stream to fall behind")
        received = b""
        while received.count(b"\n\n") < 9:  # it catches up: reads everything
            received += sock.recv(1 << 20)
        # Past its old write deadline, it still gets keepalives: not cut.
        past = time.monotonic() + 1.5
        while time.monotonic() < past or b": keepalive" not in received[-64:]:
            chunk = sock.recv(65536)
            assert chunk, "the stream was cut"
            received += chunk
    assert server.loop.cut == 0


def test_a_body_far_over_the_limit_gets_its_413(server):
    requests = pytest.importorskip("requests")
    resp = requests.post(server.url + "/channels/x", data=b"z" * (20 << 20), timeout=30)
    assert resp.status_code == 413 and "limit" in resp.json()["error"]
    host, port = server.server_address
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("POST", "/channels/x", body=b"z" * (20 << 20))
    assert conn.getresponse().status == 413
    conn.close()


def test_expect_100_continue_is_answered_after_auth(make_server):
    server = make_server(auth=longpoll.Auth({"t": {"read": ["*"], "write": ["*"]}}))
    got = talk(server, b"POST /channels/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                       b"Expect: 100-continue\r\n\r\n")
    assert not got.startswith(b"HTTP/1.1 100")
    assert [s for s, _, _ in strict_responses(got)] == [401]
    got = talk(server, b"POST /channels/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                       b"Authorization: Bearer t\r\nExpect: 100-continue\r\n\r\nhello"
                       b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert [s for s, _, _ in strict_responses(got)] == [201, 200]


# -- who is who ---------------------------------------------------------------------------

def test_invented_tokens_do_not_lift_limits_without_auth(make_server):
    server = make_server(trust_proxy=True, publish_rate=1, publish_burst=5)
    statuses = [request(server, "POST", f"/channels/x?token=random{i}", "m",
                        {"X-Forwarded-For": "203.0.113.9"}).status for i in range(20)]
    assert statuses[:5] == [201] * 5 and statuses.count(429) >= 14


def test_tokens_are_masked_however_spelled_and_controls_escaped(server, caplog):
    caplog.set_level("INFO", logger="longpoll")
    request(server, "GET", "/channels/x?%74oken=SECRET1&timeout=0")
    request(server, "GET", "/channels/x?token=SECRET2&timeout=0")
    talk(server, b"GET /\x1b[2J HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_until(lambda: len([r for r in caplog.records if '"' in r.getMessage()]) >= 3)
    text = caplog.text
    assert "SECRET" not in text and "\x1b" not in text
    assert "%74oken=***" in text and "\\x1b" in text


def test_a_revoked_token_ends_its_streams(make_server):
    server = make_server(auth=longpoll.Auth({"old": {"read": ["*"]}, "w": {"write": ["*"]}}))
    host, port = server.server_address
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"GET /channels/r/events HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer old\r\n\r\n")
        wait_until(lambda: server.waiting == 1)
        server.auth = longpoll.Auth({"new": {"read": ["*"]}, "w": {"write": ["*"]}})
        wait_until(lambda: server.waiting == 0, what="the revoked stream to end")
        server.hub.publish("r", "after the revocation")
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert b"after the revocation" not in received


def test_one_address_holding_many_connections_does_not_stop_another(make_server):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2600:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    server = make_server(max_connections_per_client=100)
    host, port = server.server_address
    hog = []
    try:
        for _ in range(1000):  # idle keep-alive connections, each used once
            sock = socket.create_connection((host, port), timeout=10,
                                            source_address=("127.0.0.2", 0))
            sock.sendall(HEALTH)
            hog.append(sock)
        assert hog[-1].recv(65536).startswith(b"HTTP/1.1 200")  # the last one was served
        assert len(server._connections) <= 100  # the idle ones made room
        started = time.monotonic()
        out = []
        waiter = threading.Thread(target=lambda: out.append(strict_responses(talk(
            server, b"GET /channels/rt?timeout=10 HTTP/1.1\r\nHost: x\r\nConnection: close"
                    b"\r\n\r\n", timeout=10, source="127.0.0.3"))))
        waiter.start()
        wait_until(lambda: server.waiting == 1)
        (published,) = strict_responses(talk(
            server, b"POST /channels/rt HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                    b"Connection: close\r\n\r\nrt", source="127.0.0.3"))
        waiter.join(10)
        assert not waiter.is_alive()
        assert published[0] == 201
        ((status, _, body),) = out[0]
        assert json.loads(body)["messages"][0]["message"] == "rt"
        assert time.monotonic() - started < 1.0
    finally:
        for sock in hog:
            sock.close()


def test_at_its_cap_an_address_with_no_idle_connection_gets_503(make_server):
    server = make_server(max_connections_per_client=2)
    parked = [threading.Thread(target=talk, args=(
        server, b"GET /channels/cap?timeout=10 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        kwargs={"source": "127.0.0.2", "timeout": 10}) for _ in range(2)]
    for t in parked:
        t.start()
    wait_until(lambda: server.waiting == 2)
    ((status, headers, body),) = answers(server, HEALTH, source="127.0.0.2")
    assert status == 503 and headers["retry-after"] == "5" and json.loads(body)["error"]
    assert answers(server, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                   source="127.0.0.3")[0][0] == 200  # another address
    server.hub.publish("cap", "go")
    for t in parked:
        t.join(10)
        assert not t.is_alive()
    assert "longpoll_connections_refused_total 1" in server.metrics_text()


# -- one table of options -------------------------------------------------------------------

def test_every_option_is_a_serve_flag_and_a_make_server_keyword(capsys):
    with pytest.raises(SystemExit):
        longpoll.main(["serve", "--help"])
    text = capsys.readouterr().out
    for option in longpoll.OPTIONS:
        assert "--" + option.name.replace("_", "-") in text
    server = longpoll.make_server("127.0.0.1", 0, retention=7, max_queued=12345)
    try:
        assert (server.hub.retention, server.max_queued, server.loop.max_queued) == \
            (7, 12345, 12345)
        assert server.read_timeout == 30.0  # the table's default
    finally:
        server.close()
    with pytest.raises(TypeError, match="max_bogus"):
        longpoll.make_server("127.0.0.1", 0, max_bogus=1)
