"""longpoll.js, the browser client, in a real Chromium against real servers
(and a real nginx that buffers): every transport, resuming across restarts
and reloads, refusals, tabs sharing one connection, and the fall-back from
a stream a proxy holds back."""
import time

import pytest

import longpoll
from conftest import Page, parked_on, publish_text, request, start_nginx, wait_until


def test_the_script_is_served_cacheable_with_an_etag(server):
    first = request(server, "GET", "/longpoll.js")
    assert first.status == 200
    assert first.headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert first.headers["Cache-Control"] == "no-cache"
    assert first.body.decode() == longpoll.LONGPOLL_JS
    etag = first.headers["ETag"]
    again = request(server, "GET", "/longpoll.js", headers={"If-None-Match": f"W/{etag}"})
    assert (again.status, again.body, again.headers["ETag"]) == (304, b"", etag)
    changed = request(server, "GET", "/longpoll.js", headers={"If-None-Match": '"other"'})
    assert changed.status == 200 and changed.body == first.body
    head = request(server, "HEAD", "/longpoll.js")
    assert head.body == b"" and head.headers["Content-Length"] == str(len(first.body))
    module = request(server, "GET", "/longpoll.mjs")
    assert module.body.decode().startswith(longpoll.LONGPOLL_JS)
    assert b"export default globalThis.longpoll" in module.body
    assert module.headers["ETag"] != etag
    assert module.headers["Access-Control-Allow-Origin"] == "*"  # (modules load with CORS)
    assert longpoll.LONGPOLL_JS.count("\n") <= 400


def test_the_page_allows_no_inline_script(server):
    page = request(server, "GET", "/", headers={"Accept": "text/html"})
    policy = dict(part.strip().split(" ", 1) for part in
                  page.headers["Content-Security-Policy"].split(";"))
    assert "script-src" not in policy and policy["default-src"] == "'self'"
    assert b"<script>" not in page.body
    assert b'<script src="longpoll.js">' in page.body


@pytest.mark.parametrize("transport", ["ws", "sse", "poll"])
def test_each_transport_gets_a_publish_within_1_s(browser, server, transport):
    channel = f"over-{transport}"
    page = Page(browser, f"{server.url}/?channel={channel}&transport={transport}")
    wait_until(lambda: page.state() == ("connected", transport))
    wait_until(lambda: parked_on(server, channel) == 1)
    publish_text(server.url, channel, f"by {transport}", title=transport)
    page.wait_text(f"by {transport}", timeout=1000)
    assert page.page.locator("#log li .title").first.inner_text() == transport
    assert not page.errors


def test_the_es_module_subscribes_and_publishes(browser, server):
    page = Page(browser, f"{server.url}/?channel=page")
    page.page.evaluate("""async () => {
        const lp = await import("/longpoll.mjs");
        window.got = [];
        window.states = [];
        window.sub = lp.subscribe(location.origin, ["mod", "ule"], {
            onmessage: (m) => window.got.push(m), onstate: (s) => window.states.push(s)});
    }""")
    wait_until(lambda: parked_on(server, "mod") == 1)
    page.page.evaluate("""() => import("/longpoll.mjs").then(
        (lp) => lp.publish(location.origin, "ule", {n: 1}, {title: "T", priority: 4}))""")
    wait_until(lambda: page.page.evaluate("window.got.length") == 1)
    got = page.page.evaluate("window.got[0]")
    assert (got["channel"], got["message"], got["title"], got["priority"]) == (
        "ule", {"n": 1}, "T", 4)
    assert page.page.evaluate("window.states[0]") == {
        "state": "connected", "transport": "ws", "error": None}
    refused = page.page.evaluate("""() => import("/longpoll.mjs").then(
        (lp) => lp.publish(location.origin, "no good", "x").then(
            () => null, (e) => [e.status, e.message]))""")
    assert refused[0] == 400 and refused[1].startswith("invalid channel name")
    page.page.evaluate("window.sub.close()")
    wait_until(lambda: parked_on(server, "mod") == 0)


def test_a_silent_event_stream_is_opened_again_from_its_cursor(browser, make_server):
    server = make_server(keepalive=300)  # no keepalive comes within the test
    page = Page(browser, f"{server.url}/?channel=page")
    page.page.evaluate("""() => {
        window.got = [];
        window.states = [];
        window.sub = longpoll.subscribe(location.origin, "quiet", {
            transports: ["sse"], silence: 500,
            onmessage: (m) => window.got.push(m.message),
            onstate: (s) => window.states.push(s.state)});
    }""")
    wait_until(lambda: page.page.evaluate("window.states.join()").startswith(
        "connected,reconnecting,connected"), what="the silent stream to be opened again")
    publish_text(server.url, "quiet", "after the silence")
    wait_until(lambda: page.page.evaluate("window.got") == ["after the silence"])


def test_a_restart_under_an_open_page_loses_and_repeats_nothing(browser, make_server,
                                                                  tmp_path):
    store = f"sqlite:{tmp_path / 'longpoll.db'}"
    first = make_server(store=store)
    port = first.server_address[1]
    page = Page(browser, f"{first.url}/?channel=kept")
    wait_until(lambda: parked_on(first, "kept") == 1)
    publish_text(first.url, "kept", "one")
    page.wait_text("one")
    first.close()
    page.page.locator("#state.reconnecting").wait_for(timeout=5000)
    hub = longpoll.Hub(store=store)  # while no server runs: straight into its store
    hub.publish("kept", "two")
    hub.publish("kept", "three")
    hub.close()
    second = make_server(port=port, store=store)
    wait_until(lambda: parked_on(second, "kept") == 1, timeout=20,
               what="the page to come back")
    publish_text(second.url, "kept", "four")
    page.wait_text("four")
    assert page.texts() == ["four", "three", "two", "one"]  # (newest first)
    assert page.page.locator("#log .notice").count() == 0
    assert not page.errors


