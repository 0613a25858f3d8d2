"""Property-based tests (hypothesis): delivery under random interleavings,
and random malformed requests against a live server."""
import fnmatch
import json
import math
import threading
import urllib.parse
import tempfile
import uuid

import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import longpoll
from conftest import parse_raw, raw, request, wait_until

CHANNELS = ["a", "b", "c"]

# An operation is ("publish", channel, value) or ("poll", subscriber, limit).
operations = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.sampled_from(CHANNELS), st.integers()),
        st.tuples(st.just("poll"), st.integers(0, 3), st.integers(1, 5)),
    ),
    max_size=60,
)
subscriptions = st.lists(
    st.lists(st.sampled_from(CHANNELS), min_size=1, max_size=3, unique=True),
    min_size=4, max_size=4)


def check_delivery(ops, subs, read, restart=None):
    """Run *ops*; every subscriber must end with exactly the messages of its
    channels, in publish order. *read(channels, cursor, limit)* -> (values, cursor)
    and *publish(channel, value)* are supplied by the caller's transport."""
    publish, poll = read
    cursors = [poll(channels, None, 1)[1] for channels in subs]  # "from now on"
    got = [[] for _ in subs]
    published = []
    for op in ops:
        if op[0] == "restart":
            restart()
        elif op[0] == "publish":
            _, channel, value = op
            published.append((channel, value))
            publish(channel, value)
        else:
            _, n, limit = op
            values, cursors[n] = poll(subs[n], cursors[n], limit)
            got[n] += values
    for n, channels in enumerate(subs):  # drain
        while True:
            values, cursors[n] = poll(channels, cursors[n], 5)
            if not values:
                break
            got[n] += values
        expected = [[c, v] for c, v in published if c in channels]
        assert got[n] == expected, (channels, got[n], expected)


@settings(max_examples=300, deadline=None)
@given(ops=operations, subs=subscriptions)
def test_hub_delivers_every_message_once_in_order(ops, subs):
    hub = longpoll.Hub()

    def poll(channels, cursor, limit):
        batch = hub.read(channels, cursor, limit=limit)
        assert not batch.gap
        return [[m.channel, m.message] for m in batch.messages], batch.cursor

    check_delivery(ops, subs, (lambda c, v: hub.publish(c, v), poll))


# The same property through each durable store, with restarts among the
# operations: sqlite reopens its file; with Redis, messages are published
# through one hub and read through another, and a restart brings in a new
# reading hub (a server joining), which must take over the cursors.
store_operations = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.sampled_from(CHANNELS), st.integers()),
        st.tuples(st.just("poll"), st.integers(0, 3), st.integers(1, 5)),
        st.just(("restart",)),
    ),
    max_size=40,
)


@pytest.fixture(params=["sqlite", "redis"])
def backend(request):
    return request.param, (request.getfixturevalue("redis_server") + "/0"
                           if request.param == "redis" else None)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=store_operations, subs=subscriptions)
def test_stores_deliver_every_message_once_in_order(backend, ops, subs):
    backend, url = backend
    folder = tempfile.TemporaryDirectory()
    if backend == "redis":
        import redis
        redis.Redis.from_url(url).flushdb()
    else:
        url = f"sqlite:{folder.name}/longpoll.db"
    hubs = {"writer": longpoll.Hub(store=url)}
    hubs["reader"] = longpoll.Hub(store=url) if backend == "redis" else hubs["writer"]

    def restart():
        for role in {"reader"} if backend == "redis" else {"writer"}:
            hubs[role].close()
            hubs[role] = longpoll.Hub(store=url)
        if backend == "sqlite":
            hubs["reader"] = hubs["writer"]

    def poll(channels, cursor, limit):
        reader = hubs["reader"]
        wait_until(lambda: reader.head >= hubs["writer"].head, what="the reader to follow")
        batch = reader.read(channels, cursor, limit=limit)
        assert not batch.gap
        return [[m.channel, m.message] for m in batch.messages], batch.cursor

    try:
        check_delivery(ops, subs, (lambda c, v: hubs["writer"].publish(c, v), poll), restart)
    finally:
        for hub in set(hubs.values()):
            hub.close()
        folder.cleanup()


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations, subs=subscriptions)
def test_http_delivers_every_message_once_in_order(server, ops, subs):
    prefix = uuid.uuid4().hex[:8]  # fresh channels for each example

    def publish(channel, value):
        resp = request(server, "POST", f"/channels/{prefix}{channel}",
                       json.dumps({"message": value}), {"Content-Type": "application/json"})
        assert resp.status == 201

    def poll(channels, cursor, limit):
        names = ",".join(prefix + c for c in channels)
        query = {"timeout": "0", "limit": str(limit)}
        if cursor is not None:
            query["since"] = cursor
        body = request(server, "GET", f"/channels/{names}?{urllib.parse.urlencode(query)}").json
        assert "gap" not in body
        return [[m["channel"][len(prefix):], m["message"]] for m in body["messages"]], \
            body["cursor"]

    check_delivery(ops, subs, (publish, poll))


