"""longpoll mounted in the apps people already run, with the real
frameworks and servers: FastAPI under uvicorn, Starlette under hypercorn,
Django over ASGI, Flask under Werkzeug (WSGI). The apps are tests/apps/,
the examples of docs/embedding.md."""
import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest

import longpoll
from conftest import E2E, AsgiServer, Page, free_port, parked_on, wait_until

APPS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "apps")
REPO = os.path.dirname(os.path.dirname(APPS))


def need(module):
    try:
        __import__(module)
    except ImportError:
        if E2E:
            pytest.fail(f"{module} is missing (pip install -e '.[test]')")
        pytest.skip(f"{module} is missing (pip install -e '.[test]')")


class Served:
    """``python -m <server> <args>`` from tests/apps on a free port, until the test ends."""

    def __init__(self, *command):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([APPS, REPO]))
        args = [a.replace("PORT", str(self.port)) for a in command]
        self.proc = subprocess.Popen([sys.executable, "-m", *args], cwd=APPS, env=env,
                                     stderr=subprocess.PIPE)
        wait_until(self.answers, timeout=30, what=f"{command[0]} to serve")

    def answers(self):
        if self.proc.poll() is not None:
            raise AssertionError(self.proc.stderr.read().decode())
        try:
            with urllib.request.urlopen(f"{self.url}/push/health", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=10) as answer:
            return json.loads(answer.read())

    def post(self, path, data=b"", headers=None):
        req = urllib.request.Request(self.url + path, data=data, method="POST",
                                     headers=headers or {})
        with urllib.request.urlopen(req, timeout=10) as answer:
            return json.loads(answer.read())

    def threads(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            return int(re.search(r"Threads:\s+(\d+)", f.read()).group(1))

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def served():
    started = []

    def start(*command):
        started.append(Served(*command))
        return started[-1]

    yield start
    for one in started:
        one.stop()


async def parked_readers(port, polls, streams, channel):
    """*polls* long-polls and *streams* event streams on *channel*, each on
    its own connection; returns (their tasks, a close function)."""
    writers = []

    async def poll():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writers.append(writer)
        writer.write(f"GET /push/channels/{channel}?timeout=120 HTTP/1.1\r\nHost: t\r\n\r\n"
                     .encode())
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"content-length: *(\d+)", head, re.I).group(1))
        return json.loads(await reader.readexactly(length))["messages"][0]["message"]

    async def stream():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writers.append(writer)
        writer.write(f"GET /push/channels/{channel}/events HTTP/1.1\r\nHost: t\r\n\r\n"
                     .encode())
        data = await reader.readuntil(b"\n\n")  # (past the head, to the first event)
        while b"data: " not in data:
            data += await reader.readuntil(b"\n\n")
        return json.loads(data.split(b"data: ", 1)[1].split(b"\n", 1)[0])["message"]

    tasks = []
    for start in range(0, polls + streams, 200):  # in waves, within the listen backlog
        batch = [asyncio.create_task(poll() if i < polls else stream())
                 for i in range(start, min(polls + streams, start + 200))]
        tasks += batch
        await asyncio.sleep(0)
    return tasks, lambda: [w.close() for w in writers]


def fan_out(app, polls, streams):
    """Park *polls* long-polls and *streams* event streams on the app, have
    one of its own routes publish, and return what each reader got."""
    async def scenario():
        tasks, close = await parked_readers(app.port, polls, streams, "many")
        loop = asyncio.get_running_loop()
        try:
            while (await loop.run_in_executor(None, app.get, "/push/health"))["waiting"] \
                    < polls + streams:
                for task in tasks:
                    if task.done():
                        task.result()  # (raises what went wrong)
                await asyncio.sleep(0.05)
            threads = app.threads()
            await loop.run_in_executor(None, app.post, "/notify/many?text=to+everyone")
            return await asyncio.wait_for(asyncio.gather(*tasks), 60), threads
        finally:
            close()

    return asyncio.run(scenario())


