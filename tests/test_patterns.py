"""Pattern subscriptions: a channel list may hold fnmatch globs (``ci-*``),
read as every matching channel merged in publish order, with one cursor."""
import threading

import pytest

import longpoll
from conftest import (Stream, WsReader, parked_on, request, wait_until, ws_open)


def ids(batch):
    return [m.message for m in batch.messages]


# -- the hub -------------------------------------------------------------------------

def test_a_pattern_reads_every_matching_channel_in_publish_order():
    hub = longpoll.Hub()
    for channel, value in [("ci-main", 1), ("docs", 2), ("ci-dev", 3), ("ci-main", 4)]:
        hub.publish(channel, value)
    batch = hub.read("ci-*", "0")
    assert ids(batch) == [1, 3, 4]
    assert [m.channel for m in batch.messages] == ["ci-main", "ci-dev", "ci-main"]
    assert not batch.gap
    hub.publish("docs", 5)
    hub.publish("ci-new", 6)  # a channel that did not exist at the cursor
    assert ids(hub.read("ci-*", batch.cursor)) == [6]


@pytest.mark.parametrize("pattern, matched", [
    ("ci-?", ["ci-a", "ci-c"]),
    ("ci-[ab]*", ["ci-a", "ci-b2"]),
    ("ci-[!a]*", ["ci-b2", "ci-c"]),
    ("*", ["ci-a", "ci-b2", "ci-c", "CI-x", "docs"]),
    ("ci-*", ["ci-a", "ci-b2", "ci-c"]),  # case-sensitive: not CI-x
])
def test_the_wildcards_are_fnmatchs(pattern, matched):
    hub = longpoll.Hub()
    for channel in ["ci-a", "ci-b2", "ci-c", "CI-x", "docs"]:
        hub.publish(channel, channel)
    assert ids(hub.read(pattern, "0")) == matched


def test_a_channel_named_and_matched_is_read_once():
    hub = longpoll.Hub()
    hub.publish("ci-main", 1)
    assert ids(hub.read(["ci-*", "ci-main", "c?-main"], "0")) == [1]


def test_a_gap_on_a_matching_channel_is_reported_and_not_on_another():
    hub = longpoll.Hub(retention=2)
    cursor = hub.cursor
    for i in range(3):
        hub.publish("other", i)  # drops one message of a channel the pattern misses
    assert not hub.read("ci-*", cursor).gap
    for i in range(3):
        hub.publish("ci-main", i)
    batch = hub.read("ci-*", cursor)
    assert batch.gap and ids(batch) == [1, 2]


def test_a_wait_on_a_pattern_wakes_for_a_new_matching_channel_only():
    hub = longpoll.Hub()
    cursor = hub.cursor
    result = {}
    waiting = threading.Thread(target=lambda: result.update(
        batch=hub.wait("ci-*", cursor, timeout=10)))
    waiting.start()
    wait_until(lambda: hub.waiting == 1)
    hub.publish("docs", "not this")
    hub.publish("ci-new", "this")
    waiting.join(10)
    assert not waiting.is_alive()
    assert ids(result["batch"]) == ["this"]  # (docs was published first, and not read)


def test_watching_a_pattern_and_cancelling():
    hub = longpoll.Hub()
    woken = []
    cancel = hub.watch(["ci-*", "docs"], lambda: woken.append(1))
    cancel()
    hub.publish("ci-main", 1)
    hub.publish("docs", 1)
    again = hub.watch("ci-*", lambda: woken.append(2))
    hub.publish("ci-main", 2)
    assert woken == [2]
    again()


def test_closing_the_hub_wakes_pattern_waiters():
    hub = longpoll.Hub()
    woken = threading.Event()
    hub.watch("ci-*", woken.set)
    hub.close()
    assert woken.is_set()


@pytest.mark.parametrize("name", ["ci-*", "a?", "[ab]"])
def test_publishing_to_a_pattern_is_refused(name):
    hub = longpoll.Hub()
    with pytest.raises(longpoll.LongpollError) as caught:
        hub.publish(name, 1)
    assert caught.value.status == 400 and "pattern" in caught.value.message


def test_a_malformed_pattern_is_a_400():
    hub = longpoll.Hub()
    with pytest.raises(longpoll.LongpollError) as caught:
        hub.read("ci-*/x", "0")
    assert caught.value.status == 400 and "pattern" in caught.value.message