# -- malformed requests ---------------------------------------------------------------

def invalid_channel_path(text):
    names = text.split(",")
    return len(names) > 32 or any(not longpoll.CHANNEL_RE.match(n) for n in names)


def bad_number(text, low, high, integer):
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        return True
    if integer and not (text.isascii() and text.isdigit()):
        return True
    return math.isnan(value) or not low <= value <= high


def bad_json_body(data):
    try:
        value = json.loads(data, parse_constant=lambda c: 1 / 0)
    except (ValueError, ZeroDivisionError, RecursionError):
        return True
    return not (isinstance(value, dict) and "message" in value)


def http(line, headers=b"", body=b""):
    return line + b"\r\n" + headers + b"Content-Length: %d\r\n\r\n" % len(body) + body


garbage_line = st.binary(min_size=1, max_size=300).filter(
    lambda b: b"\n" not in b and b"\r" not in b and b.strip() != b"")
query_text = st.text(max_size=30)

malformed = st.one_of(
    garbage_line.map(lambda line: line + b"\r\n\r\n"),
    st.text(min_size=0, max_size=80).filter(invalid_channel_path).map(
        lambda t: http(b"GET /channels/" + urllib.parse.quote(t, safe=",").encode()
                       + b" HTTP/1.1")),
    st.tuples(st.sampled_from(["since", "timeout", "limit"]), query_text).filter(
        lambda p: p[1] != "" if p[0] == "since" else True).filter(
        lambda p: (not longpoll.CURSOR_RE.match(p[1]) and p[1] != "0") if p[0] == "since"
        else bad_number(p[1], 0, math.inf, False) if p[0] == "timeout"
        else bad_number(p[1], 1, 1000, True)).map(
        lambda p: http(b"GET /channels/x?" + urllib.parse.urlencode({p[0]: p[1]}).encode()
                       + b" HTTP/1.1")),
    st.binary(max_size=200).filter(bad_json_body).map(
        lambda body: http(b"POST /channels/x HTTP/1.1", b"Content-Type: application/json\r\n",
                          body)),
    st.binary(min_size=1, max_size=200).filter(
        lambda b: not _is_utf8(b)).map(lambda body: http(b"POST /channels/x HTTP/1.1", b"", body)),
    st.sampled_from([b"DELETE", b"PUT", b"PATCH", b"OPTIONS", b"BREW"]).map(
        lambda m: http(m + b" /channels/x HTTP/1.1")),
)


def _is_utf8(data):
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_strategies_only_make_bad_requests():
    # guard the guards: a few hand-picked cases for the filters above
    assert invalid_channel_path("a b") and not invalid_channel_path("a,b")
    assert bad_number("nan", 0, math.inf, False) and not bad_number("1.5", 0, math.inf, False)
    assert bad_number("0", 1, 1000, True) and not bad_number("10", 1, 1000, True)
    assert bad_json_body(b'{"x": 1}') and not bad_json_body(b'{"message": 1}')


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=malformed)
def test_random_malformed_requests_get_a_4xx_json_error(server, data):
    status, body = parse_raw(raw(server, data))
    assert 400 <= status < 500 or status == 505, (status, data)
    assert isinstance(body["error"], str) and body["error"]