def test_a_reload_continues_from_its_cursor(browser, server):
    page = Page(browser, f"{server.url}/?channel=reload")
    wait_until(lambda: parked_on(server, "reload") == 1)
    publish_text(server.url, "reload", "before")
    page.wait_text("before")
    page.page.goto("about:blank")
    wait_until(lambda: parked_on(server, "reload") == 0)
    publish_text(server.url, "reload", "while away")
    page.page.goto(f"{server.url}/?channel=reload")
    page.wait_text("while away")
    publish_text(server.url, "reload", "after")
    page.wait_text("after")
    page.page.reload()
    wait_until(lambda: parked_on(server, "reload") == 1)
    publish_text(server.url, "reload", "after the reload")
    page.wait_text("after the reload")
    assert page.texts() == ["after the reload"]  # nothing shown before comes again
    assert page.page.locator("#log .notice").count() == 0


def test_a_refusal_stops_it_with_the_servers_words(browser, make_server):
    server = make_server(auth=longpoll.Auth({"reader": {"read": ["*"]}}))
    page = Page(browser, f"{server.url}/?channel=locked&token=wrong")
    page.page.locator("#state.error").wait_for(timeout=10_000)
    assert page.page.locator("#state").inner_text() == "invalid token"
    good = Page(browser, f"{server.url}/?channel=locked&token=reader")
    wait_until(lambda: good.state() == ("connected", "ws"))
    assert server.metrics.requests["poll", 401] == 1  # one refusal read, then no retry
    assert server.metrics.requests["ws", 401] == 1


def test_tabs_of_one_origin_share_one_connection(browser, server):
    context = browser.new_context()
    try:
        first = Page(browser, f"{server.url}/?channel=shared", context)
        wait_until(lambda: first.state() == ("connected", "ws"))
        second = Page(browser, f"{server.url}/?channel=shared", context)
        wait_until(lambda: second.state() == ("connected", "ws"))  # told by the first
        assert request(server, "GET", "/health").json["waiting"] == 1
        publish_text(server.url, "shared", "to both")
        first.wait_text("to both")
        second.wait_text("to both")
        first.page.close()  # the tab holding the connection goes: the other takes it on
        publish_text(server.url, "shared", "after it left")
        second.wait_text("after it left")
        wait_until(lambda: request(server, "GET", "/health").json["waiting"] == 1)
        assert second.texts() == ["after it left", "to both"]
        assert not second.errors
    finally:
        context.close()


BUFFERING_PROXY = """
server {
    # ...
    location / {
        proxy_pass http://127.0.0.1:PORT;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_buffering on;
        proxy_ignore_headers X-Accel-Buffering;
    }
}
"""


def test_behind_a_buffering_proxy_the_page_falls_back_to_long_poll(browser, server,
                                                                     tmp_path):
    url, proc = start_nginx(tmp_path, BUFFERING_PROXY.replace(
        "PORT", str(server.server_address[1])))
    context = browser.new_context()
    try:
        page = Page(browser, f"{url}/?channel=held", context)
        wait_until(lambda: page.state() == ("connected", "poll"), timeout=20,
                   what="the page to give up on the held-back stream")
        wait_until(lambda: parked_on(server, "held") >= 1)
        sent = time.monotonic()
        publish_text(server.url, "held", "through the buffer")
        page.wait_text("through the buffer", timeout=3000)
        assert time.monotonic() - sent < 3
        avoided = page.page.evaluate(
            "Object.keys(JSON.parse(localStorage.getItem('longpoll-avoid:' + location.origin)))")
        assert sorted(avoided) == ["sse", "ws"]  # remembered for that server a while
        direct = Page(browser, f"{server.url}/?channel=held", context)
        wait_until(lambda: direct.state() == ("connected", "ws"))
        assert not page.errors and not direct.errors
    finally:
        context.close()
        proc.terminate()
        proc.wait(10)


def test_offline_then_online_resumes_at_once_from_the_cursor(browser, server):
    context = browser.new_context()
    try:
        page = Page(browser, f"{server.url}/?channel=trip&transport=poll", context)
        wait_until(lambda: page.state() == ("connected", "poll"))
        wait_until(lambda: parked_on(server, "trip") == 1)
        context.set_offline(True)
        page.page.locator("#state.offline").wait_for(timeout=10_000)
        publish_text(server.url, "trip", "while offline")
        context.set_offline(False)  # back: at once, not at the end of a backoff
        page.wait_text("while offline", timeout=5000)
        assert page.state() == ("connected", "poll")
        assert page.texts() == ["while offline"]
    finally:
        context.close()


def test_an_unknown_transport_is_refused_at_once(browser, server):
    page = Page(browser, f"{server.url}/?channel=page")
    error = page.page.evaluate("""() => {
        try { longpoll.subscribe(location.origin, "x", {transports: ["ws", "carrier-pigeon"]}); }
        catch (e) { return e.name + ": " + e.message; }
    }""")
    assert error == 'TypeError: transports: some of "ws", "sse" and "poll", in order'