def test_fastapi_under_uvicorn_1000_polls_and_200_streams_get_a_route_s_publish(served):
    need("fastapi")
    need("uvicorn")
    app = served("uvicorn", "fastapi_app:app", "--port", "PORT", "--log-level", "warning")
    got, threads = fan_out(app, 1000, 200)
    assert got == ["to everyone"] * 1200
    assert threads < 10, threads  # the 1,200 wait on the event loop, not on threads
    # an async route of the app publishes too; so do its other transports
    with urllib.request.urlopen(f"{app.url}/push/channels/a?since=0&timeout=0") as answer:
        assert json.loads(answer.read())["messages"] == []
    app.post("/anotify/a?text=from+async")
    assert app.get("/push/channels/a?since=0&timeout=0")["messages"][0]["message"] == \
        "from async"
    from websockets.sync.client import connect
    with connect(f"ws://127.0.0.1:{app.port}/push/channels/a/ws?since=0") as ws:
        assert json.loads(ws.recv(timeout=5)) == {"event": "open", "cursor": "0"}
        assert json.loads(ws.recv(timeout=5))["message"] == "from async"
    with urllib.request.urlopen(f"{app.url}/push/longpoll.js") as script:
        assert script.read().decode() == longpoll.LONGPOLL_JS


def test_starlette_under_hypercorn_100_polls_get_a_route_s_publish(served):
    need("starlette")
    need("hypercorn")
    app = served("hypercorn", "starlette_app:app", "--bind", "127.0.0.1:PORT")
    got, threads = fan_out(app, 100, 20)
    assert got == ["to everyone"] * 120
    assert threads < 10, threads


def test_django_over_asgi_routes_push_to_longpoll(served):
    need("django")
    need("uvicorn")
    app = served("uvicorn", "django_app:application", "--port", "PORT", "--log-level",
                 "warning")
    # the Flask tutorial's round trip, through Django's router
    assert app.post("/push/send", json.dumps({"message": "job 1"}).encode(),
                    {"Content-Type": "application/json"}) == {"status": "Message sent."}
    assert app.get("/push/receive?timeout=0") == {"message": "job 1"}
    # a Django view publishes; a long-poll waiting on longpoll gets it
    got = {}
    reader = threading.Thread(target=lambda: got.update(
        app.get("/push/channels/orders?timeout=20")))
    reader.start()
    wait_until(lambda: app.get("/push/health")["waiting"] == 1)
    app.post("/notify/orders?text=paid")
    reader.join(20)
    assert not reader.is_alive()
    assert got["messages"][0]["message"] == "paid"


def test_flask_under_werkzeug_mounts_the_wsgi_app(tmp_path):
    need("flask")
    sys.path.insert(0, APPS)
    try:
        import flask_app
    finally:
        sys.path.remove(APPS)
    from werkzeug.serving import make_server
    httpd = make_server("127.0.0.1", 0, flask_app.app, threaded=True)
    serving = threading.Thread(target=httpd.serve_forever)
    serving.start()
    url = f"http://127.0.0.1:{httpd.server_port}"

    def get(path):
        with urllib.request.urlopen(url + path, timeout=15) as answer:
            return answer.status, json.loads(answer.read())

    try:
        got = {}
        reader = threading.Thread(target=lambda: got.update(
            get("/push/channels/jobs?timeout=10")[1]))
        reader.start()
        wait_until(lambda: get("/push/health")[1]["waiting"] == 1)
        req = urllib.request.Request(f"{url}/notify/jobs?text=done", method="POST")
        urllib.request.urlopen(req, timeout=10).close()  # a Flask view publishes
        reader.join(15)
        assert not reader.is_alive()
        assert got["messages"][0]["message"] == "done"
        # the tutorial's /send and /receive: its clients, as they were (a form
        # post as jQuery's $.post sends it; a /receive that waits), and the same on /push
        taken = {}
        taker = threading.Thread(target=lambda: taken.update(get("/receive")[1]))
        taker.start()
        wait_until(lambda: flask_app.hub.waiting == 1)
        req = urllib.request.Request(f"{url}/send", data=b"message=hello", method="POST")
        with urllib.request.urlopen(req, timeout=10) as answer:
            assert json.loads(answer.read()) == {"status": "Message sent."}
        taker.join(15)
        assert not taker.is_alive()
        assert taken == {"message": "hello"}
        req = urllib.request.Request(f"{url}/push/send", data=b"message=again", method="POST")
        urllib.request.urlopen(req, timeout=10).close()
        assert get("/push/receive?timeout=0") == (200, {"message": "again"})
        assert get("/push/channels/jobs?since=0&timeout=0")[1]["messages"][0]["message"] == \
            "done"
        # an event stream, on a thread of the WSGI server's
        with urllib.request.urlopen(f"{url}/push/channels/jobs/events?since=0",
                                    timeout=10) as stream:
            assert stream.readline() == b": connected\n"
            assert stream.readline() == b"\n"
            assert stream.readline().startswith(b"id: ")
            assert json.loads(stream.readline()[6:])["message"] == "done"
        # no WebSockets over WSGI: said plainly
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}/push/channels/jobs/ws", timeout=10)
        assert refused.value.code == 501
        assert "ASGI" in json.loads(refused.value.read())["error"]
    finally:
        httpd.shutdown()
        serving.join(10)
        assert not serving.is_alive()


