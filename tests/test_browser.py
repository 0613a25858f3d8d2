"""The live page in a real browser: the system's Chromium (Debian's
package; $CHROMIUM names another) driven by Playwright, headless, against
real servers. No browser is downloaded."""
import os

import longpoll
from conftest import Page, parked_on, publish_text, wait_until


def publish(server, channel, text, title=None):
    publish_text(server.url, channel, text, title)


def test_a_message_published_with_curl_appears_within_1_s(browser, server):
    page = Page(browser, f"{server.url}/?channel=live")
    wait_until(lambda: server.waiting == 1, what="the page to subscribe")
    assert page.page.locator("#state").inner_text() == "connected"
    publish(server, "live", "build done", title="CI")
    page.wait_text("build done", timeout=1000)
    assert page.page.locator("#log li .title").first.inner_text() == "CI"
    assert not page.errors


def test_two_pages_publish_to_each_other(browser, server):
    one, two = (Page(browser, f"{server.url}/?channel=chat") for _ in range(2))
    wait_until(lambda: server.waiting == 2)
    one.page.fill("#title", "Ada")
    one.page.fill("#message", "hello from page one")
    one.page.click("button")
    two.wait_text("hello from page one")
    one.wait_text("hello from page one")
    assert one.page.input_value("#message") == ""
    shot = os.environ.get("PAGE_SHOT")
    if shot:
        publish(server, "chat", '{"build": 1042, "ok": true}')
        two.wait_text("1042")
        two.page.screenshot(path=shot)


def test_html_in_a_message_is_shown_as_text_and_runs_nothing(browser, server):
    page = Page(browser, f"{server.url}/?channel=xss")
    wait_until(lambda: server.waiting == 1)
    payload = "<img src=x onerror=alert(1)><script>alert(2)</script>"
    publish(server, "xss", payload, title="<b>bold?</b>")
    page.wait_text("<img")
    assert page.texts() == [payload]
    assert page.page.locator("#log img, #log script, #log b").count() == 0
    assert not page.dialogs and not page.errors


def test_the_page_survives_a_server_restart(browser, make_server):
    first = make_server()
    port = first.server_address[1]
    page = Page(browser, f"{first.url}/?channel=restart")
    wait_until(lambda: first.waiting == 1)
    publish(first, "restart", "before")
    page.wait_text("before")
    first.close()
    page.page.locator("#state.reconnecting").wait_for(timeout=5000)
    second = longpoll.make_server("127.0.0.1", port).start()
    try:
        wait_until(lambda: second.waiting == 1, timeout=15, what="the page to come back")
        publish(second, "restart", "after")
        page.wait_text("after")
        assert page.page.locator("#state").inner_text() == "connected"
        assert page.page.locator("#log .notice").count() == 1  # the restart lost history
    finally:
        second.close()


def test_switching_channel_and_a_bad_name(browser, server):
    page = Page(browser, f"{server.url}/?channel=first")
    wait_until(lambda: server.waiting == 1)
    page.page.fill("#channel", "second")
    page.page.press("#channel", "Enter")
    wait_until(lambda: "channel=second" in page.page.url)
    wait_until(lambda: parked_on(server, "second"), what="the page to poll the new channel")
    publish(server, "second", "on the second")
    page.wait_text("on the second")
    page.page.fill("#channel", "not valid!")
    page.page.press("#channel", "Enter")
    page.page.locator("#state.error").wait_for(timeout=5000)
    assert "invalid channel name" in page.page.locator("#state").inner_text()


def test_the_browsers_own_websocket_gets_a_publish_within_1_s(browser, server):
    page = Page(browser, f"{server.url}/")
    page.page.evaluate("""url => {
        window.got = [];
        const ws = new WebSocket(url);
        ws.onmessage = event => window.got.push(JSON.parse(event.data));
    }""", server.url.replace("http://", "ws://") + "/channels/browser/ws")
    # Polled from here: the live page's CSP forbids the eval that
    # Playwright's wait_for_function needs once it has to poll in the page.
    got = lambda: page.page.evaluate("window.got.length")  # noqa: E731
    wait_until(lambda: got() == 1, what="the open frame")
    assert page.page.evaluate("window.got[0].event") == "open"
    wait_until(lambda: parked_on(server, "browser") == 1)
    publish(server, "browser", "to the socket", title="WS")
    try:
        wait_until(lambda: got() == 2, timeout=1.0)
    except AssertionError:
        raise AssertionError(f"not within 1 s: {page.page.evaluate('window.got')}, "
                             f"page errors {page.errors}") from None
    message = page.page.evaluate("window.got[1]")
    assert (message["message"], message["title"]) == ("to the socket", "WS")
    assert not page.errors
