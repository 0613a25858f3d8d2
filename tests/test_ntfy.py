"""ntfy's API on the same channels: curl as ntfy's documentation shows it,
and ntfy's own client libraries (python-ntfy; aiontfy on Python 3.12+),
publishing and subscribing, with the same ids and cursors as our API."""
import asyncio
import base64
import json
import shutil
import subprocess
import sys
import threading
import time

import pytest
from websockets.sync.client import connect

import longpoll
from conftest import E2E, parked_on, request, wait_until

CURL = shutil.which("curl")

pytestmark = pytest.mark.asgi_too


def curl(*args, timeout=10):
    if CURL is None:
        if E2E:
            pytest.fail("curl is missing (apt-get install curl)")
        pytest.skip("curl is missing (apt-get install curl)")
    done = subprocess.run([CURL, "-sS", *args], capture_output=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return done.stdout


def lines(data):
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def held(server, channel):
    """What our own API says *channel* holds."""
    return request(server, "GET", f"/channels/{channel}?since=0&timeout=0").json["messages"]


# -- publishing, as ntfy's documentation shows it -------------------------------------------

def test_curl_publishes_to_a_topic_with_ntfy_headers(server):
    event = json.loads(curl("-H", "Title: Unauthorized access detected", "-H", "Priority: urgent",
                            "-H", "Tags: warning,skull", "-H", "Click: https://home.nest.com/",
                            "-d", "Remote access to phils-laptop detected. Act right away.",
                            f"{server.url}/phil_alerts"))
    assert event["event"] == "message" and event["topic"] == "phil_alerts"
    assert isinstance(event["time"], int)
    assert (event["title"], event["priority"], event["tags"], event["click"]) == (
        "Unauthorized access detected", 5, ["warning", "skull"], "https://home.nest.com/")
    ours = held(server, "phil_alerts")[0]  # one message, one id, whichever API reads it
    assert ours["id"] == event["id"]
    assert ours["message"] == "Remote access to phils-laptop detected. Act right away."
    assert (ours["tags"], ours["click"]) == (["warning", "skull"], "https://home.nest.com/")


def test_the_short_header_names_and_query_parameters_too(server):
    curl("-H", "t: Short", "-H", "p: 4", "-H", "ta: tada", "-d", "x", f"{server.url}/short")
    curl("-d", "y", f"{server.url}/short?title=Query&priority=low&tags=a,b&md=yes")
    first, second = held(server, "short")
    assert (first["title"], first["priority"], first["tags"]) == ("Short", 4, ["tada"])
    assert (second["title"], second["priority"], second["tags"], second["markdown"]) == (
        "Query", 2, ["a", "b"], True)


def test_the_same_headers_work_on_our_own_publish(server):
    """What a new user tried: ntfy's headers on /channels/{name} were dropped."""
    curl("-H", "t: title", "-H", "p: 4", "-H", "Tags: warning", "-H", "Click: https://x.example/",
         "-d", "hi", f"{server.url}/channels/mine")
    message = held(server, "mine")[0]
    assert (message["title"], message["priority"], message["tags"], message["click"]) == (
        "title", 4, ["warning"], "https://x.example/")


def test_a_sequence_id_comes_back_on_both_apis(server):
    """ntfy's X-Sequence-ID: messages that carry the same one update one
    notification in place (the notifier does; so do ntfy's apps)."""
    event = json.loads(curl("-H", "X-Sequence-ID: backup-42", "-d", "running",
                            f"{server.url}/jobs"))
    curl("-d", json.dumps({"topic": "jobs", "message": "done", "sequence_id": "backup-42"}),
         f"{server.url}/")
    curl("-d", "z", f"{server.url}/channels/jobs?sequence-id=other")
    assert event["sequence_id"] == "backup-42"
    assert [m.get("sequence_id") for m in held(server, "jobs")] == [
        "backup-42", "backup-42", "other"]


def test_publish_as_json_to_the_root(server):
    body = {"topic": "mytopic", "message": "Disk space is low at 5.1 GB", "title": "Low disk",
            "tags": ["warning", "cd"], "priority": 4, "click": "https://x.example/disk",
            "icon": "https://x.example/icon.png", "markdown": True,
            "actions": [{"action": "view", "label": "Admin panel",
                         "url": "https://filesrv.lan/admin"}]}
    event = json.loads(curl("-d", json.dumps(body), f"{server.url}/"))
    assert event["content_type"] == "text/markdown"
    assert event["actions"][0]["label"] == "Admin panel" and event["icon"].endswith("icon.png")
    assert held(server, "mytopic")[0]["actions"][0]["url"] == "https://filesrv.lan/admin"


def test_actions_in_the_short_header_form(server):
    event = json.loads(curl(
        "-H", "Actions: view, Open portal, https://home.nest.com/, clear=true; "
              "http, Turn down, https://api.nest.com/, body='{\"temp\": 65}'",
        "-d", "Leaving home", f"{server.url}/actions"))
    view, http = event["actions"]
    assert (view["action"], view["label"], view["url"], view["clear"]) == (
        "view", "Open portal", "https://home.nest.com/", True)
    assert (http["action"], http["body"]) == ("http", '{"temp": 65}')


def test_publishing_by_get_and_an_empty_body(server):
    event = json.loads(curl(f"{server.url}/mytopic/trigger"))
    assert event["message"] == "triggered"  # ntfy's word for a publish with no text
    event = json.loads(curl(f"{server.url}/mytopic/publish?message=Hi+there&t=Hello"))
    assert (event["message"], event["title"]) == ("Hi there", "Hello")


@pytest.mark.parametrize("args, words", [
    (["-H", "Attach: https://x.example/a.jpg"], "attachments"),
    (["-H", "Filename: a.txt"], "attachments"),
    (["-H", "Email: phil@example.com"], "e-mail"),
    (["-H", "Call: +12223334444"], "phone calls"),
    (["-H", "At: tomorrow, 10am"], "RFC 3339"),
    (["-H", "Cache: no"], "Cache: no"),
    (["-H", "Click: javascript:alert(1)"], "click must be a URL"),
    (["-H", "Priority: 9"], "priority"),
])
def test_what_this_server_lacks_is_refused_by_name_never_dropped(server, args, words):
    answer = curl("-w", "\n%{http_code}", *args, "-d", "x", f"{server.url}/lacking")
    body, status = answer.rsplit(b"\n", 1)
    assert status == b"400"
    error = json.loads(body)
    assert error["http"] == 400 and words in error["error"]  # ntfy's error shape
    assert held(server, "lacking") == []


@pytest.mark.parametrize("path", ["/channels", "/v1", "/metrics/json", "/receive/json"])
def test_reserved_names_cannot_be_topics(server, path):
    answer = request(server, "POST", path, "x")
    assert answer.status in (400, 405), answer
    if answer.status == 400:
        assert "reserved" in answer.json["error"]


def test_a_topics_page_is_the_live_page_on_that_channel(server):
    answer = request(server, "GET", "/mytopic", headers={"Accept": "text/html"})
    assert answer.status == 302 and answer.headers["Location"] == "./?channel=mytopic"
    answer = request(server, "GET", "/mytopic")  # not a browser
    assert answer.status == 404 and "/mytopic/json" in answer.json["error"]


def test_no_ntfy_leaves_only_our_own_paths(make_server):
    server = make_server(ntfy=False)
    assert request(server, "POST", "/mytopic", "x").status == 404
    assert request(server, "GET", "/mytopic/json").status == 404


# -- subscribing --------------------------------------------------------------------------

def test_poll_and_since_as_ntfy_documents_them(server):
    ids = [json.loads(curl("-d", str(n), f"{server.url}/since"))["id"] for n in range(3)]
    every = lines(curl(f"{server.url}/since/json?poll=1"))  # poll=1 alone: everything held
    assert [e["message"] for e in every] == ["0", "1", "2"]
    assert lines(curl(f"{server.url}/since/json?poll=1&since=all")) == every
    assert [e["id"] for e in lines(curl(f"{server.url}/since/json?poll=1&since={ids[0]}"))] \
        == ids[1:]
    assert [e["message"] for e in lines(curl(f"{server.url}/since/json?poll=1&since=latest"))] \
        == ["2"]
    assert lines(curl(f"{server.url}/since/json?poll=1&since=none")) == []
    assert len(lines(curl(f"{server.url}/since/json?poll=1&since=10m"))) == 3
    assert lines(curl(f"{server.url}/since/json?poll=1&since={int(time.time()) + 60}")) == []
    assert curl(f"{server.url}/since/raw?poll=1") == b"0\n1\n2\n"
    sse = curl(f"{server.url}/since/sse?poll=1").decode()
    assert sse.count("data: ") == 3 and f"id: {ids[2]}" in sse


def test_a_bad_since_or_a_filter_is_refused(server):
    assert request(server, "GET", "/t/json?since=yesterday").status == 400
    answer = request(server, "GET", "/t/json?poll=1&priority=5")
    assert answer.status == 400 and "filters" in answer.json["error"]


def read_stream(server, path, until):
    """A streaming GET, read line by line until *until(lines)* holds."""
    host, port = server.server_address[:2]
    import http.client
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", path)
    response = conn.getresponse()
    got = []
    try:
        while not until(got):
            got.append(response.fp.readline().decode())
    finally:
        conn.close()
    return response, got


@pytest.mark.serve_only  # (its bytes as serve frames them)
def test_the_json_stream_opens_then_carries_each_message(server):
    def publish_once_parked():
        wait_until(lambda: parked_on(server, "stream") == 1)
        curl("-H", "Title: T", "-d", "live", f"{server.url}/stream")

    publisher = threading.Thread(target=publish_once_parked)
    publisher.start()
    response, got = read_stream(server, "/stream/json", lambda got: len(got) == 2)
    publisher.join(10)
    assert not publisher.is_alive()
    assert response.getheader("Content-Type").startswith("application/x-ndjson")
    opened, message = map(json.loads, got)
    assert (opened["event"], opened["topic"]) == ("open", "stream")
    assert (message["event"], message["message"], message["title"]) == ("message", "live", "T")


def test_keepalive_events_on_the_json_and_sse_streams(make_server):
    server = make_server(keepalive=0.05)
    _, got = read_stream(server, "/ka/json", lambda got: len(got) == 2)
    assert [json.loads(line)["event"] for line in got] == ["open", "keepalive"]
    _, got = read_stream(server, "/ka/sse", lambda got: "event: keepalive\n" in got)
    assert got[0] == "event: open\n"


def test_ntfy_websocket_subscription_and_resume_by_id(server):
    url = server.url.replace("http://", "ws://") + "/a,b/ws"
    with connect(url) as ws:
        assert json.loads(ws.recv(timeout=5))["event"] == "open"
        request(server, "POST", "/channels/b", json.dumps({"message": {"n": 1}}),
                {"Content-Type": "application/json"})
        event = json.loads(ws.recv(timeout=5))
    # published through our API with a JSON value: ntfy's text is that JSON,
    # as it was written
    assert (event["topic"], event["message"]) == ("b", '{"n": 1}')
    later = json.loads(curl("-d", "after", f"{server.url}/a"))
    with connect(f"{url}?since={event['id']}") as ws:
        assert json.loads(ws.recv(timeout=5))["event"] == "open"
        assert json.loads(ws.recv(timeout=5))["id"] == later["id"]


# -- auth and limits ------------------------------------------------------------------------

@pytest.fixture
def secured(make_server):
    return make_server(auth=longpoll.Auth({"tk_writer": {"read": ["alerts*"],
                                                         "write": ["alerts*"]}}))


def test_tokens_as_bearer_basic_or_auth_parameter_and_acl_globs(secured):
    url = secured.url
    assert json.loads(curl("-d", "x", url + "/alerts"))["http"] == 401
    assert json.loads(curl("-H", "Authorization: Bearer tk_writer", "-d", "x",
                           url + "/other"))["http"] == 403
    assert json.loads(curl("-H", "Authorization: Bearer tk_writer", "-d", "bearer",
                           url + "/alerts"))["event"] == "message"
    assert json.loads(curl("-u", ":tk_writer", "-d", "basic", url + "/alerts-x"))["event"] \
        == "message"  # Basic: the user is ignored, the password is the token
    auth = base64.urlsafe_b64encode(b"Bearer tk_writer").decode().rstrip("=")
    assert [e["message"] for e in lines(curl(f"{url}/alerts,alerts-x/json?poll=1&auth={auth}"))] \
        == ["bearer", "basic"]
    assert json.loads(curl(f"{url}/alerts/auth?auth={auth}")) == {"success": True}
    assert json.loads(curl(f"{url}/alerts/auth"))["http"] == 401


def test_json_publish_to_the_root_checks_the_topic_it_names(secured):
    answer = curl("-H", "Authorization: Bearer tk_writer",
                  "-d", json.dumps({"topic": "other", "message": "x"}), secured.url + "/")
    assert json.loads(answer)["http"] == 403


def test_rate_limits_apply(make_server):
    server = make_server(publish_rate=0.001, publish_burst=2, trust_proxy=True)
    statuses = [json.loads(curl("-H", "X-Forwarded-For: 203.0.113.9", "-d", "x",
                                f"{server.url}/limited")).get("http", 200) for _ in range(3)]
    assert statuses == [200, 200, 429]


# -- ntfy's own client libraries --------------------------------------------------------------

def test_python_ntfy_publishes_and_reads_back_what_it_published(server, monkeypatch):
    from python_ntfy import MessagePriority, NtfyClient, ViewAction
    monkeypatch.delenv("NTFY_SERVER", raising=False)
    client = NtfyClient("backups", server=server.url)
    sent = client.send("Backup done", title="Nightly", priority=MessagePriority.HIGH,
                       tags=["floppy_disk"], actions=[ViewAction("Logs", "https://x.example/l")],
                       format_as_markdown=True)
    got = client.get_cached_messages(since="all")
    assert [m["id"] for m in got] == [sent["id"]]
    message = got[0]
    assert (message["message"], message["title"], message["priority"], message["tags"],
            message["content_type"]) == ("Backup done", "Nightly", 4, ["floppy_disk"],
                                         "text/markdown")
    assert message["actions"][0]["url"] == "https://x.example/l"


def test_python_ntfy_with_a_token(secured, monkeypatch):
    from python_ntfy import NtfyClient
    monkeypatch.delenv("NTFY_SERVER", raising=False)
    monkeypatch.delenv("NTFY_TOKEN", raising=False)
    client = NtfyClient("alerts", server=secured.url, auth="tk_writer")  # Basic, as ntfy takes it
    client.send("with a token")
    assert [m["message"] for m in client.get_cached_messages()] == ["with a token"]


aiontfy_missing = sys.version_info < (3, 12)


@pytest.mark.skipif(aiontfy_missing, reason="aiontfy needs Python 3.12 or later")
def test_aiontfy_publishes_and_subscribes_over_the_websocket(server):
    from aiontfy import Message, Ntfy

    async def scenario():
        got = []
        async with Ntfy(server.url) as ntfy:
            listener = asyncio.create_task(ntfy.subscribe(["home"], got.append))
            while parked_on(server, "home") < 1:  # (its socket is parked: subscribed)
                await asyncio.sleep(0.01)
            sent = await ntfy.publish(Message(topic="home", message="Door open", title="Alarm",
                                              priority=5, tags=["door"],
                                              click="https://x.example/cam"))
            while not any(n.id == sent.id for n in got):
                await asyncio.sleep(0.01)
            listener.cancel()
            return sent, got

    sent, got = asyncio.run(asyncio.wait_for(scenario(), 20))
    notification = next(n for n in got if n.id == sent.id)
    assert (notification.message, notification.title, int(notification.priority),
            notification.tags, str(notification.click)) == (
        "Door open", "Alarm", 5, ["door"], "https://x.example/cam")
    assert held(server, "home")[0]["id"] == sent.id


def test_our_client_and_cli_publish_the_same_fields(server, capsys):
    client = longpoll.Client(server.url)
    client.publish("fields", "from python", tags=["a"], click="https://x.example/p")
    assert longpoll.main(["publish", "fields", "from the cli", "--tags", "b,c", "--markdown",
                          "--url", server.url]) == 0
    first, second = lines(curl(f"{server.url}/fields/json?poll=1"))
    assert (first["tags"], first["click"]) == (["a"], "https://x.example/p")
    assert (second["tags"], second["content_type"]) == (["b", "c"], "text/markdown")
