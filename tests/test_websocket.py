"""WebSockets (RFC 6455) on the channel URLs: real third-party clients
(websockets, websocket-client), the handshake's refusals, and frames no
library would send, written by hand."""
import contextlib
import json
import socket
import threading

import pytest
import websocket  # websocket-client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import connect

import longpoll
from conftest import WsReader, parked_on, request, wait_until, ws_frame, ws_open

pytestmark = pytest.mark.asgi_too


def ws_url(server, path):
    return server.url.replace("http://", "ws://", 1) + path


def publish(server, channel, message, **fields):
    body = json.dumps({"message": message, **fields})
    answer = request(server, "POST", f"/channels/{channel}", body,
                     {"Content-Type": "application/json"})
    assert answer.status == 201, answer
    return answer.json["id"]


# -- real clients ---------------------------------------------------------------------

def test_websockets_reads_what_is_held_then_each_publish_as_a_text_frame(server):
    first = publish(server, "a", "held")
    with connect(ws_url(server, "/channels/a,b/ws?since=0")) as ws:
        assert json.loads(ws.recv(timeout=5)) == {"event": "open", "cursor": "0"}
        held = json.loads(ws.recv(timeout=5))
        assert (held["id"], held["message"]) == (first, "held")
        publish(server, "b", {"n": 1}, title="T", priority=4)
        message = json.loads(ws.recv(timeout=5))
        assert (message["channel"], message["message"], message["title"],
                message["priority"]) == ("b", {"n": 1}, "T", 4)
        ws.send("a text message from the client: read, and dropped")
        assert ws.ping().wait(5)  # the server pongs
        publish(server, "a", "after")
        assert json.loads(ws.recv(timeout=5))["message"] == "after"


def test_websocket_client_on_the_channel_url_with_upgrade(server):
    ws = websocket.create_connection(ws_url(server, "/channels/c"), timeout=5)
    try:
        opened = json.loads(ws.recv())
        assert opened["event"] == "open" and opened["cursor"].endswith("-0")
        wait_until(lambda: parked_on(server, "c") == 1)
        big = "x" * 70_000  # a 64-bit length
        publish(server, "c", big)
        assert json.loads(ws.recv())["message"] == big
    finally:
        ws.close()


def test_the_open_frame_gives_the_cursor_to_resume_from(server):
    with connect(ws_url(server, "/channels/r/ws")) as ws:
        cursor = json.loads(ws.recv(timeout=5))["cursor"]
    published = publish(server, "r", "while away")
    with connect(ws_url(server, f"/channels/r/ws?since={cursor}")) as ws:
        ws.recv(timeout=5)  # open
        assert json.loads(ws.recv(timeout=5))["id"] == published


def read_messages(client, count):
    """*count* message frames from either library's socket (open skipped)."""
    got = []
    while len(got) < count:
        event = json.loads(client.recv())
        if "event" not in event:
            got.append(event)
    return got


@pytest.mark.parametrize("library", ["websockets", "websocket-client"])
def test_resume_across_a_server_restart_with_sqlite_loses_and_repeats_nothing(
        make_server, tmp_path, library):
    store = f"sqlite:{tmp_path / 'ws.db'}"
    server = make_server(store=store)

    @contextlib.contextmanager
    def open_socket(url):
        if library == "websockets":
            with connect(url, open_timeout=5) as client:
                yield client
        else:
            client = websocket.create_connection(url, timeout=5)
            try:
                yield client
            finally:
                client.close()

    with open_socket(ws_url(server, "/channels/x/ws?since=0")) as client:
        for n in range(3):
            publish(server, "x", n)
        seen = read_messages(client, 3)
    server.close()
    server = make_server(store=store)  # the same file: the same history
    publish(server, "x", 3)  # while nobody is connected
    with open_socket(ws_url(server, f"/channels/x/ws?since={seen[-1]['id']}")) as client:
        publish(server, "x", 4)
        seen += read_messages(client, 2)
    assert [m["message"] for m in seen] == [0, 1, 2, 3, 4]
    assert len({m["id"] for m in seen}) == 5


