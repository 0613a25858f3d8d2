"""notifier.py: its policy with an injected notify function against a real
server, the command line, and (test_notifier_e2e.py) a real desktop."""
import json
import os
import signal
import subprocess
import sys
import threading

import pytest

import longpoll
import notifier
from conftest import request, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def msg(channel="news", message="hi", **extra):
    return {"id": "a-1", "channel": channel, "time": 1.0, "message": message, **extra}


def answer(*messages, cursor="a-9", gap=False):
    out = {"messages": list(messages), "cursor": cursor}
    if gap:
        out["gap"] = True
    return out


class Shown(list):
    """A notify function that records (title, body, urgency) of each
    notification, and the whole ``Notification`` in ``notes``."""

    def __init__(self):
        super().__init__()
        self.notes = []

    def __call__(self, note):
        self.append(tuple(note[:3]))
        self.notes.append(note)


def make(channels=("news",), **kwargs):
    shown = Shown()
    return notifier.Notifier(longpoll.Client("http://127.0.0.1:9"), channels, shown,
                             **kwargs), shown


# -- what a notification says ----------------------------------------------------

def test_describe_uses_title_else_channel_and_maps_priority_to_urgency():
    assert notifier.describe(msg(title="Build", priority=5))[:3] == ("Build", "hi", "critical")
    assert notifier.describe(msg(priority=1))[:3] == ("news", "hi", "low")
    assert notifier.describe(msg())[:3] == ("news", "hi", "normal")
    assert notifier.describe(msg(priority=4))[2] == "normal"


def test_non_string_messages_are_compact_and_long_ones_shortened():
    assert notifier.describe(msg(message={"build": 42, "ok": True}))[1] == '{"build":42,"ok":true}'
    body = notifier.describe(msg(message="word " * 100))[1]
    assert len(body) == notifier.MAX_BODY and body.endswith("…")


# -- the policy ----------------------------------------------------------------------

def test_min_priority_filters():
    n, shown = make(min_priority=4)
    n.handle([answer(msg(message="low", priority=2), msg(message="high", priority=4),
                     msg(message="none"))])
    assert [s[1] for s in shown] == ["high"]


def test_a_burst_becomes_one_summary_naming_the_count():
    n, shown = make(burst=3)
    n.handle([answer(*[msg(message=str(i)) for i in range(12)])])
    assert len(shown) == 1 and shown[0][0] == "12 new messages on news"
    assert "11" in shown[0][1]  # the latest is named


def test_up_to_the_burst_size_each_message_is_shown():
    n, shown = make(burst=3)
    n.handle([answer(msg(message="a")), answer(msg(message="b"), msg(message="c"))])
    assert [s[1] for s in shown] == ["a", "b", "c"]


def test_a_summary_takes_the_highest_urgency():
    n, shown = make(burst=1)
    n.handle([answer(msg(priority=2), msg(priority=5))])
    assert shown == [("2 new messages on news", "Latest: news: hi", "critical")]


def test_a_gap_is_announced():
    n, shown = make()
    n.handle([answer(gap=True)])
    assert shown[0][0] == "Messages lost on news"


def test_state_is_saved_and_resumed(tmp_path):
    path = str(tmp_path / "state" / "notifier.json")
    n, _ = make(channels=("a", "b"), state_path=path)
    assert n.since() is None
    n.handle([answer(msg(channel="a"), cursor="h-5")])
    assert json.load(open(path)) == {"cursors": {"a": "h-5", "b": "h-5"}}
    again, _ = make(channels=("a", "b"), state_path=path)
    assert again.since() == "h-5"
    other, _ = make(channels=("a", "c"), state_path=path)
    assert other.since() == "h-5"  # a new channel resumes from the oldest known


