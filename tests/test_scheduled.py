"""Delayed messages: Delay, In and At (ntfy's names), kept by the store until due."""
import json
import threading

import pytest

import longpoll
from conftest import Clock, request, wait_until
from longpoll import main


def values(messages):
    return [m.message for m in messages]


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_a_scheduled_message_is_published_when_due_and_once(tmp_path, store):
    url = f"sqlite:{tmp_path}/s.db" if store == "sqlite" else None
    hub = longpoll.Hub(store=url)
    hub.clock = clock = Clock()
    entry = hub.schedule("jobs", {"run": 1}, clock.now + 30, title="Nightly", ttl=60)
    assert entry["id"].startswith("s") and entry["at"] == clock.now + 30
    assert hub.tick() == [] and hub.read("jobs", "0").messages == []
    clock.now += 30
    [msg] = hub.tick()
    assert (msg.message, msg.title, msg.expires) == ({"run": 1}, "Nightly", clock.now + 60)
    assert hub.tick() == []
    assert values(hub.read("jobs", "0").messages) == [{"run": 1}]
    hub.close()


def test_scheduled_messages_survive_a_restart_with_sqlite(tmp_path):
    url = f"sqlite:{tmp_path}/s.db"
    hub = longpoll.Hub(store=url)
    hub.clock = clock = Clock()
    hub.schedule("jobs", "after the restart", clock.now + 60)
    hub.close()
    again = longpoll.Hub(store=url)
    again.clock = clock
    try:
        clock.now += 61
        assert values(again.tick()) == ["after the restart"]
    finally:
        again.close()


def test_a_repeated_key_schedules_once():
    hub = longpoll.Hub()
    hub.clock = clock = Clock()
    first = hub.schedule("jobs", "x", clock.now + 5, key="job-7")
    assert hub.schedule("jobs", "x", clock.now + 9, key="job-7") == first
    clock.now += 10
    assert len(hub.tick()) == 1


@pytest.mark.parametrize("when, words", [(-1, "passed"), (4 * 86400, "at most")])
def test_a_time_out_of_range_is_a_400(when, words):
    hub = longpoll.Hub()
    with pytest.raises(longpoll.LongpollError) as caught:
        hub.schedule("jobs", "x", hub.clock() + when)
    assert caught.value.status == 400 and words in caught.value.message


def test_the_bounds_in_all_and_per_client():
    hub = longpoll.Hub(max_scheduled=3, max_scheduled_per_client=2)
    at = hub.clock() + 60
    hub.schedule("jobs", 1, at, client="a")
    hub.schedule("jobs", 2, at, client="a")
    with pytest.raises(longpoll.LongpollError) as caught:
        hub.schedule("jobs", 3, at, client="a")
    assert caught.value.status == 429 and caught.value.headers["Retry-After"]
    hub.schedule("jobs", 3, at, client="b")
    with pytest.raises(longpoll.LongpollError) as caught:
        hub.schedule("jobs", 4, at, client="c")
    assert caught.value.status == 503


def test_two_servers_over_redis_publish_a_scheduled_message_once(make_server, redis_url):
    a, b = (longpoll.Hub(store=redis_url) for _ in range(2))
    try:
        clock = Clock(a.clock())
        a.clock = b.clock = clock
        entry = a.schedule("jobs", "once", clock.now + 5, client="c")
        assert b.schedule("jobs", "once", clock.now + 5, client="c")["id"] != entry["id"]
        clock.now += 6
        results = []
        ticks = [threading.Thread(target=lambda hub=hub: results.extend(hub.tick()))
                 for hub in (a, b, a, b)]
        for tick in ticks:
            tick.start()
        for tick in ticks:
            tick.join(10)
            assert not tick.is_alive()
        assert sorted(values(results)) == ["once", "once"]  # two entries, each published once
        assert len({m.seq for m in results}) == 2
        wait_until(lambda: a.head >= max(m.seq for m in results), what="A to follow")
        assert values(a.read("jobs", "0").messages) == ["once", "once"]
    finally:
        a.close()
        b.close()


# -- over HTTP -----------------------------------------------------------------------

@pytest.mark.asgi_too
@pytest.mark.parametrize("how", ["Delay", "X-In", "query", "envelope"])
def test_a_delayed_publish_is_accepted_then_published(server, how):
    path, headers, body = "/channels/later", {}, "in a second"
    if how == "query":
        path += "?delay=1s"
    elif how == "envelope":
        headers["Content-Type"] = "application/json"
        body = json.dumps({"message": "in a second", "delay": 1})
    else:
        headers[how] = "1s"
    cursor = request(server, "GET", "/channels/later?timeout=0").json["cursor"]
    sent = request(server, "POST", path, body, headers)
    assert sent.status == 202, sent.body
    assert sent.json["scheduled"] and sent.json["channel"] == "later"
    answer = request(server, "GET", f"/channels/later?since={cursor}&timeout=10").json
    [message] = answer["messages"]
    assert message["message"] == "in a second" and message["time"] >= sent.json["at"] - 0.01


@pytest.mark.asgi_too
def test_at_takes_rfc_3339_and_unix_times(server):
    now = server.hub.clock()
    when = longpoll.datetime.datetime.fromtimestamp(now + 3600, longpoll.datetime.timezone.utc)
    for value in (when.isoformat().replace("+00:00", "Z"), str(int(now + 3600))):
        sent = request(server, "POST", "/channels/later", "x", {"At": value})
        assert sent.status == 202 and abs(sent.json["at"] - (now + 3600)) < 1, sent.body


@pytest.mark.asgi_too
@pytest.mark.parametrize("headers, words", [
    ({"Delay": "soon"}, "Delay"), ({"At": "tomorrow"}, "At"),
    ({"Delay": "5d"}, "at most"), ({"Delay": "1m", "At": "1"}, "not both"),
])
def test_a_bad_delay_is_a_400(server, headers, words):
    resp = request(server, "POST", "/channels/later", "x", headers)
    assert resp.status == 400 and words in resp.json["error"]


def test_ntfy_delay_is_answered_as_ntfy_does(server):
    resp = request(server, "PUT", "/mytopic", "ntfy later", {"Delay": "10m"})
    assert resp.status == 200
    event = resp.json
    assert event["event"] == "message" and event["topic"] == "mytopic"
    assert event["time"] >= server.hub.clock() + 590


def test_publish_delay_on_the_command_line(server, capsys):
    cursor = server.hub.cursor
    assert main(["publish", "jobs", "soon", "--delay", "1s", "--url", server.url]) == 0
    assert capsys.readouterr().out.startswith("s")
    batch = server.hub.wait("jobs", cursor, timeout=10)
    assert values(batch.messages) == ["soon"]


def test_a_scheduled_message_and_a_silence_watch_survive_a_restart_over_redis(redis_url):
    hub = longpoll.Hub(store=redis_url)
    clock = Clock(hub.clock())
    hub.clock = clock
    hub.schedule("jobs", "after the restart", clock.now + 30)
    hub.expect("backups", 60)
    hub.close()
    again = longpoll.Hub(store=redis_url)
    again.clock = clock
    try:
        clock.now += 61
        assert sorted(m.message for m in again.tick()) == [
            "after the restart", "backups has had no message for 1 min"]
    finally:
        again.close()