def test_a_gap_is_a_frame_of_its_own_before_the_messages_after_it(make_server):
    server = make_server(hub=longpoll.Hub(retention=2))
    first = publish(server, "g", 0)
    for n in range(1, 5):
        publish(server, "g", n)
    with connect(ws_url(server, f"/channels/g/ws?since={first}")) as ws:
        frames = [json.loads(ws.recv(timeout=5)) for _ in range(4)]
    assert frames[0]["event"] == "open"
    assert frames[1] == {"event": "gap"}
    assert [f["message"] for f in frames[2:]] == [3, 4]


def test_the_server_pings_every_keepalive_and_answers_a_close_with_its_code(make_server):
    server = make_server(keepalive=0.05)
    sock, status, _, rest = ws_open(server)
    with sock:
        assert status == 101
        reader = WsReader(sock, rest)
        assert reader.text()["event"] == "open"
        assert reader.frame() == (0x9, b"")  # a ping, with nothing published
        sock.sendall(ws_frame(b"\x03\xe8bye", 0x8))  # close 1000
        assert reader.close_code() == 1000
        assert sock.recv(10) == b""  # and the server closed the connection


def test_closing_the_server_tells_each_websocket_it_is_going_away(make_server):
    server = make_server()
    sock, _, _, rest = ws_open(server)
    with sock:
        wait_until(lambda: parked_on(server, "ws") == 1)
        closer = threading.Thread(target=server.close)
        closer.start()
        assert WsReader(sock, rest).close_code() == 1001
        closer.join(10)
        assert not closer.is_alive()


def test_a_parked_websocket_costs_a_socket_not_a_thread(server):
    threads = threading.active_count()
    opened = [ws_open(server) for _ in range(200)]
    try:
        wait_until(lambda: parked_on(server, "ws") == 200)
        assert threading.active_count() == threads
        publish(server, "ws", "to all")
        for sock, _, _, rest in opened:
            reader = WsReader(sock, rest)
            assert reader.text()["event"] == "open"
            assert reader.text()["message"] == "to all"
    finally:
        for sock, *_ in opened:
            sock.close()


# -- the handshake's refusals ------------------------------------------------------------

def handshake(server, path, headers):
    sock, status, head, rest = ws_open(server, path, headers)
    sock.close()
    return status, head


def test_a_plain_get_of_the_ws_path_is_told_to_upgrade(server):
    answer = request(server, "GET", "/channels/a/ws")
    assert answer.status == 426
    assert answer.headers["Upgrade"] == "websocket"
    assert "Upgrade: websocket" in answer.json["error"]


