"""Silence alerts (a dead man's switch): POST /channels/NAME/expect?every=."""
import json
import threading

import pytest

import longpoll
from conftest import Clock, request, wait_until
from longpoll import main


def titles(messages):
    return [m.title for m in messages]


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_an_alert_once_when_overdue_and_once_on_return(tmp_path, store):
    hub = longpoll.Hub(store=f"sqlite:{tmp_path}/s.db" if store == "sqlite" else None)
    hub.clock = clock = Clock()
    state = hub.expect("backups", "26h")
    assert (state["every"], state["due"], state["silent"]) == (93600, clock.now + 93600, False)
    clock.now += 93599
    assert hub.tick() == []
    clock.now += 1
    [alert] = hub.tick()
    assert (alert.channel, alert.title, alert.priority) == (
        "backups", "No message on backups for 26 h", 4)
    assert longpoll.SILENCE_TAG in alert.extra["tags"]
    clock.now += 93600 * 3
    assert hub.tick() == []  # once: the alert to the channel itself is not it speaking
    assert hub.expectation("backups")["silent"]
    hub.publish("backups", "nightly backup done")
    assert titles(hub.tick()) == ["backups is back"]
    assert hub.tick() == [] and not hub.expectation("backups")["silent"]
    clock.now += 93600
    assert titles(hub.tick()) == ["No message on backups for 26 h"]  # silent again
    hub.close()


def test_a_message_in_time_keeps_it_quiet_and_alerts_go_to_another_channel():
    hub = longpoll.Hub()
    hub.clock = clock = Clock()
    hub.expect("backups", 100, to="alerts")
    for _ in range(5):
        clock.now += 60
        hub.publish("backups", "ran")
        assert hub.tick() == []
    clock.now += 100
    [alert] = hub.tick()
    assert alert.channel == "alerts" and hub.read("backups", "0").messages[-1].message == "ran"


def test_an_alert_survives_a_restart_with_sqlite_and_is_not_repeated(tmp_path):
    url = f"sqlite:{tmp_path}/s.db"
    hub = longpoll.Hub(store=url)
    hub.clock = clock = Clock()
    hub.expect("backups", 60)
    hub.expect("jobs", 60)
    clock.now += 30
    hub.publish("jobs", "ran")  # and then the server stops before its next tick
    hub.close()
    clock.now += 40
    again = longpoll.Hub(store=url)
    again.clock = clock
    try:
        assert titles(again.tick()) == ["No message on backups for 1 min"]  # jobs spoke
        again.close()
        again = longpoll.Hub(store=url)
        again.clock = clock
        assert again.tick() == []
        clock.now += 1
        again.publish("backups", "back")
        assert titles(again.tick()) == ["backups is back"]
    finally:
        again.close()


def test_two_servers_over_redis_alert_once(redis_url):
    hubs = [longpoll.Hub(store=redis_url) for _ in range(2)]
    try:
        clock = Clock(hubs[0].clock())
        for hub in hubs:
            hub.clock = clock
        hubs[0].expect("backups", 60)
        clock.now += 61

        def tick_all():
            results = []
            threads = [threading.Thread(target=lambda h=h: results.extend(h.tick()))
                       for h in hubs * 2]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(10)
                assert not thread.is_alive()
            return results
        assert titles(tick_all()) == ["No message on backups for 1 min"]
        sent = hubs[1].publish("backups", "ran")
        wait_until(lambda: hubs[0].head >= sent.seq, what="the other server to follow")
        assert titles(tick_all()) == ["backups is back"]
    finally:
        for hub in hubs:
            hub.close()


@pytest.mark.parametrize("every", ["sometimes", 0, "400d"])
def test_a_bad_every_is_a_400(every):
    with pytest.raises(longpoll.LongpollError) as caught:
        longpoll.Hub().expect("backups", every)
    assert caught.value.status == 400 and "every" in caught.value.message


def test_the_number_of_watched_channels_is_bounded():
    hub = longpoll.Hub(max_expectations=2)
    hub.expect("a", 60)
    hub.expect("b", 60)
    hub.expect("a", 120)  # (replaces)
    with pytest.raises(longpoll.LongpollError) as caught:
        hub.expect("c", 60)
    assert caught.value.status == 503


# -- over HTTP and the command line -------------------------------------------------

@pytest.mark.asgi_too
def test_expect_over_http_in_real_seconds(server):
    """End to end, real time: a 2 s switch alerts a waiting subscriber, then
    tells it the channel is back."""
    cursor = request(server, "GET", "/channels/backups?timeout=0").json["cursor"]
    resp = request(server, "POST", "/channels/backups/expect?every=2s")
    assert resp.status == 200 and resp.json["every"] == 2
    answer = request(server, "GET", f"/channels/backups?since={cursor}&timeout=20").json
    [alert] = answer["messages"]
    assert alert["title"] == "No message on backups for 2 s" and alert["priority"] == 4
    assert request(server, "GET", "/channels/backups/expect").json["silent"] is True
    request(server, "POST", "/channels/backups", "done")
    answer = request(server, "GET", f"/channels/backups?since={answer['cursor']}&timeout=0")
    cursor = answer.json["cursor"]
    answer = request(server, "GET", f"/channels/backups?since={cursor}&timeout=20").json
    assert [m["title"] for m in answer["messages"]] == ["backups is back"]
    assert request(server, "DELETE", "/channels/backups/expect").json == {"deleted": True}
    assert request(server, "GET", "/channels/backups/expect").status == 404


@pytest.mark.asgi_too
def test_expect_with_a_json_body_and_bad_requests(server):
    resp = request(server, "POST", "/channels/backups/expect",
                   json.dumps({"every": "26h", "to": "alerts"}),
                   {"Content-Type": "application/json"})
    assert resp.status == 200 and resp.json["to"] == "alerts"
    assert request(server, "POST", "/channels/backups/expect").status == 400
    assert request(server, "POST", "/channels/a,b/expect?every=1h").status == 400
    assert request(server, "POST", "/channels/ci-*/expect?every=1h").status == 400


def test_expect_needs_write_on_the_channel_and_on_where_alerts_go(make_server):
    server = make_server(auth=longpoll.Auth(
        {"ops": {"read": ["*"], "write": ["backups"]}, "viewer": {"read": ["*"]}}))

    def call(method, path, token):
        return request(server, method, path, headers={"Authorization": f"Bearer {token}"})
    assert call("POST", "/channels/backups/expect?every=1h", "viewer").status == 403
    assert call("POST", "/channels/backups/expect?every=1h&to=alerts", "ops").status == 403
    assert call("POST", "/channels/backups/expect?every=1h", "ops").status == 200
    assert call("GET", "/channels/backups/expect", "viewer").status == 200
    assert call("DELETE", "/channels/backups/expect", "viewer").status == 403


def test_expect_on_the_command_line(server, capsys):
    assert main(["expect", "backups", "--every", "26h", "--url", server.url]) == 0
    assert json.loads(capsys.readouterr().out)["every"] == 93600
    assert main(["expect", "backups", "--url", server.url]) == 0
    assert json.loads(capsys.readouterr().out)["silent"] is False
    assert main(["expect", "backups", "--delete", "--url", server.url]) == 0
    assert main(["expect", "backups", "--url", server.url]) == 1
