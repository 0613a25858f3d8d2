"""Stores: sqlite (messages survive kill -9) and Redis (several servers share channels)."""
import contextlib
import http.client
import json
import signal
import sqlite3
import threading
import urllib.parse

import pytest

import longpoll
from conftest import request, wait_until
from test_cli import Process, get_json


def publish_many(url, channel, count, start=0):
    """Publish *count* messages over one keep-alive connection; return their ids."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    ids = []
    for i in range(start, start + count):
        conn.request("POST", f"/channels/{channel}", json.dumps({"message": i}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 201, body
        ids.append(json.loads(body)["id"])
    conn.close()
    return ids


def read_all(client, channels, since):
    """Everything after *since*, following the cursor until nothing is left."""
    messages, gaps = [], 0
    while True:
        batch = client.poll(channels, since, timeout=0, limit=1000)
        gaps += bool(batch.get("gap"))
        if not batch["messages"]:
            return messages, gaps
        messages += batch["messages"]
        since = batch["cursor"]


# -- sqlite ----------------------------------------------------------------------------

def test_500_acknowledged_messages_survive_kill_9(tmp_path):
    store = f"sqlite:{tmp_path / 'longpoll.db'}"
    server = Process("serve", "--port", "0", "--store", store)
    try:
        url = server.expect(r"listening on (http://\S+)").group(1)
        ids = publish_many(url, "jobs", 500)  # every one got its 201
        first = longpoll.Client(url).poll("jobs", "0", timeout=0, limit=200)
        cursor = first["cursor"]  # a subscriber has read 200 and holds this cursor
    finally:
        server.proc.send_signal(signal.SIGKILL)
    assert server.proc.wait(10) == -signal.SIGKILL
    again = Process("serve", "--port", "0", "--store", store)
    try:
        url = again.expect(r"listening on (http://\S+)").group(1)
        rest, gaps = read_all(longpoll.Client(url), "jobs", cursor)
        assert gaps == 0
        assert [m["message"] for m in rest] == list(range(200, 500))
        assert [m["id"] for m in rest] == ids[200:]
    finally:
        assert again.stop() == 0


def test_retention_prunes_the_file_and_old_cursors_get_a_gap(tmp_path):
    path = tmp_path / "longpoll.db"
    hub = longpoll.Hub(retention=10, store=f"sqlite:{path}")
    ids = [hub.publish("a", i).id for i in range(100)]
    hub.publish("b", "other")
    hub.prune()
    hub.close()  # (the server holds the file to itself while it runs)
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT count(*) FROM messages").fetchone()[0] == 11
    hub = longpoll.Hub(retention=10, store=f"sqlite:{path}")
    assert [m.message for m in hub.read("a", "0").messages] == list(range(90, 100))
    assert hub.read("a", ids[50]).gap and not hub.read("a", ids[95]).gap
    assert hub.publish("a", "next").seq == 102  # the sequence goes on
    hub.close()


def test_expired_channels_are_forgotten_in_the_file_too(tmp_path):
    path = tmp_path / "longpoll.db"
    hub = longpoll.Hub(max_age=0.05, store=f"sqlite:{path}")
    before = hub.cursor
    seen = hub.publish("gone", "x").id
    wait_until(lambda: hub.prune() or hub.channel_count == 0, what="the channel to expire")
    hub.close()
    hub = longpoll.Hub(max_age=0.05, store=f"sqlite:{path}")
    assert hub.channel_count == 0
    assert hub.read("gone", before).gap and not hub.read("gone", seen).gap
    hub.close()


def test_receive_is_exactly_once_across_a_restart(tmp_path):
    store = f"sqlite:{tmp_path / 'longpoll.db'}"
    hub = longpoll.Hub(store=store)
    for i in range(5):
        hub.publish("default", i)
    assert [hub.take(timeout=0).message for _ in range(2)] == [0, 1]
    hub.close()
    hub = longpoll.Hub(store=store)
    assert [hub.take(timeout=0).message for _ in range(3)] == [2, 3, 4]
    assert hub.take(timeout=0) is None
    hub.close()


@pytest.mark.parametrize("store, words", [
    ("bogus:", "unknown store 'bogus:'"),
    ("sqlite:", "sqlite: needs a file"),
    ("sqlite:/nonexistent/dir/x.db", "cannot open the store /nonexistent/dir/x.db"),
    ("redis://127.0.0.1:1/0", "cannot use the store redis://127.0.0.1:1/0"),
])
def test_a_bad_store_is_one_clear_error(store, words):
    proc = Process("serve", "--port", "0", "--store", store)
    assert proc.proc.wait(15) == 2
    proc.expect(words)


def test_a_file_that_is_not_a_database_is_refused(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not sqlite " * 100)
    with pytest.raises(ValueError, match="cannot open the store"):
        longpoll.Hub(store=f"sqlite:{path}")
    assert path.read_text().startswith("not sqlite")


# -- Redis -----------------------------------------------------------------------------

@pytest.fixture
def pair(make_server, redis_url):
    """Two servers sharing one Redis."""
    return [make_server(longpoll.Hub(store=redis_url)) for _ in range(2)]


def test_published_on_a_received_on_b(pair):
    a, b = pair
    assert a.hub.history == b.hub.history
    got = []
    waiting = threading.Thread(
        target=lambda: got.append(longpoll.Client(b.url).poll("news", timeout=10)))
    waiting.start()
    wait_until(lambda: b.waiting == 1, what="the poll on B to park")
    sent = longpoll.Client(a.url).publish("news", "hello", title="T", priority=5)
    waiting.join(10)
    [msg] = got[0]["messages"]
    assert msg["id"] == sent["id"] and msg["title"] == "T" and msg["priority"] == 5
    assert got[0]["cursor"] == sent["id"]


EXTRA = {"tags": ["warning"], "click": "https://x.example/",
         "actions": [{"action": "view", "label": "Open", "url": "https://x.example/o"}],
         "markdown": True}


def test_a_messages_other_fields_survive_a_restart_and_cross_redis(tmp_path, pair, redis_url):
    """Tags, click, actions, markdown: kept by every store, as published."""
    path = tmp_path / "extra.db"
    hub = longpoll.Hub(store=f"sqlite:{path}")
    hub.publish("x", "kept", title="T", **EXTRA)
    hub.close()
    hub = longpoll.Hub(store=f"sqlite:{path}")
    try:
        [msg] = hub.read("x", "0").messages
        assert (msg.title, msg.extra) == ("T", EXTRA)
    finally:
        hub.close()
    a, b = pair
    sent = a.hub.publish("x", "shared", **EXTRA)
    wait_until(lambda: b.hub.head >= sent.seq, what="B to follow the feed")
    assert b.hub.read("x", "0").messages[-1].as_dict() == sent.as_dict()
    late = longpoll.Hub(store=redis_url)  # read back from the stream, not the feed
    try:
        assert late.read("x", "0").messages[-1].extra == EXTRA
    finally:
        late.close()


def test_40_subscribers_over_two_servers_get_100_messages_in_one_order(pair):
    """Publishes alternating between two servers of one Redis reach every
    subscriber of either in one order. (Each of its polls is a connection of
    urllib's: 100 subscribers and 200 messages took half a minute.)"""
    servers = pair
    clients = [longpoll.Client(servers[i % 2].url, timeout=20) for i in range(40)]
    start = servers[0].hub.cursor
    received = [[] for _ in clients]

    def follow(n):
        for msg in clients[n].subscribe("feed", since=start):
            received[n].append(msg["id"])
            if len(received[n]) == 100:
                return

    threads = [threading.Thread(target=follow, args=(n,), daemon=True) for n in range(40)]
    for thread in threads:
        thread.start()
    publishers = [longpoll.Client(s.url) for s in servers]
    sent = [publishers[i % 2].publish("feed", i)["id"] for i in range(100)]
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    assert all(ids == sent for ids in received)


def test_concurrent_publishers_through_one_redis_connection_each_get_their_own_answer(pair):
    """A server sends every publish to Redis from its loop, on one
    connection, and answers each from its own reply (pipelined, in order):
    eight clients publishing at once each get the ids of their own
    messages, and every message is stored once."""
    a, b = pair
    results = {}

    def publisher(n):
        client = longpoll.Client(a.url)
        results[n] = [(client.publish("many", f"{n}-{i}")["id"], f"{n}-{i}") for i in range(40)]

    threads = [threading.Thread(target=publisher, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive()
    wait_until(lambda: b.hub.read("many", "0", limit=1000).messages.__len__() == 320,
               what="B to follow every message")
    for server in pair:
        held = {m.id: m.message for m in server.hub.read("many", "0", limit=1000).messages}
        assert held == {id_: text for answers in results.values() for id_, text in answers}
    for answers in results.values():  # each client's own, in its order
        seqs = [int(id_.rsplit("-", 1)[1]) for id_, _ in answers]
        assert seqs == sorted(seqs)


def test_a_client_fails_over_from_a_killed_server_without_loss_or_repeat(redis_url):
    a = Process("serve", "--port", "0", "--store", redis_url)
    b = Process("serve", "--port", "0", "--store", redis_url)
    try:
        url_a = a.expect(r"listening on (http://\S+)").group(1)
        url_b = b.expect(r"listening on (http://\S+)").group(1)
        client = longpoll.Client([url_a, url_b], timeout=5, backoff=0.05)
        publisher = longpoll.Client(url_b)
        start = publisher.health() and client.poll("s", timeout=0)["cursor"]
        got, half = [], threading.Event()

        def stream():
            for msg in client.subscribe("s", since=start):
                got.append(msg)
                if len(got) == 50:
                    half.set()
                if len(got) == 100:
                    return

        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        for i in range(50):
            publisher.publish("s", i)
        assert half.wait(10)
        assert client._current == 0  # it was streaming from A
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(10)
        for i in range(50, 100):
            publisher.publish("s", i)
        reader.join(30)
        assert [m["message"] for m in got] == list(range(100))
        assert not any(m.get("gap") for m in got)
        assert client._current == 1
    finally:
        a.proc.kill()
        b.stop()


def test_receive_on_two_servers_splits_a_burst_with_no_message_twice(pair):
    a, b = pair
    for i in range(200):
        request(a if i % 2 else b, "POST", "/send", json.dumps({"message": i}),
                {"Content-Type": "application/json"})
    taken = [[], []]

    def consume(n, server):
        while True:
            resp = request(server, "GET", "/receive?timeout=0")
            message = resp.json["message"]
            if message is None:
                return
            taken[n].append(message)

    threads = [threading.Thread(target=consume, args=(n, s)) for n, s in enumerate(pair)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(taken[0] + taken[1]) == list(range(200))
    assert taken[0] and taken[1]  # both took part


def test_parked_clients_share_one_redis_connection(make_server, redis_url):
    import redis
    server = make_server(longpoll.Hub(store=redis_url))
    clients = redis.Redis.from_url(redis_url)
    before = len(clients.client_list())
    conns = [http.client.HTTPConnection(*server.server_address[:2], timeout=20)
             for _ in range(300)]
    for conn in conns:
        conn.request("GET", "/channels/crowd?timeout=15")
    wait_until(lambda: server.waiting == 300, what="300 polls to park")
    assert len(clients.client_list()) <= before + 1  # not one per client
    longpoll.Client(server.url).publish("crowd", "to all")
    for conn in conns:
        assert json.loads(conn.getresponse().read())["messages"][0]["message"] == "to all"
        conn.close()
    clients.close()


def test_a_new_server_gets_the_history_and_old_cursors(pair, redis_url):
    a, _ = pair
    ids = [a.hub.publish("h", i).id for i in range(10)]
    late = longpoll.Hub(store=redis_url)
    try:
        batch = late.read("h", ids[3])
        assert [m.message for m in batch.messages] == list(range(4, 10)) and not batch.gap
        assert [m.id for m in batch.messages] == ids[4:]
    finally:
        late.close()


def test_retention_in_redis_gives_a_gap_on_every_server(make_server, redis_url):
    a = longpoll.Hub(retention=5, store=redis_url)
    b = longpoll.Hub(retention=5, store=redis_url)
    late = None
    try:
        ids = [a.publish("r", i).id for i in range(20)]
        wait_until(lambda: b.read("r", "0").messages[-1].id == ids[-1], what="B to follow")
        late = longpoll.Hub(retention=5, store=redis_url)
        for hub in (a, b, late):
            assert [m.message for m in hub.read("r", "0").messages] == list(range(15, 20))
            assert hub.read("r", ids[3]).gap and not hub.read("r", ids[16]).gap
    finally:
        for hub in (a, b, late):
            if hub is not None:
                hub.close()


def test_redis_going_away_gives_503_and_coming_back_resumes(make_server, own_redis):
    server = make_server(longpoll.Hub(store=own_redis.url))
    first = longpoll.Client(server.url).publish("r", "before")
    own_redis.stop()
    refused = request(server, "POST", "/channels/r", "while down")
    assert refused.status == 503 and refused.headers["Retry-After"]
    assert "longpoll_store_failures_total 1\n" in request(server, "GET", "/metrics").body.decode()
    # what the server holds is still served
    assert request(server, "GET", "/channels/r?since=0").json["messages"][0]["message"] == "before"
    own_redis.start()  # back, and empty
    got = []
    poller = threading.Thread(target=lambda: got.append(
        longpoll.Client(server.url).poll("r", first["id"], timeout=10)))
    poller.start()
    wait_until(lambda: request(server, "POST", "/channels/r", "after").status == 201,
               what="publishing to work again")
    poller.join(10)
    assert not poller.is_alive()
    assert [m["message"] for m in got[0]["messages"]] == ["after"]
    seq = [int(m["id"].rsplit("-", 1)[1]) for m in (first, got[0]["messages"][0])]
    assert seq[1] > seq[0]  # the numbering never went back


def test_the_redis_password_is_never_logged(redis_url, caplog):
    store = longpoll.RedisStore(redis_url.replace("redis://", "redis://:hunter2@"))
    assert "hunter2" not in store.url and store.url.startswith("redis://:***@")
    hub = longpoll.Hub(store=store)
    hub.close()
    with pytest.raises(ValueError) as caught:  # nothing listens there
        longpoll.Hub(store="redis://:hunter2@127.0.0.1:1/0")
    assert "redis://:***@127.0.0.1:1/0" in str(caught.value)
    assert "hunter2" not in str(caught.value) and "hunter2" not in caplog.text


def test_redis_urls_with_a_password_a_database_and_a_unix_socket(tmp_path):
    """The store's own Redis client speaks to a real redis-server that asks
    for a password, over TCP and over its Unix socket, in any database."""
    from conftest import RedisProcess
    server = RedisProcess(tmp_path, password="s3cret", unixsocket=tmp_path / "redis.sock")
    hubs = []
    try:
        tcp = longpoll.Hub(store=f"redis://:s3cret@127.0.0.1:{server.port}/2")
        hubs.append(tcp)
        tcp.publish("a", "over tcp, database 2")
        unix = longpoll.Hub(store=f"unix://{tmp_path / 'redis.sock'}?db=2&password=s3cret")
        hubs.append(unix)
        assert [m.message for m in unix.read("a", "0").messages] == ["over tcp, database 2"]
        other = longpoll.Hub(store=f"redis://default:s3cret@127.0.0.1:{server.port}/3")
        hubs.append(other)
        assert other.read("a", "0").messages == []  # another database, another history
        for wrong in (f"redis://:nope@127.0.0.1:{server.port}/2",
                      f"unix://{tmp_path / 'redis.sock'}?password=nope",
                      f"redis://127.0.0.1:{server.port}/2"):
            with pytest.raises(ValueError, match="cannot use the store") as caught:
                longpoll.Hub(store=wrong)
            assert "nope" not in str(caught.value)
        with pytest.raises(ValueError, match="not a database number"):
            longpoll.RedisStore(f"redis://127.0.0.1:{server.port}/two")
    finally:
        for hub in hubs:
            hub.close()
        server.close()


def test_a_second_server_on_the_same_file_is_refused(tmp_path):
    store = f"sqlite:{tmp_path / 'longpoll.db'}"
    first = longpoll.Hub(store=store)
    try:
        first.publish("a", "mine")
        with pytest.raises(ValueError, match="cannot open the store .*locked"):
            longpoll.Hub(store=store)
        assert first.publish("a", "still mine").seq == 2
    finally:
        first.close()
    assert [m.message for m in longpoll.Hub(store=store).read("a", "0").messages] == [
        "mine", "still mine"]


def test_age_retention_in_redis_and_forgotten_channels(redis_url):
    a = longpoll.Hub(max_age=0.05, store=redis_url)
    try:
        before = a.cursor
        seen = a.publish("brief", "x").id
        wait_until(lambda: a.prune() or a.channel_count == 0, what="the channel to expire")
        late = longpoll.Hub(max_age=0.05, store=redis_url)  # a server joining later
        try:
            assert late.channel_count == 0
            assert late.read("brief", before).gap and not late.read("brief", seen).gap
        finally:
            late.close()
    finally:
        a.close()


def test_the_redis_store_needs_no_package(redis_url):
    """`serve --store redis://` under `python -S` (no site-packages at all):
    the store speaks to Redis itself."""
    proc = Process("serve", "--port", "0", "--store", redis_url, python_flags=["-S"])
    try:
        url = proc.expect(r"listening on (http://\S+)").group(1)
        longpoll.Client(url).publish("a", "no package needed")
        answer = get_json(url + "/channels/a?since=0")
        assert [m["message"] for m in answer["messages"]] == ["no package needed"]
    finally:
        assert proc.stop(signal.SIGTERM) == 0
def test_blocking_wait_take_and_event_streams_follow_another_server(pair):
    a, b = pair
    results = {}
    threads = [
        threading.Thread(target=lambda: results.update(wait=b.hub.wait("w", timeout=10))),
        threading.Thread(target=lambda: results.update(take=b.hub.take("jobs", timeout=10))),
    ]
    for thread in threads:
        thread.start()
    wait_until(lambda: b.hub.waiting == 2, what="both to block on B")
    with contextlib.closing(http.client.HTTPConnection(*b.server_address[:2],
                                                       timeout=10)) as stream:
        stream.request("GET", "/channels/w/events")
        events = stream.getresponse()
        wait_until(lambda: b.waiting == 1, what="the event stream to park on B")
        a.hub.publish("w", "to B")
        a.hub.publish("jobs", "work")
        for thread in threads:
            thread.join(10)
        data = b""
        while b'"to B"' not in data:
            data += events.read1(4096)
    assert [m.message for m in results["wait"].messages] == ["to B"]
    assert results["take"].message == "work" and a.hub.take("jobs", timeout=0) is None


def test_a_full_disk_is_a_503_and_harms_nothing_stored(make_server, tmp_path):
    hub = longpoll.Hub(store=f"sqlite:{tmp_path / 'longpoll.db'}")
    server = make_server(hub)
    kept = [hub.publish("d", "x" * 1000).id for _ in range(20)]
    pages = hub.store.db.execute("PRAGMA page_count").fetchone()[0]
    hub.store.db.execute(f"PRAGMA max_page_count = {pages}")  # the file may not grow: "full"
    refused = [request(server, "POST", "/channels/d", "y" * 4000) for _ in range(5)]
    assert {r.status for r in refused} == {503}
    assert "full" in refused[0].json["error"] and refused[0].headers["Retry-After"]
    assert [m.id for m in hub.read("d", "0").messages] == kept  # nothing half-stored
    hub.store.db.execute("PRAGMA max_page_count = 1000000")  # space again
    assert request(server, "POST", "/channels/d", "after").status == 201
    server.close()
    again = longpoll.Hub(store=f"sqlite:{tmp_path / 'longpoll.db'}")
    assert [m.id for m in again.read("d", "0").messages][:20] == kept
    assert again.read("d", "0").messages[-1].message == "after"
    again.close()