@pytest.mark.serve_only  # (under ASGI the host does the handshake)
@pytest.mark.parametrize("headers, status, words", [
    ({"Sec-WebSocket-Version": "8"}, 426, b"Sec-WebSocket-Version: 13"),
    ({"Sec-WebSocket-Key": "short"}, 400, b"16 bytes in base64"),
    ({"Origin": "https://elsewhere.example"}, 403, b"--cors-origin"),
])
def test_a_bad_handshake_is_refused_with_a_clear_error(server, headers, status, words):
    host, port = server.server_address[:2]
    sock = socket.create_connection((host, port), timeout=5)
    with sock:
        lines = {"Host": f"{host}:{port}", "Upgrade": "websocket", "Connection": "Upgrade",
                 "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                 "Sec-WebSocket-Version": "13", **headers}
        sock.sendall(("GET /channels/a/ws HTTP/1.1\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in lines.items()) + "\r\n").encode())
        data = sock.recv(65536)
    assert data.startswith(b"HTTP/1.1 %d " % status)
    assert words in data


def test_origins_the_server_allows_may_open_a_websocket(make_server):
    server = make_server(cors_origins=["https://app.example"])
    host, port = server.server_address[:2]
    for origin in ("https://app.example", f"http://{host}:{port}"):  # allowed, same origin
        status, _ = handshake(server, "/channels/a/ws", {"Origin": origin})
        assert status == 101
    assert handshake(server, "/channels/a/ws", {"Origin": "https://evil.example"})[0] == 403


def test_auth_and_limits_apply_as_for_event_streams(make_server):
    server = make_server(auth=longpoll.Auth({"r": {"read": ["news"]}}), max_waiting=1)
    assert handshake(server, "/channels/news/ws", {})[0] == 401
    assert handshake(server, "/channels/secret/ws?token=r", {})[0] == 403
    sock, status, _, _ = ws_open(server, "/channels/news/ws?token=r")
    with sock:
        assert status == 101
        wait_until(lambda: parked_on(server, "news") == 1)
        status, head = handshake(server, "/channels/news/ws",
                                 {"Authorization": "Bearer r"})
        assert status == 503 and b"Retry-After" in head  # --max-waiting


def test_new_auth_rules_close_the_sockets_they_no_longer_allow_with_1008(make_server):
    server = make_server(auth=longpoll.Auth({"r": {"read": ["news"]}}))
    sock, status, _, rest = ws_open(server, "/channels/news/ws?token=r")
    with sock:
        assert status == 101
        wait_until(lambda: parked_on(server, "news") == 1)
        server.auth = longpoll.Auth({"r": {"read": ["other"]}})  # as SIGHUP does
        assert WsReader(sock, rest).close_code() == 1008


# -- frames --------------------------------------------------------------------------------

def close_code_after(server, *frames):
    sock, status, _, rest = ws_open(server)
    with sock:
        assert status == 101
        sock.sendall(b"".join(frames))
        return WsReader(sock, rest).close_code()


@pytest.mark.parametrize("frames, code", [
    ([ws_frame(b"hi", mask=None)], 1002),                      # unmasked
    ([ws_frame(b"hi", rsv=1)], 1002),                          # a reserved bit
    ([ws_frame(b"hi", opcode=0x3)], 1002),                     # an unknown opcode
    ([ws_frame(b"", opcode=0x9, fin=False)], 1002),            # a fragmented ping
    ([ws_frame(b"x" * 126, opcode=0x9)], 1002),                # a ping over 125 bytes
    ([ws_frame(b"more", opcode=0x0)], 1002),                   # a continuation of nothing
    ([ws_frame(b"a", fin=False), ws_frame(b"b")], 1002),       # a message inside another
    ([ws_frame(b"\xff\xfe")], 1007),                           # text that is not UTF-8
    ([ws_frame(b"\xe2\x82", fin=False), ws_frame(b"", opcode=0x0)], 1007),  # cut in two
    ([ws_frame(b"", length=1 << 40)], 1009),                   # told too large at once
    ([ws_frame(b"x", opcode=0x8)], 1002),                      # a one-byte close code
    ([ws_frame(b"\x03\xed", opcode=0x8)], 1002),               # close code 1005
    ([ws_frame(b"\x03\xe8\xff", opcode=0x8)], 1007),           # a reason not UTF-8
    ([ws_frame(b"", opcode=0x8)], None),                       # a close with no code
    ([ws_frame(b"\x0f\xa0", opcode=0x8)], 4000),               # an application's code
])
def test_each_bad_frame_gets_the_close_code_the_rfc_names(server, frames, code):
    assert close_code_after(server, *frames) == code


def test_a_message_over_max_body_is_refused_with_1009(make_server):
    server = make_server(max_body=1000)
    assert close_code_after(server, ws_frame(b"x" * 600, fin=False),
                            ws_frame(b"x" * 600, opcode=0x0)) == 1009


def expected_close(kind, payload):
    """What a server must answer a single frame of *kind* with (RFC 6455)."""
    if kind in ("unmasked", "rsv", "opcode", "long_ping", "fragmented_ping",
                "continuation"):
        return 1002
    if kind == "huge":
        return 1009
    if kind == "text":
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            return 1007
    return "open"  # fine: read (a ping pong'd), and the socket stays open


frames = st.one_of(
    st.tuples(st.just("text"), st.binary(max_size=300)),
    st.tuples(st.just("binary"), st.binary(max_size=300)),
    st.tuples(st.just("ping"), st.binary(max_size=125)),
    st.tuples(st.just("long_ping"), st.binary(min_size=126, max_size=200)),
    st.tuples(st.sampled_from(["unmasked", "rsv", "opcode", "fragmented_ping",
                               "continuation", "huge"]), st.binary(max_size=50)),
)


def encode(kind, payload, mask):
    return {
        "text": lambda: ws_frame(payload, 0x1, mask=mask),
        "binary": lambda: ws_frame(payload, 0x2, mask=mask),
        "ping": lambda: ws_frame(payload, 0x9, mask=mask),
        "long_ping": lambda: ws_frame(payload, 0x9, mask=mask),
        "unmasked": lambda: ws_frame(payload, 0x1, mask=None),
        "rsv": lambda: ws_frame(payload, 0x1, mask=mask, rsv=4),
        "opcode": lambda: ws_frame(payload, 0xB, mask=mask),
        "fragmented_ping": lambda: ws_frame(payload[:10], 0x9, fin=False, mask=mask),
        "continuation": lambda: ws_frame(payload, 0x0, mask=mask),
        "huge": lambda: ws_frame(payload, 0x2, mask=mask, length=(1 << 63) - 1),
    }[kind]()


@pytest.fixture(scope="module")
def frame_server():
    server = longpoll.make_server("127.0.0.1", 0, read_timeout=10.0).start()
    yield server
    server.close()


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sent=st.lists(st.tuples(frames, st.binary(min_size=4, max_size=4)), min_size=1,
                     max_size=4))
def test_random_frames_get_the_right_close_code_and_harm_no_one_else(frame_server, sent):
    server = frame_server
    # A subscriber on another connection, parked through all of it.
    bystander, status, _, rest = ws_open(server, "/channels/bystander/ws")
    assert status == 101
    wait_until(lambda: parked_on(server, "bystander") >= 1)
    sock, status, _, early = ws_open(server)
    with sock, bystander:
        expected, data = "open", b""
        for (kind, payload), mask in sent:
            data += encode(kind, payload, mask)
            expected = expected_close(kind, payload)
            if expected != "open":
                break
        sock.sendall(data)
        if expected == "open":  # all fine so far: a close of our own ends it
            sock.sendall(ws_frame(b"\x03\xe8", 0x8))
            expected = 1000
        reader = WsReader(sock, early)
        assert reader.close_code() == expected
        publish(server, "bystander", "still here")
        listener = WsReader(bystander, rest)
        while (event := listener.text()).get("event") == "open":
            pass
        assert event["message"] == "still here"


# -- the Python client and the CLI --------------------------------------------------------

def test_the_client_subscribes_over_a_websocket_and_resumes_across_a_restart(
        make_server, tmp_path):
    store = f"sqlite:{tmp_path / 'c.db'}"
    server = make_server(store=store)
    port = server.server_address[1]
    client = longpoll.Client(server.url, backoff=0.05, max_backoff=0.2)
    got, connections = [], []
    subscription = client.subscribe("w", since="0", transport="ws",
                                     on_connection=lambda up, error: connections.append(up))

    def read():
        for message in subscription:
            got.append(message["message"])

    reader = threading.Thread(target=read)
    reader.start()
    try:
        publish(server, "w", 1)
        wait_until(lambda: got == [1])
        server.close()
        wait_until(lambda: connections == [False], what="the client to see the loss")
        server = make_server(store=store, port=port)
        publish(server, "w", 2)
        wait_until(lambda: got == [1, 2])
        assert connections == [False, True] and subscription.transport == "ws"
    finally:
        subscription.close()
        reader.join(10)
    assert not reader.is_alive()


class NoWebSockets(longpoll.Handler):
    socket_routes = {}  # as a server (or a proxy) that has no WebSocket there


def test_the_client_long_polls_where_the_upgrade_is_refused(make_server):
    server = make_server(handler_class=NoWebSockets)
    client = longpoll.Client(server.url)
    with client.subscribe("f", since="0", transport="ws") as subscription:
        publish(server, "f", "by long-poll")
        message = next(iter(subscription))
        assert message["message"] == "by long-poll"
        assert subscription.transport == "poll"


def test_the_cli_subscribes_over_a_websocket(server, capsys):
    publish(server, "cli", "hello")
    assert longpoll.main(["subscribe", "cli", "--since", "0", "--count", "1",
                          "--transport", "ws", "--url", server.url]) == 0
    assert "hello" in capsys.readouterr().out