def test_an_unreadable_state_file_is_ignored(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    n, _ = make(state_path=str(path))
    assert n.since() is None


# -- running against a real server -------------------------------------------------------

class Running:
    def __init__(self, server, channels=("news",), **kwargs):
        self.shown = Shown()
        self.notifier = notifier.Notifier(longpoll.Client(server.url, timeout=5, backoff=0.05,
                                                          max_backoff=0.2),
                                          channels, self.shown, **kwargs)
        self.thread = threading.Thread(target=self.notifier.run, daemon=True)
        self.thread.start()

    def stop(self):
        self.notifier.close()
        self.thread.join(5)
        assert not self.thread.is_alive()


def test_notifies_each_published_message(server):
    run = Running(server)
    wait_until(lambda: server.waiting == 1)
    server.hub.publish("news", "build done", title="CI", priority=5)
    wait_until(lambda: run.shown)
    assert run.shown == [("CI", "build done", "critical")]
    run.stop()


def test_a_pattern_notifies_for_every_matching_channel_and_names_it(server):
    run = Running(server, channels=("ci-*",))
    wait_until(lambda: server.waiting == 1)
    server.hub.publish("docs", "not this")
    server.hub.publish("ci-main", "tests failed", title="Build", priority=5)
    server.hub.publish("ci-dev", "green")
    wait_until(lambda: len(run.shown) == 2)
    run.stop()
    assert run.shown == [("ci-main: Build", "tests failed", "critical"),
                         ("ci-dev", "green", "normal")]


def test_twenty_at_once_make_at_most_two_notifications(server):
    run = Running(server)
    wait_until(lambda: server.waiting == 1)
    for i in range(20):
        server.hub.publish("news", f"m{i}")
    wait_until(lambda: any("new messages" in s[0] for s in run.shown))
    run.stop()
    assert len(run.shown) <= 2
    assert run.shown[-1][0] in ("20 new messages on news", "19 new messages on news")


def test_restart_shows_what_was_missed_and_nothing_twice(server, tmp_path):
    state = str(tmp_path / "state.json")
    first = Running(server, state_path=state)
    wait_until(lambda: server.waiting == 1)
    server.hub.publish("news", "before")
    wait_until(lambda: first.shown)
    first.stop()
    for i in range(3):
        server.hub.publish("news", f"missed {i}")
    second = Running(server, state_path=state)
    wait_until(lambda: len(second.shown) >= 3)
    wait_until(lambda: server.waiting == 1)  # caught up, waiting again
    second.stop()
    assert [s[1] for s in second.shown] == ["missed 0", "missed 1", "missed 2"]


def test_connection_loss_and_return_are_told_once_each(make_server):
    server = make_server()
    port = server.server_address[1]
    run = Running(server, notify_connection=True)
    wait_until(lambda: server.waiting == 1)
    server.close()
    wait_until(lambda: any("lost" in s[0] for s in run.shown))
    again = longpoll.make_server("127.0.0.1", port).start()
    try:
        wait_until(lambda: any("again" in s[0] for s in run.shown))
        titles = [s[0] for s in run.shown]
        assert titles.count("longpoll: connection lost") == 1
        assert titles.count("longpoll: connected again") == 1
    finally:
        run.stop()
        again.close()


# -- the command line ---------------------------------------------------------------

def test_print_mode_and_ctrl_c_exits_0(server):
    proc = subprocess.Popen([sys.executable, "notifier.py", "news", "--print", "--no-state",
                             "--url", server.url], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: server.waiting == 1)
        server.hub.publish("news", "to the terminal", title="T", priority=5)
        assert proc.stdout.readline() == "! T: to the terminal\n"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_python_m_notifier_and_bad_channel(server):
    done = subprocess.run([sys.executable, "-m", "notifier", "bad name!", "--print"],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "invalid channel name" in done.stderr


def test_no_desktop_session_is_one_clear_line_at_start(server, tmp_path):
    """No display and no session bus (ssh, cron, a service): it says so at
    start, before any message, and exits 1; --print still works there."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("DISPLAY", "WAYLAND_DISPLAY", "DBUS_SESSION_BUS_ADDRESS")}
    env["XDG_RUNTIME_DIR"] = str(tmp_path)  # (no user bus there)
    done = subprocess.run([sys.executable, "notifier.py", "news", "--no-state", "--url",
                           server.url], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 1, done
    assert done.stderr.startswith("longpoll-notify: no desktop session here"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert server.hub.published == 0 and server.waiting == 0  # said before subscribing


def test_a_message_that_could_not_be_shown_stays_pending(tmp_path):
    """The daemon is gone for a while: what could not be shown is not passed
    by the saved cursor, and is shown, once, in order, when it is back."""
    path = str(tmp_path / "state.json")
    works = [True]
    shown = Shown()

    def notify(note):
        if not works[0]:
            raise notifier.NotifierError("could not show a notification (no daemon)")
        shown(note)

    n = notifier.Notifier(longpoll.Client("http://127.0.0.1:9"), ("news",), notify,
                          state_path=path)
    assert n.handle([answer(msg(message="one", id="h-1"), cursor="h-1")])
    works[0] = False
    assert not n.handle([answer(msg(message="two", id="h-2"), msg(message="three", id="h-3"),
                                cursor="h-3")])
    assert json.load(open(path))["cursors"]["news"] == "h-1"  # not past "two"
    assert not n.retry()
    works[0] = True
    assert n.handle([answer(msg(message="four", id="h-4"), cursor="h-4")])
    assert [s[1] for s in shown] == ["one", "two", "three", "four"]
    assert json.load(open(path))["cursors"]["news"] == "h-4"
    again = notifier.Notifier(longpoll.Client("http://127.0.0.1:9"), ("news",), notify,
                              state_path=path)
    assert again.since() == "h-4"


def test_a_failure_midway_keeps_the_cursor_before_the_first_unshown(tmp_path):
    path = str(tmp_path / "state.json")
    calls = []

    def notify(note):
        calls.append(note.body)
        if note.body == "b":
            raise notifier.NotifierError("could not show a notification (busy)")

    n = notifier.Notifier(longpoll.Client("http://127.0.0.1:9"), ("x", "y"), notify,
                          state_path=path)
    assert not n.handle([answer(msg(channel="x", message="a", id="h-1"),
                                msg(channel="y", message="b", id="h-2"),
                                msg(channel="x", message="c", id="h-3"), cursor="h-3")])
    # "a" and "c" (channel x) came first; "b" failed: resume after h-1, not h-3.
    assert json.load(open(path))["cursors"] == {"x": "h-1", "y": "h-1"}


def test_an_alert_published_through_ntfys_api_is_shown(server):
    """What Grafana or Uptime Kuma send, pointed at this server as at ntfy."""
    run = Running(server, channels=("grafana",))
    wait_until(lambda: server.waiting == 1)
    answer = request(server, "POST", "/grafana", "CPU at 97% on db-1",
                     {"Title": "[FIRING] High CPU", "Priority": "urgent", "Tags": "warning"})
    assert answer.status == 200
    wait_until(lambda: run.shown)
    assert run.shown == [("[FIRING] High CPU", "CPU at 97% on db-1", "critical")]
    run.stop()