def test_server_keeps_serving_through_malformed_requests(server):
    """A parked client still gets its message, and stored messages are intact,
    after a burst of random malformed requests."""
    server.hub.publish("keep", "stored")
    results = []
    parked = threading.Thread(target=lambda: results.append(
        request(server, "GET", "/channels/keep?timeout=60&since=" + server.hub.cursor,
                timeout=60)))
    parked.start()
    wait_until(lambda: server.waiting == 1)

    @settings(max_examples=200, deadline=None, database=None)
    @given(data=malformed)
    def hammer(data):
        status, _ = parse_raw(raw(server, data))
        assert status >= 400

    hammer()
    assert server.waiting == 1
    server.hub.publish("keep", "delivered")
    parked.join(10)
    assert [m["message"] for m in results[0].json["messages"]] == ["delivered"]
    assert [m.message for m in server.hub.read("keep", "0").messages] == ["stored", "delivered"]
    assert request(server, "GET", "/health").json["status"] == "ok"


# -- the request reader agrees with h11 -----------------------------------------------

token = st.text(alphabet="!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
                min_size=1, max_size=20).filter(
    lambda name: name.lower() not in ("host", "content-length", "transfer-encoding",
                                      "connection", "expect"))
header_value = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=255,
                                              blacklist_characters="\x7f"), max_size=40)


@settings(max_examples=300, deadline=None)
@given(method=st.sampled_from(["GET", "POST", "HEAD", "PUT"]),
       path=st.text(alphabet="/abc?&=%xyz", min_size=0, max_size=30).map(lambda p: "/" + p),
       headers=st.lists(st.tuples(token, header_value), max_size=12),
       connection=st.sampled_from([None, "close", "keep-alive", "Keep-Alive", "CLOSE", "x"]),
       body=st.binary(max_size=200), chunked=st.booleans())
def test_the_request_reader_reads_what_h11_reads(method, path, headers, connection, body,
                                                 chunked):
    h11 = pytest.importorskip("h11")
    headers = [("Host", "example.com")] + headers
    if connection is not None:
        headers.append(("Connection", connection))
    if chunked:
        headers.append(("Transfer-Encoding", "chunked"))
        framed = (b"%x\r\n" % len(body) + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
    else:
        headers.append(("Content-Length", str(len(body))))
        framed = body
    data = (f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
            + "\r\n").encode("latin-1") + framed

    theirs = h11.Connection(h11.SERVER)
    theirs.receive_data(data)
    head, their_body = theirs.next_event(), b""
    while not isinstance(event := theirs.next_event(), h11.EndOfMessage):
        their_body += bytes(event.data)

    reader = longpoll.RequestReader()
    reader.feed(data)
    ours = reader.read_head()
    our_body = reader.read_body() if ours.has_body else b""
    assert (ours.method, ours.target) == (head.method.decode(), head.target.decode())
    assert our_body == their_body == body
    joined = {}
    for name, value in head.headers:
        name = name.decode().lower()
        joined[name] = joined[name] + ", " + value.decode("latin-1") if name in joined \
            else value.decode("latin-1")
    assert ours.headers == joined
    assert ours.keep_alive == (connection is None or "close" not in connection.lower())
    assert reader.buffered == 0


# Redis losing its data, at random moments: a reader never skips a message
# silently. Each answer is either exactly what followed its cursor, or says
# "gap" (and then holds what is still there, in publish order). Messages are
# published through one hub and read through another; "restart" brings in a
# new reading hub, "wipe" empties Redis (a restart without persistence).
wipe_operations = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.sampled_from(CHANNELS)),
        st.tuples(st.just("poll"), st.integers(0, 3), st.integers(1, 5)),
        st.just(("restart",)),
        st.just(("wipe",)),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=wipe_operations, subs=subscriptions)
