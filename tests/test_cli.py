"""The command line: main([...]) in-process, and `python -m longpoll` as a user runs it."""
import io
import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

import longpoll
from conftest import E2E, wait_until
from longpoll import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Process:
    """A `python -m longpoll ...` subprocess whose stderr/stdout lines we can await."""

    def __init__(self, *args, python_flags=(), env=None, stdin=None):
        self.proc = subprocess.Popen(
            [sys.executable, *python_flags, "-m", "longpoll", *args], cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=stdin, text=True,
            env={**os.environ, **(env or {})})
        self.lines = {"out": queue.Queue(), "err": queue.Queue()}
        self.seen = {"out": [], "err": []}
        self.pumps = {}
        for name, stream in (("out", self.proc.stdout), ("err", self.proc.stderr)):
            self.pumps[name] = threading.Thread(target=self._pump,
                                                args=(stream, self.lines[name]), daemon=True)
            self.pumps[name].start()

    @staticmethod
    def _pump(stream, q):
        for line in stream:
            q.put(line)

    def expect(self, pattern, stream="err", timeout=10):
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines[stream].get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {pattern!r} on std{stream}; saw {self.seen[stream]}")
            self.seen[stream].append(line)
            match = re.search(pattern, line)
            if match:
                return match

    def rest(self, stream="err", timeout=10):
        """Once the process has ended: every line it wrote to *stream*."""
        self.proc.wait(timeout)
        self.pumps[stream].join(timeout)
        assert not self.pumps[stream].is_alive()
        while not self.lines[stream].empty():
            self.seen[stream].append(self.lines[stream].get())
        return "".join(self.seen[stream])

    def stop(self, sig=signal.SIGTERM, timeout=5):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


@pytest.fixture
def serve():
    procs = []

    def start(*args, **kwargs):
        proc = Process("serve", "--port", "0", *args, **kwargs)
        procs.append(proc)
        proc.url = proc.expect(r"listening on (https?://\S+)").group(1)
        return proc

    yield start
    for proc in procs:
        if proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait(5)


def get_json(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


# -- main([...]) in-process ------------------------------------------------------

def test_publish_prints_the_id(server, capsys):
    assert main(["publish", "news", "build done", "--title", "CI", "--priority", "high",
                 "--url", server.url]) == 0
    (msg,) = server.hub.read("news", "0").messages
    assert capsys.readouterr().out.strip() == msg.id
    assert (msg.message, msg.title, msg.priority) == ("build done", "CI", 4)


def test_publish_reads_standard_input_and_json(server, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"ok": true}\n'))
    assert main(["publish", "news", "--json", "--url", server.url]) == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO("line one\nline two\n"))
    assert main(["publish", "news", "--url", server.url]) == 0
    assert [m.message for m in server.hub.read("news", "0").messages] == [
        {"ok": True}, "line one\nline two"]


