"""Behind a real nginx, configured as docs/deploying.md says: long-polls,
event streams and WebSockets all get through, events unbuffered."""
import json
import os
import re
import shutil
import socket
import subprocess
import urllib.request

import pytest
from websockets.sync.client import connect

from conftest import E2E, free_port, parked_on, request, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NGINX = shutil.which("nginx") or next(
    (path for path in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.path.exists(path)),
    None)


def documented_config():
    """The nginx block of docs/deploying.md, as written there."""
    with open(os.path.join(ROOT, "docs", "deploying.md"), encoding="utf-8") as f:
        return re.search(r"```nginx\n(.*?)```", f.read(), re.S).group(1)


@pytest.fixture
def nginx(server, tmp_path):
    """nginx on a free port in front of *server*, with the documented config."""
    if NGINX is None:
        problem = "nginx is missing (apt-get install nginx)"
        if E2E:
            pytest.fail(problem)
        pytest.skip(problem)
    port = free_port()
    config = documented_config().replace("127.0.0.1:5000", "127.0.0.1:%d" % server.server_address[1])
    config = config.replace("    # ...\n", f"    listen 127.0.0.1:{port};\n")
    (tmp_path / "nginx.conf").write_text(f"""
daemon off;
master_process off;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log;
events {{}}
http {{
    access_log off;
    client_body_temp_path {tmp_path}/body;
    proxy_temp_path {tmp_path}/proxy;
    fastcgi_temp_path {tmp_path}/fastcgi;
    uwsgi_temp_path {tmp_path}/uwsgi;
    scgi_temp_path {tmp_path}/scgi;
{config}
}}
""")
    proc = subprocess.Popen([NGINX, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
                            stderr=subprocess.PIPE)

    def listening():
        if proc.poll() is not None:
            raise AssertionError(f"nginx ended: {proc.stderr.read().decode()}")
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    wait_until(listening, what="nginx to listen")
    yield f"http://127.0.0.1:{port}"
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
