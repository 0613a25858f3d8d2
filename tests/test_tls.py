"""HTTPS: serve --certfile/--keyfile, and a client that verifies certificates."""
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading

import pytest

import longpoll
from conftest import E2E, parse_raw, wait_until
from test_cli import Process

pytestmark = pytest.mark.skipif(not shutil.which("openssl") and not E2E,
                                reason="needs the openssl command to make a certificate")


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    """A self-signed certificate for localhost and 127.0.0.1: (cert, key) paths."""
    folder = tmp_path_factory.mktemp("tls")
    return make_cert(str(folder / "cert.pem"), str(folder / "key.pem"))


def make_cert(certfile, keyfile):
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", "/CN=localhost", "-keyout", keyfile, "-out", certfile,
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30)
    return certfile, keyfile


@pytest.fixture
def https(make_server, cert):
    return make_server(certfile=cert[0], keyfile=cert[1])


def tls_socket(server, cafile, timeout=5):
    context = ssl.create_default_context(cafile=cafile)
    sock = socket.create_connection(server.server_address[:2], timeout=timeout)
    return context.wrap_socket(sock, server_hostname="localhost")


def read_response(sock):
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split()[1]), json.loads(body[:length])


def test_publish_and_long_poll_over_https_with_the_client(https, cert):
    assert https.url.startswith("https://127.0.0.1:")
    client = longpoll.Client(https.url, cafile=cert[0], timeout=10)
    got = []
    parked = threading.Thread(target=lambda: got.append(client.poll("news")))
    parked.start()
    wait_until(lambda: https.waiting == 1, what="the poll to park")
    client.publish("news", "over TLS", title="hi")
    parked.join(10)
    assert [m["message"] for m in got[0]["messages"]] == ["over TLS"]
    sub = client.subscribe("news", since="0")
    assert next(iter(sub))["title"] == "hi"
    sub.close()


def test_an_untrusted_certificate_fails_at_once_with_a_hint(https):
    client = longpoll.Client(https.url, retries=5, backoff=30)  # a retry would take 15 s+
    with pytest.raises(longpoll.LongpollError) as caught:
        client.publish("news", "x")
    assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value)
    assert "--cafile" in str(caught.value)
    assert https.hub.read(["news"], "0").messages == []


