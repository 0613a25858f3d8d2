"""notifier.py: its policy with an injected notify function against a real
server, the command line, and (test_notifier_e2e.py) a real desktop."""
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

import pytest

import longpoll
import notifier
from conftest import Clock, request, wait_until

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


# -- quiet hours ---------------------------------------------------------------------

def local(hour, minute=0):
    """A Unix time at *hour*:*minute* local time (quiet hours are local)."""
    return time.mktime((2026, 12, 2, hour, minute, 0, 0, 0, -1))


def test_quiet_hours_hold_all_but_urgent_and_sum_up_when_they_end():
    clock = Clock(local(23, 30))
    n, shown = make(quiet=notifier.parse_quiet("22:00-07:00"), clock=clock)
    n.handle([answer(msg(message="routine", title="p3", priority=3),
                     msg(message="fire", title="p5", priority=5))])
    assert shown == [("p5", "fire", "critical")]
    clock.now = local(6, 59)
    n.tick()
    assert len(shown) == 1  # still quiet
    clock.now = local(7, 0)
    n.tick()
    assert shown[1] == ("1 message during quiet hours", "Latest: p3: routine", "normal")
    n.tick()
    assert len(shown) == 2  # once


def test_quiet_min_priority_and_a_daytime_span():
    clock = Clock(local(13, 0))
    n, shown = make(quiet=notifier.parse_quiet("12:30-14:00"), quiet_min_priority=4,
                    clock=clock)
    n.handle([answer(msg(message="a", priority=3), msg(message="b", priority=4))])
    assert [s[1] for s in shown] == ["b"]
    clock.now = local(14, 5)
    n.handle([answer(msg(message="c", priority=3))])  # the next message ends them too
    assert [s[1] for s in shown] == ["b", "Latest: news: a", "c"]  # (held, so older)


@pytest.mark.parametrize("text", ["22-07", "25:00-07:00", "22:00", "22:00-22:00", "7:5-8:00"])
def test_quiet_hours_that_are_not_a_span_are_refused(text):
    done = subprocess.run([sys.executable, "notifier.py", "news", "--print", "--quiet", text],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "--quiet" in done.stderr


# -- sound, and a command per message -------------------------------------------------

def test_sound_is_asked_for_priority_4_and_5_and_their_summaries():
    n, shown = make(sound=True, burst=1)
    n.handle([answer(msg(priority=3))])
    n.handle([answer(msg(priority=4))])
    n.handle([answer(msg(priority=2), msg(priority=5))])
    assert [note.sound for note in shown.notes] == [False, True, True]


def test_exec_runs_a_command_per_message_with_its_fields(server, tmp_path):
    """--exec (and --no-notify: no desktop needed): each message's fields
    in LONGPOLL_* variables and as JSON on stdin; a command that fails is
    reported and the notifier goes on."""
    command = (f'env | grep ^LONGPOLL_ | sort > "{tmp_path}/$LONGPOLL_ID.env"; '
               f'cat > "{tmp_path}/$LONGPOLL_ID.json"; '
               f'test "$LONGPOLL_PRIORITY" != 2 || {{ echo disk on fire >&2; exit 3; }}')
    env = {k: v for k, v in os.environ.items() if not k.startswith("LONGPOLL_")}
    proc = subprocess.Popen([sys.executable, "notifier.py", "ops", "--url", server.url,
                             "--no-state", "--no-notify", "--exec", command], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: server.waiting == 1, what="the notifier to subscribe")
        first = server.hub.publish("ops", "low disk", title="Disk", priority=2)
        second = server.hub.publish("ops", {"load": 9.5}, title="Load", priority=4,
                                    click="https://grafana.example/d/1")
        wait_until(lambda: (tmp_path / f"{second.id}.json").exists()
                   and (tmp_path / f"{second.id}.json").stat().st_size, what="the command")
        env = dict(line.split("=", 1) for line in
                   (tmp_path / f"{second.id}.env").read_text().splitlines())
        assert env == {"LONGPOLL_CHANNEL": "ops", "LONGPOLL_TITLE": "Load",
                       "LONGPOLL_MESSAGE": '{"load": 9.5}', "LONGPOLL_PRIORITY": "4",
                       "LONGPOLL_ID": second.id, "LONGPOLL_CLICK": "https://grafana.example/d/1",
                       "LONGPOLL_COUNT": "1"}
        data = json.loads((tmp_path / f"{second.id}.json").read_text())
        assert (data["message"], data["title"], data["id"]) == ({"load": 9.5}, "Load", second.id)
        assert json.loads((tmp_path / f"{first.id}.json").read_text())["message"] == "low disk"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    stderr = proc.stderr.read()
    assert "--exec: the command failed (exit status 3): disk on fire" in stderr
    assert "Traceback" not in stderr


# -- a user service -----------------------------------------------------------------

def test_install_service_writes_a_systemd_user_unit(tmp_path):
    import configparser
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path))
    done = subprocess.run([sys.executable, "notifier.py", "alerts", "ci-*", "--url",
                           "https://push.example", "--min-priority", "4", "--install-service"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    unit = tmp_path / "systemd" / "user" / "longpoll-notify.service"
    assert str(unit) in done.stdout and "systemctl --user enable --now" in done.stdout
    parsed = configparser.ConfigParser(interpolation=None)
    parsed.read(unit)
    start = shlex.split(parsed["Service"]["ExecStart"])
    assert start == [sys.executable, os.path.join(ROOT, "notifier.py"), "alerts", "ci-*",
                     "--url", "https://push.example", "--min-priority", "4"]
    assert parsed["Install"]["WantedBy"].split()[0] == "graphical-session.target"
