"""Per-message expiry (ttl): never delivered after it, dropped without a gap."""
import contextlib
import sqlite3

import pytest

import longpoll
from conftest import Clock, request, wait_until
from longpoll import main


def values(batch):
    return [m.message for m in batch.messages]


def test_a_message_is_delivered_until_it_expires_then_gone_without_a_gap():
    hub = longpoll.Hub()
    hub.clock = clock = Clock()
    start = hub.cursor
    short = hub.publish("jobs", "short", ttl="10s")
    hub.publish("jobs", "long", ttl=3600)
    hub.publish("jobs", "plain")
    assert short.expires == clock.now + 10 and b'"expires":' in short.json
    assert values(hub.read("jobs", start)) == ["short", "long", "plain"]
    clock.now += 10
    batch = hub.read("jobs", start)
    assert values(batch) == ["long", "plain"] and not batch.gap
    clock.now += 3600
    assert values(hub.read("jobs", "0")) == ["plain"]


def test_the_work_queue_hands_out_no_expired_message():
    hub = longpoll.Hub()
    hub.clock = clock = Clock()
    hub.publish("default", "stale", ttl=5)
    hub.publish("default", "fresh")
    clock.now += 5
    assert hub.take(timeout=0).message == "fresh"


def test_expired_messages_make_room_at_prune():
    hub = longpoll.Hub()
    hub.clock = clock = Clock()
    hub.publish("brief", "x", ttl=1)
    clock.now += 1
    hub.prune()
    assert hub.channel_count == 0  # held nothing, waited on by nobody: forgotten


@pytest.mark.parametrize("ttl", ["soon", 0, -5, "400d", float("nan"), True])
def test_a_bad_ttl_is_a_400(ttl):
    with pytest.raises(longpoll.LongpollError) as caught:
        longpoll.Hub().publish("jobs", 1, ttl=ttl)
    assert caught.value.status == 400 and "ttl" in caught.value.message


@pytest.mark.asgi_too
@pytest.mark.parametrize("how", ["header", "query", "envelope"])
def test_ttl_over_http(server, how):
    path, headers, body = "/channels/jobs", {}, "hello"
    if how == "header":
        headers["TTL"] = "10m"
    elif how == "query":
        path += "?ttl=600"
    else:
        headers["Content-Type"] = "application/json"
        body = '{"message": "hello", "ttl": "10m"}'
    sent = request(server, "POST", path, body, headers)
    assert sent.status == 201, sent.body
    [message] = request(server, "GET", "/channels/jobs?since=0&timeout=0").json["messages"]
    assert message["message"] == "hello"
    assert message["expires"] == pytest.approx(message["time"] + 600, abs=1)


@pytest.mark.asgi_too
def test_a_bad_ttl_over_http_is_a_400(server):
    resp = request(server, "POST", "/channels/jobs", "hello", {"TTL": "whenever"})
    assert resp.status == 400 and "ttl" in resp.json["error"]


def test_a_one_second_ttl_in_real_time(server):
    """End to end, no injected clock: delivered at once, then never again."""
    assert request(server, "POST", "/channels/now?ttl=1", "blink").status == 201
    body = request(server, "GET", "/channels/now?since=0&timeout=0").json
    assert [m["message"] for m in body["messages"]] == ["blink"]
    wait_until(lambda: not request(server, "GET", "/channels/now?since=0&timeout=0")
               .json["messages"], timeout=10, what="the message to expire")
    assert "gap" not in request(server, "GET", f"/channels/now?since={body['cursor']}"
                                "&timeout=0").json


def test_sqlite_deletes_an_expired_message_and_keeps_the_others(tmp_path):
    path = tmp_path / "ttl.db"
    hub = longpoll.Hub(store=f"sqlite:{path}")
    hub.clock = clock = Clock()
    hub.publish("jobs", "brief", ttl=5)
    kept = hub.publish("jobs", "lasting", ttl=3600)
    clock.now += 5
    hub.prune()  # (the store deletes at its prune)
    hub.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT COUNT(*) FROM messages").fetchone() == (1,)
    again = longpoll.Hub(store=f"sqlite:{path}")
    again.clock = clock
    try:
        batch = again.read("jobs", "0")
        assert values(batch) == ["lasting"] and not batch.gap
        assert batch.messages[0].expires == kept.expires
    finally:
        again.close()


def test_a_message_expired_elsewhere_is_not_delivered_over_redis(make_server, redis_url):
    a, b = (make_server(longpoll.Hub(store=redis_url)) for _ in range(2))
    b.hub.clock = clock = Clock(a.hub.clock() + 100)  # B's clock is past the expiry
    sent = a.hub.publish("jobs", "brief", ttl=50)
    a.hub.publish("jobs", "plain")
    wait_until(lambda: b.hub.head >= sent.seq + 1, what="B to follow the feed")
    assert values(b.hub.read("jobs", "0")) == ["plain"]
    assert values(a.hub.read("jobs", "0")) == ["brief", "plain"]
    assert clock.now > sent.expires


def test_publish_ttl_on_the_command_line(server, capsys):
    assert main(["publish", "jobs", "hi", "--ttl", "2h", "--url", server.url]) == 0
    [msg] = server.hub.read("jobs", "0").messages
    assert msg.expires == pytest.approx(msg.time + 7200, abs=1)
