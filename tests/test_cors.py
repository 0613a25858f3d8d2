"""CORS: preflight and headers, with and without --cors-origin."""
import threading

from conftest import request, wait_until
from longpoll import main

PAGE = "https://app.example"


def test_without_cors_origin_no_cors_headers(server):
    resp = request(server, "OPTIONS", "/channels/x", headers={
        "Origin": PAGE, "Access-Control-Request-Method": "POST"})
    assert resp.status == 405 and "Access-Control-Allow-Origin" not in resp.headers
    resp = request(server, "GET", "/channels/x?timeout=0", headers={"Origin": PAGE})
    assert resp.status == 200 and "Access-Control-Allow-Origin" not in resp.headers


def test_preflight_and_headers_for_an_allowed_origin(make_server):
    server = make_server(cors_origins=[PAGE])
    resp = request(server, "OPTIONS", "/channels/x", headers={
        "Origin": PAGE, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == PAGE
    assert resp.headers["Access-Control-Allow-Methods"] == "GET, POST, PUT, OPTIONS"
    assert resp.headers["Access-Control-Allow-Headers"] == "content-type"
    assert resp.headers["Vary"] == "Origin"
    resp = request(server, "POST", "/channels/x", b"hi", {"Origin": PAGE})
    assert resp.status == 201 and resp.headers["Access-Control-Allow-Origin"] == PAGE
    other = request(server, "POST", "/channels/x", b"hi", {"Origin": "https://evil.example"})
    assert other.status == 201 and "Access-Control-Allow-Origin" not in other.headers
    bad = request(server, "OPTIONS", "/channels/x", headers={"Origin": "https://evil.example"})
    assert bad.status == 405


def test_parked_polls_get_the_header_of_their_own_origin(make_server):
    server = make_server(cors_origins=[PAGE, "https://other.example"])
    answers = {}

    def park(origin):
        answers[origin] = request(server, "GET", "/channels/c", headers={"Origin": origin})

    threads = [threading.Thread(target=park, args=(o,))
               for o in (PAGE, "https://other.example", "https://evil.example")]
    for t in threads:
        t.start()
    wait_until(lambda: server.waiting == 3)
    server.hub.publish("c", "x")
    for t in threads:
        t.join(10)
    assert answers[PAGE].headers["Access-Control-Allow-Origin"] == PAGE
    assert answers["https://other.example"].headers["Access-Control-Allow-Origin"] == \
        "https://other.example"
    assert "Access-Control-Allow-Origin" not in answers["https://evil.example"].headers


def test_any_origin(make_server):
    server = make_server(cors_origins=["*"])
    resp = request(server, "GET", "/health", headers={"Origin": "https://x.example"})
    assert resp.headers["Access-Control-Allow-Origin"] == "*"


def test_serve_has_the_option():
    import pytest
    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0
