"""python3 -m longpoll bench: each scenario against a server here, its
counts checked against what the test knows was sent; the target check on
its own (no test loads an address that is not on this machine); Ctrl-C."""
import json
import os
import re
import signal
import subprocess
import sys

import pytest

import longpoll
from conftest import wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench(*args, timeout=120):
    done = subprocess.run([sys.executable, "-m", "longpoll", "bench", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    return done


def bench_json(*args):
    done = bench(*args, "--json", "--generators", "2")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# -- who may be loaded -------------------------------------------------------------

@pytest.mark.parametrize("host, addresses, allowed", [
    ("127.0.0.1", (), True),
    ("::1", (), True),
    ("10.1.2.3", (), True),
    ("192.168.0.10", (), True),
    ("172.16.5.4", (), True),
    ("fd00::7", (), True),
    ("[fe80::1%eth0]", (), True),
    ("localhost", (), True),
    ("push.localhost", (), True),
    ("93.184.216.34", (), False),
    ("8.8.8.8", ("10.0.0.1",), False),    # a literal is itself, whatever is given
    ("2606:4700::1111", (), False),
    ("push.internal", ("10.0.0.5", "fd00::5"), True),
    ("example.com", ("93.184.216.34",), False),
    ("mixed.example", ("10.0.0.5", "93.184.216.34"), False),  # one public address: no
    ("nowhere.example", (), False),      # resolves to nothing
])
def test_who_may_be_loaded(host, addresses, allowed):
    assert longpoll.bench_target_allowed(host, addresses) is allowed


def test_a_public_address_is_refused_before_anything_is_sent():
    done = bench("http://93.184.216.34:8080", "--clients", "5")
    assert done.returncode == 2
    assert "93.184.216.34 is not a loopback or private address" in done.stderr
    assert "--yes-i-own-this-server" in done.stderr and done.stdout == ""


@pytest.mark.parametrize("args, words", [
    (("--clients", "20000"), "--clients 20,000 is over the cap of 10,000"),
    (("--rate", "5000"), "--rate 5,000"),
    (("--messages", "1000", "--rate", "1"), "take longer than 300 s"),
    (("--clients", "0"), "--clients must be more than 0"),
])
def test_caps_and_bad_numbers_are_refused(args, words):
    done = bench(*args)
    assert done.returncode == 2 and words in done.stderr, done.stderr


# -- the scenarios, in-process ---------------------------------------------------------

@pytest.mark.parametrize("transport", ["poll", "sse", "ws"])
def test_fanout_delivers_every_message_to_every_subscriber_once(transport):
    out = bench_json("--clients", "20", "--messages", "5", "--rate", "100",
                     "--transport", transport)
    assert (out["scenario"], out["transport"], out["server"]) == ("fanout", transport,
                                                                   "in-process")
    assert (out["subscribers"], out["sent"], out["expected"], out["delivered"]) == (
        20, 5, 100, 100)
    assert (out["lost"], out["duplicates"], out["gaps"], out["failed_subscribers"]) == (
        0, 0, 0, 0)
    assert 0 < out["latency_p50_ms"] <= out["latency_p99_ms"] <= out["latency_max_ms"]
    assert out["completion_max_ms"] == out["latency_max_ms"]
    assert out["server_cpu_us_per_delivery"] > 0 and out["server_rss_mb"] > 0
    assert out["interrupted"] is False and "error" not in out


def test_throughput_counts_publishes_and_deliveries():
    out = bench_json("--scenario", "throughput", "--publishes", "300", "--subscribers", "4")
    assert (out["sent"], out["publishes"], out["delivered"], out["lost"]) == (300, 300, 1200, 0)
    assert out["publishes_per_s"] > 0 and out["deliveries_per_s"] > 0
    assert out["server_cpu_us_per_publish"] > 0


def test_a_connect_storm_counts_every_client():
    out = bench_json("--scenario", "connect", "--clients", "60")
    assert (out["answered"], out["failed"], out["statuses"]) == (60, 0, {"200": 60})
    assert out["connections_per_s"] > 0 and out["latency_max_ms"] > 0


def test_serve_options_shape_the_server_it_starts(tmp_path):
    """The options after bench are serve's: here a sqlite store."""
    db = tmp_path / "bench.db"
    out = bench_json("--clients", "5", "--messages", "3", "--rate", "100", "--store",
                     f"sqlite:{db}")
    assert out["delivered"] == 15 and db.exists()


def test_the_table_for_people():
    done = bench("--clients", "5", "--messages", "2", "--rate", "100", "--generators", "1")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("longpoll bench http://127.0.0.1:")
    assert "fan-out: 5 subscribers (poll), 2 messages at 100/s" in lines[0]
    rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in lines[1:])
    assert rows["delivered"] == "10 of 10" and rows["lost"] == "0"


# -- against a server given by URL ---------------------------------------------------------

def test_a_server_given_by_url_with_its_pid(server):
    out = bench_json(server.url, "--clients", "10", "--messages", "4", "--rate", "100",
                     "--pid", str(os.getpid()))
    assert out["server"] == f"pid {os.getpid()}"
    assert (out["delivered"], out["lost"]) == (40, 0)
    channel = out["channel"]
    assert channel.startswith("bench-")
    held = server.hub.read(channel, "0").messages
    assert [m.message["i"] for m in held] == [0, 1, 2, 3]  # what it said it sent
    # It leaves nothing for long: each message expires (BENCH_TTL).
    assert all(abs(m.expires - m.time - 600) < 0.01 for m in held)
    # --pid: the server's CPU (ticks of 10 ms: may round to 0 here) and memory.
    assert out["server_cpu_us_per_delivery"] >= 0 and out["server_rss_mb"] > 10


def test_ctrl_c_prints_what_was_measured_and_exits_130(server):
    proc = subprocess.Popen([sys.executable, "-m", "longpoll", "bench", server.url,
                             "--clients", "5", "--messages", "200", "--rate", "20",
                             "--generators", "1"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: server.hub.published >= 3, timeout=30, what="a few publishes")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted (Ctrl-C): what was measured until then" in out
    sent = int(next(line for line in out.splitlines() if "messages sent" in line).split()[-1])
    assert 3 <= sent < 200 and "Traceback" not in err


def test_a_server_with_auth_takes_the_token_and_refuses_without(make_server):
    secured = make_server(auth=longpoll.Auth({"ops": {"read": ["bench-*"],
                                                      "write": ["bench-*"]}}, {}))
    out = bench_json(secured.url, "--token", "ops", "--clients", "4", "--messages", "2",
                     "--rate", "100")
    assert (out["delivered"], out["lost"]) == (8, 0)
    done = bench(secured.url, "--clients", "4", "--messages", "2", "--rate", "100",
                 "--generators", "1")
    assert done.returncode == 1
    assert "subscribers refused or cut" in done.stdout and "error:" in done.stdout