def test_redis_losing_its_data_never_skips_a_message_silently(redis_server, ops, subs):
    import redis
    url = redis_server + "/0"
    admin = redis.Redis.from_url(url)
    admin.flushdb()
    hubs = {"writer": longpoll.Hub(store=url)}
    hubs["reader"] = longpoll.Hub(store=url)
    published = []
    seen = [0] * len(subs)  # per subscriber: how many of its channels' messages it is past

    def expected(n):
        return [[c, v] for c, v in published if c in subs[n]]

    def poll(n, cursor, limit):
        reader, writer = hubs["reader"], hubs["writer"]
        wait_until(lambda: reader.history == writer.history and reader.head >= writer.head,
                   timeout=5, what="the reader to follow")
        batch = reader.read(subs[n], cursor, limit=limit)
        got = [[m.channel, m.message] for m in batch.messages]
        wanted = expected(n)
        if not batch.gap:  # exactly what followed
            assert got == wanted[seen[n]:seen[n] + len(got)], (got, wanted, seen[n])
            seen[n] += len(got)
        elif got:  # a gap: what is held after it, in publish order (some may be lost)
            at = -1
            for message in got:
                at = wanted.index(message, at + 1)  # raises if out of order, or never sent
            seen[n] = at + 1
        else:  # a gap, and nothing held after it
            seen[n] = len(wanted)
        return batch.cursor

    try:
        cursors = [hubs["reader"].read(channels, None).cursor for channels in subs]
        for op in ops:
            if op[0] == "publish":
                value = len(published)
                hubs["writer"].publish(op[1], value)
                published.append([op[1], value])
            elif op[0] == "poll":
                cursors[op[1]] = poll(op[1], cursors[op[1]], op[2])
            elif op[0] == "restart":
                hubs["reader"].close()
                hubs["reader"] = longpoll.Hub(store=url)
            else:
                admin.flushdb()
        for n in range(len(subs)):  # drain: after the last loss, nothing is missing
            while True:
                before = seen[n]
                cursors[n] = poll(n, cursors[n], 5)
                if seen[n] == before:
                    break
            assert seen[n] == len(expected(n)), (n, seen, published, ops)
    finally:
        for hub in hubs.values():
            hub.close()
        admin.close()


# -- pattern subscriptions -----------------------------------------------------------

UNIVERSE = ["ci-a", "ci-b", "cd", "docs", "ci-ab"]
PATTERNS = ["ci-*", "c*", "*", "ci-[a]*", "?d", "ci-?"]
# An operation: ("publish", channel, value), ("read", pattern, which cursor),
# ("prune",) (retention by age, channels forgotten) or ("restart",).
pattern_operations = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.sampled_from(UNIVERSE), st.integers(0, 99)),
        st.tuples(st.just("read"), st.sampled_from(PATTERNS), st.integers(0, 60)),
        st.just(("prune",)),
        st.just(("restart",)),
    ),
    max_size=50,
)


@pytest.mark.parametrize("store", ["memory", "sqlite"])
@settings(max_examples=80, deadline=None)
@given(ops=pattern_operations)
def test_a_pattern_reads_what_its_channels_read_together(store, ops):
    """From any cursor, through publishes to channels old and new, retention
    drops and restarts: a pattern gets exactly the messages (and at least
    the gaps) of a read of every channel it matches, in global order."""
    folder = tempfile.TemporaryDirectory()
    url = f"sqlite:{folder.name}/longpoll.db" if store == "sqlite" else None
    hub = longpoll.Hub(retention=3, store=url)
    cursors = ["0", hub.cursor]
    try:
        for op in ops:
            if op[0] == "publish":
                hub.publish(op[1], op[2])
                cursors.append(hub.cursor)
            elif op[0] == "prune":
                hub.prune()
            elif op[0] == "restart":
                hub.close()
                hub = longpoll.Hub(retention=3, store=url)
            else:
                pattern, cursor = op[1], cursors[op[2] % len(cursors)]
                union = [c for c in UNIVERSE if fnmatch.fnmatchcase(c, pattern)]
                seen = hub.read(pattern, cursor, limit=1000)
                expected = hub.read(union, cursor, limit=1000)
                assert [m.id for m in seen.messages] == [m.id for m in expected.messages]
                seqs = [m.seq for m in seen.messages]
                assert seqs == sorted(set(seqs))
                assert seen.gap or not expected.gap
                assert seen.cursor == expected.cursor
    finally:
        hub.close()
        folder.cleanup()
