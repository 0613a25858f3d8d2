"""What a publish body means (docs/protocol.md), and the small things a
newcomer meets in the first ten minutes: PUT, forms, empty bodies,
priority names, a newline after every JSON answer, the plain-text help,
several channels on the command line, and a quiet graceful restart."""
import json
import shutil
import signal
import subprocess

import pytest

import longpoll
from conftest import E2E, free_port, request, wait_until
from test_cli import Process

pytestmark = pytest.mark.asgi_too


def held(server, channel):
    return [m.message for m in server.hub.read(channel, "0").messages]


def test_put_publishes_like_post_and_curl_upload_works(server, tmp_path):
    resp = request(server, "PUT", "/channels/files", "put body", {"Title": "upload"})
    assert resp.status == 201 and resp.json["channel"] == "files"
    if shutil.which("curl") is None:
        if E2E:
            pytest.fail("curl is missing (apt-get install curl)")
        pytest.skip("curl is missing (apt-get install curl)")
    upload = tmp_path / "report.txt"
    upload.write_text("line one\nline two\n")
    done = subprocess.run(["curl", "-sS", "-T", str(upload), server.url + "/channels/files"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and json.loads(done.stdout)["channel"] == "files", done
    assert done.stdout.endswith("\n")
    assert held(server, "files") == ["put body", "line one\nline two\n"]


def test_a_json_body_is_an_envelope_or_the_message_itself(server):
    as_json = {"Content-Type": "application/json"}
    for body, expected in [('{"a": 1}', {"a": 1}), ("[1, 2]", [1, 2]), ('"text"', "text"),
                           ("42", 42), ("null", None), ('{"message": {"a": 1}}', {"a": 1}),
                           ('{"message": ""}', "")]:
        assert request(server, "POST", "/channels/j", body, as_json).status == 201, body
    assert held(server, "j") == [{"a": 1}, [1, 2], "text", 42, None, {"a": 1}, ""]
    envelope = '{"message": "x", "title": "T", "priority": "high"}'
    request(server, "POST", "/channels/e", envelope, as_json)
    msg = server.hub.read("e", "0").messages[0]
    assert (msg.message, msg.title, msg.priority) == ("x", "T", 4)
    # the body's own title and priority win over headers; headers fill in
    request(server, "POST", "/channels/e", '{"no": "envelope"}',
            {**as_json, "Title": "from header", "Priority": "urgent"})
    msg = server.hub.read("e", "0").messages[-1]
    assert (msg.message, msg.title, msg.priority) == ({"no": "envelope"}, "from header", 5)
    bad = request(server, "POST", "/channels/e", '{"message": 1, "priority": "loud"}', as_json)
    assert bad.status == 400 and "priority" in bad.json["error"]
    assert request(server, "POST", "/channels/e", "{not json", as_json).status == 400


def test_a_json_message_is_passed_on_as_it_was_written(server):
    """Decoded once, to check it, and not encoded again: the message's own
    text is its wire form, unless it spans lines, holds an escape such as
    \\u00e9, or a number that may be past a float's range; those are
    written afresh, compactly (and refused when they are not plain JSON)."""
    as_json = {"Content-Type": "application/json"}
    cases = [  # (body, the message, its text on the wire)
        ('{"message": {"t": 1.50, "s": "café \\"q\\""}}', {"t": 1.5, "s": 'café "q"'},
         '{"t": 1.50, "s": "café \\"q\\""}'),
        ('{"message":[1, 2],"title":"T"}', [1, 2], "[1, 2]"),  # message first, fields after
        ('{"message": "a", "message": "b"}', "b", '"b"'),  # twice: the last one counts
        ('{"title": "T", "message": [1, 2]}', [1, 2], "[1,2]"),  # message not first: afresh
        ('{"a":  true}', {"a": True}, '{"a":  true}'),  # the body is the message
        (" [1, 2]", [1, 2], "[1,2]"),  # space around it: afresh
        ('{"message": {\n "a": 1\n}}', {"a": 1}, '{"a":1}'),  # lines: afresh, on one line
        ('{"message": "caf\\u00e9"}', "café", '"café"'),  # an escape: afresh
        ('{"message": [1.5e3, 2e-2]}', [1500.0, 0.02], "[1.5e3, 2e-2]"),  # small exponents
        ('{"message": [1e300, 1]}', [1e300, 1], "[1e+300,1]"),  # a large one: afresh
    ]
    for body, _, _ in cases:
        assert request(server, "POST", "/channels/v", body.encode(), as_json).status == 201, body
    answer = request(server, "GET", "/channels/v?since=0").body.decode()
    assert [m["message"] for m in json.loads(answer)["messages"]] == [m for _, m, _ in cases]
    for body, _, text in cases:
        assert f'"message":{text}' in answer, (body, answer)
    assert [m.title for m in server.hub.read("v", "0").messages][1:4] == ["T", None, "T"]
    # what is not plain JSON is refused, as before, whichever way it came
    for body in ['{"message": 1e999}', '{"message": [1%se99]}' % ("0" * 250),
                 '{"message": %s.5}' % ("9" * 400), '{"message": NaN}', "1e999",
                 '{"message": "\\ud800"}', '{"message": 1,]', '{"message": 1']:
        resp = request(server, "POST", "/channels/v", body, as_json)
        assert resp.status == 400, (body, resp)
        assert "JSON" in resp.json["error"] or "surrogate" in resp.json["error"], resp
    bad = request(server, "POST", "/channels/v", '{"message": 1,]', as_json)
    assert "(char 14)" in bad.json["error"], bad  # (where the whole body has it)


def test_forms_are_read_like_flask_request_form(server):
    requests = pytest.importorskip("requests")
    sent = requests.post(server.url + "/send", data={"message": "from a form"}, timeout=10)
    assert sent.status_code == 200 and sent.json() == {"status": "Message sent."}
    assert sent.text.endswith("\n")
    taken = requests.get(server.url + "/receive?timeout=5", timeout=10).json()
    assert taken == {"message": "from a form"}
    requests.post(server.url + "/channels/f", timeout=10,
                  data={"message": "a & b = c", "title": "Form", "priority": "high"})
    msg = server.hub.read("f", "0").messages[0]
    assert (msg.message, msg.title, msg.priority) == ("a & b = c", "Form", 4)
    # curl -d sends the form type too: without a message field it is text
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    for body in ("hello", "a=b", "hello world"):
        assert request(server, "POST", "/channels/t", body, form).status == 201
    assert held(server, "t") == ["hello", "a=b", "hello world"]


def test_an_empty_publish_is_refused(server):
    for path in ("/channels/empty", "/send"):
        for headers in ({}, {"Content-Type": "application/json"},
                        {"Content-Type": "application/x-www-form-urlencoded"}):
            resp = request(server, "POST", path, b"", headers)
            assert resp.status == 400 and "empty" in resp.json["error"], (path, headers)
    assert server.hub.published == 0


def test_a_browser_priority_header_is_not_a_message_priority(server):
    resp = request(server, "POST", "/channels/p", "hi", {"Priority": "u=1, i"})
    assert resp.status == 201
    assert server.hub.read("p", "0").messages[0].priority is None
    request(server, "POST", "/channels/p", "hi", {"Priority": "high"})
    assert server.hub.read("p", "0").messages[-1].priority == 4


def test_every_json_answer_ends_in_a_newline(server):
    server.hub.publish("default", "queued")
    answers = [
        request(server, "POST", "/channels/n", "x"),
        request(server, "GET", "/channels/n?since=0&timeout=0"),
        request(server, "GET", "/channels/nothing-here?since=0&timeout=0"),
        request(server, "GET", "/receive?timeout=0"),
        request(server, "GET", "/receive?timeout=0"),
        request(server, "POST", "/send", "y"),
        request(server, "GET", "/health"),
        request(server, "GET", "/no/such/path"),
        request(server, "DELETE", "/channels/n"),
        request(server, "GET", "/channels/bad!name"),
    ]
    for resp in answers:
        assert resp.body.endswith(b"}\n") and b"\n" not in resp.body[:-1], resp
    parked = request(server, "GET", "/channels/n?timeout=0.01")  # answered on timeout
    assert parked.body.endswith(b"}\n")


def test_the_plain_text_help_names_every_way_to_read(server):
    text = request(server, "GET", "/", headers={"Accept": "*/*"}).body.decode()
    for hint in ("/events", "since=0&timeout=0", "curl -T", "/receive", "NAME,OTHER"):
        assert hint in text, hint


def test_subscribe_to_several_channels_says_which_each_came_from(server):
    sub = Process("subscribe", "a", "b", "--url", server.url, "--count", "3")
    try:
        wait_until(lambda: server.waiting == 1)
        server.hub.publish("a", "to a")
        server.hub.publish("b", "to b", title="B")
        server.hub.publish("a", {"n": 1})
        lines = [sub.expect(r".+", "out").group(0) for _ in range(3)]
        assert lines == ["[a] to a", "[b] B: to b", '[a] {"n": 1}']
        assert sub.proc.wait(10) == 0
    finally:
        sub.stop(signal.SIGTERM)
    one = Process("subscribe", "a", "--url", server.url, "--since", "0", "--count", "1")
    try:
        assert one.expect(r".+", "out").group(0) == "to a"  # one channel: no prefix
    finally:
        one.stop(signal.SIGTERM)


def test_a_graceful_server_restart_is_not_a_warning(tmp_path):
    """SIGTERM, then the same server again (sqlite keeps the history, so
    nothing is lost): the subscriber carries on without a warning."""
    port = str(free_port())
    store = f"sqlite:{tmp_path / 'restart.db'}"
    server = Process("serve", "--port", port, "--store", store)
    url = server.expect(r"listening on (http://\S+)").group(1)
    sub = Process("subscribe", "news", "--url", url, "-v")
    try:
        wait_until(lambda: longpoll.Client(url).health()["waiting"] == 1)
        longpoll.Client(url).publish("news", "before")
        assert sub.expect(r".+", "out").group(0) == "before"
        assert server.stop(signal.SIGTERM) == 0
        sub.expect(r"retrying", "err")  # it met the outage (said at INFO: -v shows it)
        server = Process("serve", "--port", port, "--store", store)
        server.expect(r"listening on")
        longpoll.Client(url).publish("news", "after")
        assert sub.expect(r".+", "out").group(0) == "after"
        sub.stop(signal.SIGTERM)
        err = sub.rest("err")
        assert "WARNING" not in err, err
    finally:
        sub.stop(signal.SIGTERM)
        server.stop(signal.SIGTERM)
