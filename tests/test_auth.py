"""Tokens and per-channel permissions (serve --auth)."""
import json
import logging
import signal

import pytest

import longpoll
from conftest import Stream, request, wait_until

RULES = {"tokens": {"s3cret": {"read": ["news", "ci-*"], "write": ["ci-*"]},
                    "reader": {"read": ["news", "default"]},
                    "writer": {"write": ["news", "default"]},
                    "admin-token": {"read": ["*"], "write": ["*"]}},
         "anonymous": {"read": ["public"], "write": []}}


@pytest.fixture
def secured(make_server):
    return make_server(auth=longpoll.Auth(RULES["tokens"], RULES["anonymous"]))


def call(server, method, path, token=None, body=None, query_token=False):
    headers = {}
    if token and not query_token:
        headers["Authorization"] = f"Bearer {token}"
    if token and query_token:
        path += ("&" if "?" in path else "?") + f"token={token}"
    if body is not None and method == "POST":
        headers["Content-Type"] = "application/json"
    return request(server, method, path, body, headers)


def test_the_issue_bar(secured):
    assert call(secured, "POST", "/channels/ci-main", "s3cret", b'{"message": 1}').status == 201
    assert call(secured, "POST", "/channels/news", "s3cret", b'{"message": 1}').status == 403
    assert call(secured, "GET", "/channels/ci-main?timeout=0", "writer").status == 403
    resp = call(secured, "POST", "/channels/ci-main", None, b'{"message": 1}')
    assert resp.status == 401 and resp.json["error"] and resp.headers["WWW-Authenticate"]


WRITE = ("POST", "/channels/news", b'{"message": "x"}')
READ = ("GET", "/channels/news?timeout=0", None)
EVENTS_WRONG = ("GET", "/channels/secret/events", None)
SEND = ("POST", "/send", b'{"message": "x"}')
RECEIVE = ("GET", "/receive?timeout=0", None)


@pytest.mark.parametrize("route,token,status", [
    (WRITE, None, 401), (WRITE, "bogus", 401), (WRITE, "reader", 403), (WRITE, "writer", 201),
    (WRITE, "s3cret", 403), (WRITE, "admin-token", 201),
    (READ, None, 401), (READ, "bogus", 401), (READ, "reader", 200), (READ, "writer", 403),
    (READ, "s3cret", 200), (READ, "admin-token", 200),
    (EVENTS_WRONG, None, 401), (EVENTS_WRONG, "reader", 403),
    (SEND, None, 401), (SEND, "reader", 403), (SEND, "writer", 200), (SEND, "admin-token", 200),
    (RECEIVE, None, 401), (RECEIVE, "writer", 403), (RECEIVE, "reader", 200),
    (("GET", "/channels/public?timeout=0", None), None, 200),
    (("GET", "/channels/public,news?timeout=0", None), None, 401),
    (("GET", "/channels/public,news?timeout=0", None), "reader", 200),
    (("POST", "/channels/public", b'{"message": 1}'), None, 401),
    (("GET", "/health", None), None, 200),
])
def test_matrix(secured, route, token, status):
    method, path, body = route
    resp = call(secured, method, path, token, body)
    assert resp.status == status, resp
    if status >= 400:
        assert resp.json["error"]


def test_query_token_for_long_poll_and_events(secured):
    assert call(secured, "GET", "/channels/news?timeout=0", "reader", query_token=True).status == 200
    resp = call(secured, "GET", "/channels/news?timeout=0", "bogus", query_token=True)
    assert resp.status == 401
    stream = Stream(secured, "/channels/news/events?token=reader")
    assert stream.head.startswith(b"HTTP/1.1 200")
    secured.hub.publish("news", "hi")
    assert stream.events(1)[0][2]["message"] == "hi"
    stream.close()


def test_client_sends_its_token(secured):
    client = longpoll.Client(secured.url, token="admin-token")
    assert client.publish("anything", 1)["channel"] == "anything"
    with pytest.raises(longpoll.LongpollError) as info:
        longpoll.Client(secured.url, token="reader").publish("news", 1)
    assert info.value.status == 403