# -- over HTTP -----------------------------------------------------------------------

@pytest.mark.asgi_too
def test_a_long_poll_on_a_pattern_gets_a_new_channels_message(server):
    result = {}
    poll = threading.Thread(target=lambda: result.update(
        resp=request(server, "GET", "/channels/ci-*?timeout=10")))
    poll.start()
    wait_until(lambda: parked_on(server, "ci-*") == 1, what="the poll to park")
    request(server, "POST", "/channels/docs", "not this")
    request(server, "POST", "/channels/ci-feature", "built")
    poll.join(10)
    assert not poll.is_alive()
    body = result["resp"].json
    assert [(m["channel"], m["message"]) for m in body["messages"]] == [("ci-feature", "built")]


@pytest.mark.asgi_too
def test_history_replay_and_the_question_mark_in_a_path(server):
    for channel in ["ci-a", "docs", "ci-b", "ci-ab"]:
        assert request(server, "POST", f"/channels/{channel}", channel).status == 201
    body = request(server, "GET", "/channels/ci-*?since=0&timeout=0").json
    assert [m["message"] for m in body["messages"]] == ["ci-a", "ci-b", "ci-ab"]
    body = request(server, "GET", "/channels/ci-%3F?since=0&timeout=0").json  # ci-?
    assert [m["message"] for m in body["messages"]] == ["ci-a", "ci-b"]
    body = request(server, "GET", "/channels/ci-[ab],docs?since=0&timeout=0").json
    assert [m["message"] for m in body["messages"]] == ["ci-a", "docs", "ci-b"]


@pytest.mark.asgi_too
def test_publishing_to_a_pattern_over_http_is_a_400(server):
    resp = request(server, "POST", "/channels/ci-*", "hello")
    assert resp.status == 400 and "pattern" in resp.json["error"]


def test_an_event_stream_on_a_pattern(server):
    server.hub.publish("ci-a", 1)
    server.hub.publish("docs", 2)
    stream = Stream(server, "/channels/ci-*/events?since=0")
    try:
        assert [e[2]["message"] for e in stream.events(1)] == [1]
        server.hub.publish("docs", 3)
        server.hub.publish("ci-new", 4)
        event = stream.events(1)[0]
        assert (event[2]["channel"], event[2]["message"]) == ("ci-new", 4)
    finally:
        stream.close()


def test_a_websocket_on_a_pattern(server):
    sock, status, _, rest = ws_open(server, "/channels/ci-*/ws?since=0")
    try:
        assert status == 101
        reader = WsReader(sock, rest)
        assert reader.text()["event"] == "open"
        server.hub.publish("docs", 1)
        server.hub.publish("ci-x", 2)
        message = reader.text()
        assert (message["channel"], message["message"]) == ("ci-x", 2)
    finally:
        sock.close()


def test_the_client_subscribes_to_a_pattern(server):
    client = longpoll.Client(f"http://127.0.0.1:{server.server_address[1]}")
    server.hub.publish("a-1", "one")
    server.hub.publish("b", "other")
    answer = client.poll(["a-?"], since="0", timeout=0)
    assert [m["message"] for m in answer["messages"]] == ["one"]


# -- auth ----------------------------------------------------------------------------

RULES = {"tokens": {"ci": {"read": ["ci-*", "news"]},
                    "odd": {"read": ["ci-?"]},
                    "all": {"read": ["*"]}},
         "anonymous": {"read": ["public-*"]}}


@pytest.mark.parametrize("token, pattern, status", [
    ("ci", "ci-*", 200), ("ci", "ci-main-*", 200), ("ci", "ci-?", 200), ("ci", "ci-main", 200),
    ("ci", "*", 403), ("ci", "c*", 403), ("ci", "news*", 403), ("ci", "ci-*,news", 200),
    ("odd", "ci-?", 200), ("odd", "ci-[ab]", 403), ("odd", "ci-*", 403),
    ("all", "*", 200), ("all", "x?", 200),
    (None, "public-*", 200), (None, "public-a?", 200), (None, "*", 401),
])
def test_a_pattern_needs_a_rule_that_covers_every_channel_it_can_match(
        make_server, token, pattern, status):
    server = make_server(auth=longpoll.Auth(RULES["tokens"], RULES["anonymous"]))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    path = "/channels/" + pattern.replace("?", "%3F") + "?timeout=0"
    assert request(server, "GET", path, headers=headers).status == status