def test_many_parked_tls_clients_all_get_a_large_message(https, cert):
    socks = [tls_socket(https, cert[0], timeout=10) for _ in range(50)]
    for sock in socks:
        sock.sendall(b"GET /channels/big?timeout=20 HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_until(lambda: https.waiting == 50, what="50 TLS polls to park")
    text = "x" * 300_000  # bigger than socket buffers: partial TLS writes
    client = longpoll.Client(https.url, cafile=cert[0])
    client.publish("big", text)  # a body over 64 KiB: decoded on a worker
    for sock in socks:
        status, body = read_response(sock)
        assert status == 200 and body["messages"][0]["message"] == text
        sock.close()


def test_event_stream_and_keep_alive_over_tls(https, cert):
    with tls_socket(https, cert[0]) as sock:
        sock.sendall(b"GET /channels/a/events?since=0 HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(4096)
        assert b"text/event-stream" in data
        https.hub.publish("a", "one")
        while b"data: " not in data:
            data += sock.recv(4096)
        assert b'"one"' in data
    with tls_socket(https, cert[0]) as sock:  # two requests on one connection
        for _ in range(2):
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(sock)[0] == 200


def test_plain_http_silent_and_broken_clients_do_not_stop_the_server(https, cert):
    host, port = https.server_address[:2]
    silent = [socket.create_connection((host, port), timeout=5) for _ in range(20)]
    with socket.create_connection((host, port), timeout=5) as plain:
        plain.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        status, body = parse_raw(plain.recv(4096))  # answered in plain HTTP, then closed
        assert status == 400 and "https://" in body["error"]
    with socket.create_connection((host, port), timeout=5) as half:
        half.sendall(b"\x16\x03\x01\x00\xff" + b"\x00" * 10)  # a handshake cut short
    with tls_socket(https, cert[0]) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock)[0] == 200
    for sock in silent:
        sock.close()
    wait_until(lambda: len(https._connections) == 0, what="the connections to close")


def test_curl_with_cacert(https, cert):
    if not shutil.which("curl"):
        if E2E:
            pytest.fail("curl is missing")
        pytest.skip("curl is missing (apt-get install curl)")
    out = subprocess.run(["curl", "-sS", "--cacert", cert[0], "-d", "from curl",
                          https.url + "/channels/c"], capture_output=True, text=True,
                         timeout=20, check=True).stdout
    assert json.loads(out)["channel"] == "c"
    assert https.hub.read(["c"], "0").messages[0].message == "from curl"


def test_serve_and_publish_commands_with_tls(cert, capsys):
    proc = Process("serve", "--port", "0", "--certfile", cert[0], "--keyfile", cert[1])
    try:
        url = proc.expect(r"listening on (https://\S+)").group(1)
        url = url.replace("127.0.0.1", "localhost")  # the name in the certificate
        assert longpoll.main(["publish", "--url", url, "--cafile", cert[0], "ci", "ok"]) == 0
        assert longpoll.main(["subscribe", "--url", url, "--cafile", cert[0], "--since", "0",
                              "--count", "1", "ci"]) == 0
        assert "ok" in capsys.readouterr().out
        assert longpoll.main(["publish", "--url", url, "ci", "no"]) == 1
        assert "--cafile" in capsys.readouterr().err
    finally:
        assert proc.stop() == 0


@pytest.mark.parametrize("args, words", [
    (["--certfile", "/nonexistent.pem"], "cannot load the certificate /nonexistent.pem"),
    (["--keyfile", "/some.key"], "--keyfile needs --certfile"),
])
def test_bad_tls_options_are_one_clear_error(args, words):
    proc = Process("serve", "--port", "0", *args)
    assert proc.proc.wait(10) == 2
    proc.expect(words)


def test_a_key_that_does_not_match_is_refused(cert, tmp_path):
    other = tmp_path / "other.pem"
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout",
                    "-out", str(other)], check=True, capture_output=True, timeout=30)
    with pytest.raises(longpoll.LongpollError, match="cannot load the certificate"):
        longpoll.make_server(port=0, certfile=cert[0], keyfile=str(other))
    assert os.path.exists(cert[0])


def test_sighup_loads_a_renewed_certificate(cert, tmp_path):
    certfile, keyfile = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    shutil.copy(cert[0], certfile)
    shutil.copy(cert[1], keyfile)
    proc = Process("serve", "--port", "0", "--certfile", certfile, "--keyfile", keyfile)
    try:
        url = proc.expect(r"listening on (https://\S+)").group(1)
        make_cert(certfile, keyfile)  # the renewal: a new key and certificate, same files
        with pytest.raises(longpoll.LongpollError, match="CERTIFICATE_VERIFY_FAILED"):
            longpoll.Client(url, cafile=certfile).health()  # still the old one
        proc.proc.send_signal(signal.SIGHUP)
        proc.expect("reloaded " + re.escape(certfile))
        assert longpoll.Client(url, cafile=certfile).health()["status"] == "ok"
    finally:
        assert proc.stop() == 0


def test_notifier_over_https_with_cafile(https, cert):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    url = https.url.replace("127.0.0.1", "localhost")
    proc = subprocess.Popen([sys.executable, "notifier.py", "news", "--print", "--no-state",
                             "--url", url, "--cafile", cert[0]], cwd=root, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: https.waiting == 1, what="the notifier to park its poll")
        https.hub.publish("news", "over TLS", title="T", priority=5)
        assert proc.stdout.readline() == "! T: over TLS\n"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_websocket_over_tls(https, cert):
    from websockets.sync.client import connect
    context = ssl.create_default_context(cafile=cert[0])
    url = https.url.replace("https://", "wss://") + "/channels/secure/ws"
    with connect(url, ssl=context, open_timeout=5) as ws:
        assert json.loads(ws.recv(timeout=5))["event"] == "open"
        client = longpoll.Client(https.url, cafile=cert[0])
        client.publish("secure", "over wss")
        assert json.loads(ws.recv(timeout=5))["message"] == "over wss"


def test_the_client_subscribes_over_wss(https, cert):
    client = longpoll.Client(https.url, cafile=cert[0])
    client.publish("secure-client", "held")
    with client.subscribe("secure-client", since="0", transport="ws") as subscription:
        assert next(iter(subscription))["message"] == "held"
        assert subscription.transport == "ws"