def test_tokens_are_never_logged(secured, caplog):
    caplog.set_level(logging.INFO, logger="longpoll")
    call(secured, "GET", "/channels/news?timeout=0", "reader", query_token=True)
    call(secured, "GET", "/channels/news?timeout=0", "reader")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "token=***" in text and "reader" not in text


@pytest.mark.parametrize("content,words", [
    ("{not json", "not valid JSON"),
    ('{"tokens": [], "anonymous": {}}', '"tokens" must map'),
    ('{"tokens": {"t": {"read": "news"}}}', "must be a list"),
    ('{"tokens": {"t": {"admin": ["*"]}}}', "expected"),
    ('{"users": {}}', "expected an object"),
])
def test_an_invalid_auth_file_is_a_clear_startup_error(tmp_path, capsys, content, words):
    path = tmp_path / "auth.json"
    path.write_text(content)
    assert longpoll.main(["serve", "--port", "0", "--auth", str(path)]) == 2
    assert words in capsys.readouterr().err


def test_a_missing_auth_file_is_a_clear_startup_error(tmp_path, capsys):
    assert longpoll.main(["serve", "--port", "0", "--auth", str(tmp_path / "nope.json")]) == 2
    assert "cannot read the auth file" in capsys.readouterr().err


def test_sighup_reloads_without_dropping_connections(tmp_path):
    from test_cli import Process, get_json
    path = tmp_path / "auth.json"
    path.write_text(json.dumps({"tokens": {"old": {"read": ["*"], "write": ["*"]}}}))
    proc = Process("serve", "--port", "0", "--auth", str(path))
    try:
        url = proc.expect(r"listening on (http://\S+)").group(1)
        import urllib.request
        import threading
        result = []
        parked = threading.Thread(target=lambda: result.append(get_json(urllib.request.Request(
            url + "/channels/x?timeout=30", headers={"Authorization": "Bearer old"}))))
        parked.start()
        wait_until(lambda: get_json(url + "/health")["waiting"] == 1)
        path.write_text(json.dumps({"tokens": {"new": {"read": ["*"], "write": ["*"]}}}))
        proc.proc.send_signal(signal.SIGHUP)
        proc.expect("reloaded")
        req = urllib.request.Request(url + "/channels/x", data=b"after reload",
                                     headers={"Authorization": "Bearer new"}, method="POST")
        urllib.request.urlopen(req, timeout=10).close()
        parked.join(10)  # the parked client was not dropped: it got the message
        assert result[0]["messages"][0]["message"] == "after reload"
    finally:
        assert proc.stop() == 0


def test_a_repoll_on_one_connection_is_decided_again_when_its_token_or_the_rules_change(
        secured):
    """A re-poll on a keep-alive connection reuses the decision made for the
    poll before it only while its path, headers and token are the same and
    the rules have not been replaced."""
    import http.client
    conn = http.client.HTTPConnection(*secured.server_address[:2], timeout=10)
    try:
        def poll(query):
            return request(secured, "GET", f"/channels/news?timeout=0&{query}", conn=conn)
        first = poll("token=reader")
        assert first.status == 200
        assert poll(f"since={first.json['cursor']}&token=reader").status == 200  # reused
        assert poll(f"since={first.json['cursor']}&token=writer").status == 403
        assert poll("token=nobody").status == 401
        assert poll("token=reader").status == 200
        secured.auth = longpoll.Auth({"reader": {"read": ["default"]}}, {})
        assert poll(f"since={first.json['cursor']}&token=reader").status == 403
        assert request(secured, "GET", "/channels/default?timeout=0&token=reader",
                       conn=conn).status == 200
        secured.auth = longpoll.Auth(RULES["tokens"], RULES["anonymous"])
        for token, status in (("writer", 201), ("writer", 201), ("reader", 403)):
            resp = request(secured, "POST", f"/channels/news?token={token}", "x", conn=conn)
            assert resp.status == status, (token, resp)
    finally:
        conn.close()