def test_closing_the_asgi_app_answers_every_waiting_request():
    served = AsgiServer()
    try:
        answers = []
        readers = [threading.Thread(target=lambda: answers.append(urllib.request.urlopen(
            f"{served.url}/channels/c?timeout=60", timeout=30).read())) for _ in range(3)]
        for reader in readers:
            reader.start()
        wait_until(lambda: parked_on(served, "c") == 3)
    finally:
        served.close()  # (the lifespan's shutdown does the same)
    for reader in readers:
        reader.join(10)
        assert not reader.is_alive()
    assert [json.loads(a)["messages"] for a in answers] == [[], [], []]


def test_the_page_works_mounted_under_a_path(browser, served):
    need("fastapi")
    need("uvicorn")
    app = served("uvicorn", "fastapi_app:app", "--port", "PORT", "--log-level", "warning")
    page = Page(browser, f"{app.url}/push/?channel=mounted")
    wait_until(lambda: page.state() == ("connected", "ws"))
    app.post("/notify/mounted?text=under+a+path")
    page.wait_text("under a path")
    page.page.fill("#message", "from the page")
    page.page.click("button")
    page.wait_text("from the page")
    assert app.get("/push/channels/mounted?since=0&timeout=0")["messages"][1]["message"] == \
        "from the page"
    assert not page.errors


def test_the_asgi_app_applies_serve_s_auth_limits_and_cors():
    served = AsgiServer(auth=longpoll.Auth({"writer": {"write": ["*"], "read": ["*"]}}),
                        cors_origins=["https://app.example"], publish_rate=1, publish_burst=1,
                        trust_proxy=True)  # (so that the test's address is not loopback)

    def call(method, path, body=None, headers=None):
        req = urllib.request.Request(served.url + path, data=body, method=method,
                                     headers={"X-Forwarded-For": "203.0.113.9", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=10) as answer:
                return answer.status, answer.headers, answer.read()
        except urllib.error.HTTPError as error:
            return error.code, error.headers, error.read()

    try:
        status, _, body = call("POST", "/channels/a", b"x")
        assert status == 401 and b"error" in body
        status, _, body = call("POST", "/channels/a", b"x", {"Authorization": "Bearer nope"})
        assert (status, json.loads(body)) == (401, {"error": "invalid token"})
        writer = {"Authorization": "Bearer writer"}
        assert call("POST", "/channels/a", b"one", writer)[0] == 201
        status, headers, _ = call("POST", "/channels/a", b"two", writer)
        assert status == 429 and int(headers["Retry-After"]) >= 1
        status, headers, _ = call("OPTIONS", "/channels/a", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
        assert status == 204
        assert headers["Access-Control-Allow-Origin"] == "https://app.example"
        status, headers, _ = call("GET", "/channels/a?since=0&timeout=0",
                                  headers={"Origin": "https://app.example", **writer})
        assert status == 200 and headers["Access-Control-Allow-Origin"] == "https://app.example"
    finally:
        served.close()
