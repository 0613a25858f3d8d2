"""Behind a real nginx, configured as docs/deploying.md says: long-polls,
event streams and WebSockets all get through, events unbuffered."""
import json
import os
import re
import urllib.request

import pytest
from websockets.sync.client import connect

from conftest import parked_on, request, start_nginx, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def documented_config():
    """The nginx block of docs/deploying.md, as written there."""
    with open(os.path.join(ROOT, "docs", "deploying.md"), encoding="utf-8") as f:
        return re.search(r"```nginx\n(.*?)```", f.read(), re.S).group(1)


@pytest.fixture
def nginx(server, tmp_path):
    """nginx on a free port in front of *server*, with the documented config."""
    url, proc = start_nginx(tmp_path, documented_config().replace(
        "127.0.0.1:5000", "127.0.0.1:%d" % server.server_address[1]))
    yield url
    proc.terminate()
    proc.wait(10)


def test_a_long_poll_through_nginx(server, nginx):
    request(server, "POST", "/channels/p", "held")
    with urllib.request.urlopen(f"{nginx}/channels/p?since=0", timeout=10) as answer:
        assert json.loads(answer.read())["messages"][0]["message"] == "held"


def test_an_event_stream_through_nginx_is_not_held_back(server, nginx):
    with urllib.request.urlopen(f"{nginx}/channels/s/events", timeout=10) as stream:
        assert stream.readline() == b": connected\n"  # at once, not at the buffer's fill
        wait_until(lambda: parked_on(server, "s") == 1)
        request(server, "POST", "/channels/s", "through")
        while not (line := stream.readline()).startswith(b"data: "):
            assert line.startswith((b":", b"id:")) or line == b"\n", line
    assert json.loads(line[6:])["message"] == "through"


def test_a_websocket_through_nginx(server, nginx):
    with connect(nginx.replace("http://", "ws://") + "/channels/w/ws", open_timeout=5) as ws:
        assert json.loads(ws.recv(timeout=5))["event"] == "open"
        request(server, "POST", "/channels/w", "upgraded")
        assert json.loads(ws.recv(timeout=5))["message"] == "upgraded"
    # and a browser page of the proxied origin may open one (Host is passed on)
    with connect(nginx.replace("http://", "ws://") + "/channels/w/ws", open_timeout=5,
                 origin=nginx) as ws:
        assert json.loads(ws.recv(timeout=5))["event"] == "open"
