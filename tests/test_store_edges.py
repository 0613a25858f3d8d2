"""The edges of the stores: a hung Redis, Redis losing its data."""
import threading
import time

import longpoll
from conftest import request, wait_until


def timed(server, path):
    started = time.monotonic()
    resp = request(server, "GET", path, timeout=10)
    return resp, time.monotonic() - started


def test_a_hung_redis_stalls_only_the_requests_that_need_it(own_redis, make_server):
    server = make_server(longpoll.Hub(store=own_redis.url))
    created = longpoll.Client(server.url).publish("a", "x")
    history, seq = created["id"].rsplit("-", 1)
    ahead = f"{history}-{int(seq) + 5}"  # a cursor past what this server has seen
    own_redis.pause()
    answers = []
    try:
        slow = [threading.Thread(target=lambda path=path: answers.append(
                    request(server, "GET", path, timeout=30)))
                for path in ["/receive?timeout=0", f"/channels/a?since={ahead}&timeout=0"] * 3]
        for t in slow:
            t.start()
        wait_until(lambda: len(server._connections) >= 6)
        for _ in range(5):
            health, took = timed(server, "/health")
            assert health.status == 200 and took < 0.1, took
            poll, took = timed(server, "/channels/a?since=0&timeout=0")
            assert poll.json["messages"][0]["message"] == "x" and took < 0.1, took
    finally:
        own_redis.resume()
    for t in slow:
        t.join(30)
        assert not t.is_alive()
    for resp in answers:  # each got an answer: a 503 from the store, or a gap
        assert resp.status == 503 or resp.json.get("gap") or "message" in resp.json, resp