def test_publish_refuses_bad_json(server, capsys):
    assert main(["publish", "news", "{nope", "--json", "--url", server.url]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_publish_to_a_dead_server_fails_with_one_clear_line(capsys, monkeypatch):
    from test_client import dead_url
    # Its five retries, without their 15-25 s of backoff (the client's
    # retry tests time those).
    monkeypatch.setattr(longpoll.Client, "_delay", lambda self, failures, retry_after=None: 0.0)
    assert main(["publish", "news", "x", "--url", dead_url()]) == 1
    err = capsys.readouterr().err
    assert "refused" in err.lower() and "Traceback" not in err


def test_publish_uses_longpoll_url_from_the_environment(server, monkeypatch):
    monkeypatch.setenv("LONGPOLL_URL", server.url)
    assert main(["publish", "env", "via env"]) == 0
    assert server.hub.read("env", "0").messages[0].message == "via env"


def test_subscribe_prints_messages(server, capsys):
    server.hub.publish("news", "plain")
    server.hub.publish("news", {"k": [1, 2]}, title="Build")
    assert main(["subscribe", "news", "--since", "0", "--count", "2", "--url", server.url]) == 0
    assert capsys.readouterr().out.splitlines() == ["plain", 'Build: {"k": [1, 2]}']


def test_subscribe_json_lines(server, capsys):
    server.hub.publish("a", 1)
    server.hub.publish("b", 2, priority=5)
    assert main(["subscribe", "a", "b", "--since", "0", "--count", "2", "--json",
                 "--url", server.url]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(m["channel"], m["message"]) for m in lines] == [("a", 1), ("b", 2)]
    assert lines[1]["priority"] == 5 and lines[0]["id"]


def test_subscribe_to_a_pattern_names_each_messages_channel(server, capsys):
    server.hub.publish("ci-main", "red", title="Build")
    server.hub.publish("docs", "not this")
    server.hub.publish("ci-dev", "green")
    assert main(["subscribe", "ci-*", "--since", "0", "--count", "2", "--url", server.url]) == 0
    assert capsys.readouterr().out.splitlines() == ["[ci-main] Build: red", "[ci-dev] green"]


def test_subscribe_waits_for_the_next_message(server, capsys):
    out = []
    t = threading.Thread(target=lambda: out.append(
        main(["subscribe", "ci", "--count", "1", "--url", server.url])))
    t.start()
    wait_until(lambda: server.waiting == 1)
    server.hub.publish("ci", "green")
    t.join(10)
    assert out == [0] and capsys.readouterr().out == "green\n"


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "serve" in capsys.readouterr().err


def test_bad_arguments_exit_2():
    with pytest.raises(SystemExit) as info:
        main(["publish", "news", "x", "--priority", "9"])
    assert info.value.code == 2


# -- python -m longpoll, as a user runs it -----------------------------------------

def test_serve_without_site_packages_and_sigterm_exits_0(serve):
    proc = serve(python_flags=("-S",))
    req = urllib.request.Request(proc.url + "/channels/news", data=b"hello", method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 201
    assert get_json(proc.url + "/channels/news?since=0")["messages"][0]["message"] == "hello"
    proc.expect(r'"GET /channels/news\?since=0 HTTP/1.1" 200')  # the access log
    assert proc.stop(signal.SIGTERM) == 0


def test_sigterm_with_50_parked_clients_answers_all_and_exits_0_within_3s(serve):
    proc = serve("-q")
    answers = []

    def park():
        try:
            answers.append(get_json(proc.url + "/channels/wait?timeout=60", timeout=30))
        except Exception as exc:  # noqa: BLE001 (recorded and asserted below)
            answers.append(exc)

    threads = [threading.Thread(target=park) for _ in range(50)]
    for t in threads:
        t.start()
    wait_until(lambda: get_json(proc.url + "/health")["waiting"] == 50)
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(3) == 0
    for t in threads:
        t.join(5)
    assert len(answers) == 50 and all(isinstance(a, dict) and a["messages"] == []
                                      for a in answers), answers


def test_sigint_stops_the_server_with_0(serve):
    proc = serve()
    assert proc.stop(signal.SIGINT) == 0


def test_a_port_in_use_is_one_clear_error(serve):
    first = serve()
    port = first.url.rsplit(":", 1)[1]
    second = Process("serve", "--port", port)
    assert second.proc.wait(10) == 1
    second.expect("cannot listen")


def test_subscribe_exits_0_on_ctrl_c(serve):
    server = serve()
    sub = Process("subscribe", "news", "--url", server.url)
    try:
        wait_until(lambda: get_json(server.url + "/health")["waiting"] == 1)
        assert sub.stop(signal.SIGINT) == 0
    finally:
        if sub.proc.poll() is None:
            sub.proc.kill()
    assert not any("Traceback" in line for line in sub.seen["err"])


def test_help_examples_work_when_pasted(serve):
    """Each example of --help, run in a shell against a server (LONGPOLL_URL)."""
    server = serve()
    env = {**os.environ, "LONGPOLL_URL": server.url}
    examples = [line.split("#")[0].strip() for line in longpoll.EPILOG.splitlines()
                if "python3 -m longpoll" in line]
    assert examples and "python3 -m longpoll serve" in examples
    python = shlex.quote(sys.executable)
    for example in examples:
        command = example.replace("python3 ", python + " ", 1).replace(
            "| python3 ", "| " + python + " ")
        if " serve" in example:
            continue  # the fixture runs serve itself
        if " subscribe" in example:
            # A killed subscriber stays counted until its hold ends, so wait
            # for the count to rise above what it is now.
            before = get_json(server.url + "/health")["waiting"]
            proc = subprocess.Popen("exec " + command, shell=True, cwd=ROOT, env=env,
                                    text=True, stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL)
            lines = queue.Queue()
            threading.Thread(target=lambda q=lines, out=proc.stdout: [q.put(x) for x in out],
                             daemon=True).start()
            try:
                wait_until(lambda: get_json(server.url + "/health")["waiting"] > before)
                channel = example.split("subscribe ")[1].split()[0].strip("'")
                if longpoll.is_pattern(channel):  # publish to a channel it matches
                    channel = channel.replace("*", "main")
                urllib.request.urlopen(urllib.request.Request(
                    f"{server.url}/channels/{channel}", data=b"pasted", method="POST"),
                    timeout=10)
                while "pasted" not in lines.get(timeout=10):  # --since 0 prints older first
                    pass
                if "--count" not in example:
                    proc.send_signal(signal.SIGINT)
                assert proc.wait(10) == 0, example
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(5)
        else:
            done = subprocess.run(command, shell=True, cwd=ROOT, env=env, text=True,
                                  capture_output=True, timeout=20)
            assert done.returncode == 0, (example, done.stderr)
            if " expect " in example:  # the state of the watch
                assert json.loads(done.stdout)["channel"] == "backups"
            elif "--delay" in example:  # the scheduled message's id
                assert re.fullmatch(r"s[0-9a-f]+\n", done.stdout), done.stdout
            elif " bench" in example:  # its report: everything delivered
                assert re.search(r"delivered +2,000 of 2,000\n", done.stdout), done.stdout
            else:  # the message's id
                assert re.fullmatch(r"[0-9a-f]+-\d+\n", done.stdout), done.stdout


def test_console_script_is_installed():
    script = os.path.join(os.path.dirname(sys.executable), "longpoll")
    if not os.path.exists(script):
        if E2E:
            pytest.fail(f"{script} missing: pip install -e . should install it")
        pytest.skip("longpoll is not pip-installed in this environment")
    done = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=20)
    assert done.returncode == 0 and longpoll.__version__ in done.stdout
    done = subprocess.run([script + "-notify", "--help"], capture_output=True, text=True,
                          timeout=20)
    assert done.returncode == 0 and "--min-priority" in done.stdout
