"""/metrics: valid Prometheus text (parsed by prometheus_client's parser),
counting exactly what the test did."""
import threading

import pytest

from conftest import request, wait_until

parser = pytest.importorskip("prometheus_client.parser")

pytestmark = pytest.mark.asgi_too


def scrape(server):
    resp = request(server, "GET", "/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples = {}
    for family in parser.text_string_to_metric_families(resp.body.decode()):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            samples[key] = sample.value
    return samples


def test_metrics_count_what_happened(server):
    parked = [threading.Thread(target=request, args=(server, "GET", "/channels/m"))
              for _ in range(3)]
    for t in parked:
        t.start()
    wait_until(lambda: server.waiting == 3)
    assert scrape(server)[("longpoll_waiting_clients", ())] == 3
    for i in range(5):
        assert request(server, "POST", "/channels/m", str(i)).status == 201
    for t in parked:
        t.join(10)
    assert request(server, "GET", "/channels/m?since=0&timeout=0").status == 200
    assert request(server, "GET", "/no/where/at/all").status == 404
    assert request(server, "POST", "/channels/m", b"\xff", {}).status == 400
    m = scrape(server)
    assert m[("longpoll_messages_published_total", ())] == 5
    # each parked poll got 1 or more, then the since=0 read got all 5
    delivered = m[("longpoll_messages_delivered_total", ())]
    assert 3 + 5 <= delivered <= 3 * 5 + 5
    assert m[("longpoll_requests_total", (("route", "publish"), ("status", "201")))] == 5
    assert m[("longpoll_requests_total", (("route", "publish"), ("status", "400")))] == 1
    assert m[("longpoll_requests_total", (("route", "poll"), ("status", "200")))] == 4
    assert m[("longpoll_requests_total", (("route", "invalid"), ("status", "404")))] == 1
    assert m[("longpoll_channels", ())] == 1
    assert m[("longpoll_uptime_seconds", ())] > 0
    assert m[("longpoll_waiting_clients", ())] == 0


def test_rejected_requests_are_counted_by_status(make_server):
    import longpoll
    server = make_server(auth=longpoll.Auth({"t": {"read": ["x"]}}))
    assert request(server, "GET", "/channels/x?timeout=0").status == 401
    assert request(server, "GET", "/channels/y?timeout=0",
                   headers={"Authorization": "Bearer t"}).status == 403
    m = scrape(server)
    assert m[("longpoll_requests_total", (("route", "poll"), ("status", "401")))] == 1
    assert m[("longpoll_requests_total", (("route", "poll"), ("status", "403")))] == 1
