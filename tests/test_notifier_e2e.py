"""notifier.py as a user runs it, against a real notification server:
Xvfb + a private D-Bus session bus + dunst, read back with dunstctl."""
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from conftest import E2E, parked_on, wait_until
from notify_stack import NotifyStack, missing_tools

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    missing = missing_tools()
    if missing:
        message = f"not installed: {', '.join(missing)} (see .ci/run for the apt packages)"
        if E2E:
            pytest.fail(message)
        pytest.skip(message)
    stack = NotifyStack(tmp_path_factory.mktemp("notify")).start()
    yield stack
    stack.stop()


@pytest.fixture
def notifier_proc(stack, server):
    procs = []

    def start(channel, *args):
        before = server.waiting
        proc = subprocess.Popen([sys.executable, "notifier.py", channel, "--url", server.url,
                                 *args], cwd=ROOT, env=stack.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append(proc)
        wait_until(lambda: server.waiting > before or proc.poll() is not None,
                   what="the notifier to subscribe")
        assert proc.poll() is None, proc.stderr.read()
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(10) == 0
        assert "Traceback" not in proc.stderr.read()


def shown(stack, channel):
    return [n for n in stack.history() if channel in n["summary"] or channel in n["body"]]


def test_title_body_and_critical_urgency_within_2_s(stack, server, notifier_proc):
    channel = f"ci{uuid.uuid4().hex[:6]}"
    notifier_proc(channel, "--no-state")
    title = f"Build {channel} done"
    stack.history()  # closes any popup left on screen
    published = time.monotonic()
    server.hub.publish(channel, "All 42 tests passed", title=title, priority=5)
    wait_until(lambda: int(stack.run("dunstctl", "count", "displayed")) >= 1, timeout=2.0,
               interval=0.02, what="the popup")
    assert time.monotonic() - published < 2.0
    shot = os.environ.get("NOTIFY_SHOT", str(stack.tmp / "notify-shot.png"))
    assert stack.screenshot(shot) > 1, "the screen is plain black: no popup drawn"
    n = stack.wait_for(title)  # (reading history closes the popup)
    assert n["body"] == "All 42 tests passed" and n["appname"] == "longpoll"
    assert n["message"] == f"CRITICAL|{title}|All 42 tests passed"


def test_min_priority_4_shows_4_and_not_2(stack, server, notifier_proc):
    channel = f"prio{uuid.uuid4().hex[:6]}"
    notifier_proc(channel, "--no-state", "--min-priority", "4")
    server.hub.publish(channel, "routine", title=f"{channel} p2", priority=2)
    server.hub.publish(channel, "important", title=f"{channel} p4", priority=4)
    n = stack.wait_for(f"{channel} p4")
    assert n["message"] == f"NORMAL|{channel} p4|important"
    assert not [x for x in stack.history() if x["summary"] == f"{channel} p2"]


def test_twenty_at_once_make_at_most_two_notifications(stack, server, notifier_proc):
    channel = f"burst{uuid.uuid4().hex[:6]}"
    notifier_proc(channel, "--no-state")
    for i in range(20):
        server.hub.publish(channel, f"message {i}")
    wait_until(lambda: any("new messages on" in n["summary"] for n in shown(stack, channel)),
               timeout=5)
    # A message after the burst: once it is shown, the notifier has shown
    # everything the burst made (it shows in order).
    server.hub.publish(channel, "after the burst", title=f"{channel} after")
    stack.wait_for(f"{channel} after")
    notes = [n for n in shown(stack, channel) if n["summary"] != f"{channel} after"]
    assert len(notes) <= 2, notes
    assert any(n["summary"] in (f"20 new messages on {channel}", f"19 new messages on {channel}")
               for n in notes)


def test_stopped_notifier_shows_the_three_it_missed_once(stack, server, notifier_proc, tmp_path):
    channel = f"resume{uuid.uuid4().hex[:6]}"
    state = str(tmp_path / "state.json")
    first = notifier_proc(channel, "--state", state)
    server.hub.publish(channel, "seen live", title=f"{channel} live")
    stack.wait_for(f"{channel} live")
    first.send_signal(signal.SIGINT)
    assert first.wait(10) == 0
    # (until the server sees its poll go, it still counts as waiting: the next
    # notifier's start is told by that count going up)
    wait_until(lambda: parked_on(server, channel) == 0, what="the server to see it go")
    for i in range(3):
        server.hub.publish(channel, f"missed {i}", title=f"{channel} missed {i}")
    notifier_proc(channel, "--state", state)
    for i in range(3):
        stack.wait_for(f"{channel} missed {i}")
    wait_until(lambda: server.waiting >= 1)
    summaries = [n["summary"] for n in shown(stack, channel)]
    assert sorted(summaries) == sorted([f"{channel} live"] + [f"{channel} missed {i}"
                                                             for i in range(3)])


def test_what_could_not_be_shown_waits_for_the_daemon(stack, server, notifier_proc, tmp_path):
    """The notification daemon goes away: a message published meanwhile is
    not passed by the saved cursor, and is shown once the daemon is back."""
    import json
    import select
    channel = f"down{uuid.uuid4().hex[:6]}"
    state = tmp_path / "state.json"
    proc = notifier_proc(channel, "--state", str(state))
    server.hub.publish(channel, "before", title=f"{channel} before")
    stack.wait_for(f"{channel} before")
    saved = json.loads(state.read_text())["cursors"][channel]
    stack.stop_daemon()
    try:
        server.hub.publish(channel, "while down", title=f"{channel} down")
        ready = select.select([proc.stderr], [], [], 15)[0]
        assert ready, "the notifier never said it could not show the message"
        assert "could not show a notification" in proc.stderr.readline()
        assert json.loads(state.read_text())["cursors"][channel] == saved
    finally:
        stack.start_daemon()
    stack.wait_for(f"{channel} down", timeout=15)  # it retries every 5 s
    wait_until(lambda: json.loads(state.read_text())["cursors"][channel] != saved,
               what="the cursor to pass the message once shown")


# -- clicks, buttons, updates in place (the notifier's own D-Bus client) -------------------

@pytest.fixture
def browser_stub(tmp_path):
    """A stand-in for the default browser ($BROWSER, which Python's
    webbrowser follows): it records each URL it is asked to open."""
    opened = tmp_path / "opened.txt"
    script = tmp_path / "browser"
    script.write_text(f"#!/bin/sh\necho \"$1\" >> {opened}\n")
    script.chmod(0o755)
    return script, opened


def displayed(stack):
    return int(stack.run("dunstctl", "count", "displayed"))


def test_a_click_opens_the_messages_link(stack, server, notifier_proc, browser_stub):
    script, opened = browser_stub
    stack.env["BROWSER"] = str(script)
    try:
        channel = f"click{uuid.uuid4().hex[:6]}"
        stack.history()  # nothing left on screen
        notifier_proc(channel, "--no-state")
        server.hub.publish(channel, "Build 7 failed", title=f"{channel} red",
                           click="https://ci.example/builds/7")
        wait_until(lambda: displayed(stack) == 1, what="the popup")
        stack.run("dunstctl", "action", "0")  # what a click on it does
        wait_until(opened.exists, what="the browser to be asked")
        assert opened.read_text() == "https://ci.example/builds/7\n"
    finally:
        del stack.env["BROWSER"]


def test_an_http_button_makes_its_request_and_shows_the_outcome(stack, server, notifier_proc):
    channel = f"button{uuid.uuid4().hex[:6]}"
    stack.history()
    notifier_proc(channel, "--no-state")
    server.hub.publish(channel, "Disk almost full", title=f"{channel} disk", actions=[
        {"action": "http", "label": "Clean up", "url": f"{server.url}/channels/{channel}-acks",
         "method": "POST", "body": "clean /var/tmp"}])
    wait_until(lambda: displayed(stack) == 1, what="the popup")
    stack.run("dunstctl", "action", "0")  # (its only action: dunst invokes it)
    wait_until(lambda: server.hub.read(f"{channel}-acks", "0").messages, what="the request")
    assert server.hub.read(f"{channel}-acks", "0").messages[0].message == "clean /var/tmp"
    n = stack.wait_for("Clean up: 201 Created")  # in place of the notification
    assert n["body"] == f"{channel} disk"
    assert not [x for x in stack.history() if x["summary"] == f"{channel} disk"]


def test_messages_with_one_sequence_id_update_one_notification(stack, server, notifier_proc):
    channel = f"seq{uuid.uuid4().hex[:6]}"
    stack.history()
    notifier_proc(channel, "--no-state")
    server.hub.publish(channel, "backup running: 10%", title=f"{channel} backup",
                       sequence_id="backup-1")
    wait_until(lambda: displayed(stack) == 1, what="the first popup")
    server.hub.publish(channel, "backup done", title=f"{channel} backup", sequence_id="backup-1")
    server.hub.publish(channel, "next", title=f"{channel} marker")
    # The notifier shows in order: once the marker is on screen, the update
    # before it has been made (two popups, not three).
    wait_until(lambda: displayed(stack) >= 2, what="the marker")
    notes = [n for n in stack.history() if n["summary"] == f"{channel} backup"]
    assert [n["body"] for n in notes] == ["backup done"]
    assert displayed(stack) == 0 and len(shown(stack, channel)) == 2


def test_sound_hint_and_urgency_reach_the_notification_server(stack, server, notifier_proc,
                                                             tmp_path):
    """--sound: freedesktop's sound-name hint on priority 4 and 5, not
    below; read off the bus itself (dunst keeps no hints)."""
    log = open(tmp_path / "monitor.log", "w")
    monitor = subprocess.Popen(["dbus-monitor", "--session",
                                "interface='org.freedesktop.Notifications',member='Notify'"],
                               env=stack.env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "NameAcquired" in (tmp_path / "monitor.log").read_text(),
                   what="dbus-monitor to listen")
        channel = f"sound{uuid.uuid4().hex[:6]}"
        notifier_proc(channel, "--no-state", "--sound")
        server.hub.publish(channel, "quiet one", title=f"{channel} p3", priority=3)
        server.hub.publish(channel, "loud one", title=f"{channel} p4", priority=4)
        stack.wait_for(f"{channel} p4")
        calls = (tmp_path / "monitor.log").read_text().split("member=Notify")[1:]
        by_title = {next(t for t in ("p3", "p4") if f"{channel} {t}" in c): c for c in calls}
        assert '"sound-name"' in by_title["p4"] and "message-new-instant" in by_title["p4"]
        assert '"sound-name"' not in by_title["p3"]
    finally:
        monitor.terminate()
        monitor.wait(5)
        log.close()


def test_plyer_the_path_of_macos_and_windows_shows_title_and_body(stack, monkeypatch):
    """What desktop_notify uses off Linux, run here through plyer's Linux
    backend: the same wrapper, a real notification."""
    import warnings

    import notifier
    for name in ("DISPLAY", "DBUS_SESSION_BUS_ADDRESS"):
        monkeypatch.setenv(name, stack.env[name])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (without dbus-python: notify-send)
            from plyer import notification
    except ImportError:
        (pytest.fail if E2E else pytest.skip)("plyer is missing: pip install plyer")
    show = notifier._plyer_notify(notification, "longpoll")
    title = f"plyer {uuid.uuid4().hex[:6]}"
    show(notifier.Notification(title, "from plyer", "normal"))
    assert stack.wait_for(title)["body"] == "from plyer"


def test_quiet_hours_hold_a_routine_message_and_show_an_urgent_one(stack, monkeypatch):
    """Quiet hours with an injected clock, shown by the real notification
    server: priority 3 is held, priority 5 shows at once, and the held one
    is summed up when quiet hours end."""
    import longpoll
    import notifier
    from conftest import Clock
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", stack.env["DBUS_SESSION_BUS_ADDRESS"])
    clock = Clock(time.mktime((2026, 12, 2, 23, 30, 0, 0, 0, -1)))  # 23:30 local
    show = notifier.DesktopNotifications()
    tag = uuid.uuid4().hex[:6]
    n = notifier.Notifier(longpoll.Client("http://127.0.0.1:9"), (f"q{tag}",), show,
                          quiet=notifier.parse_quiet("22:00-07:00"), clock=clock)
    try:
        n.handle([{"messages": [
            {"id": "h-1", "channel": f"q{tag}", "message": "nightly report", "priority": 3,
             "title": f"{tag} routine"},
            {"id": "h-2", "channel": f"q{tag}", "message": "disk failed", "priority": 5,
             "title": f"{tag} urgent"}], "cursor": "h-2"}])
        assert stack.wait_for(f"{tag} urgent")["message"] == f"CRITICAL|{tag} urgent|disk failed"
        assert not [x for x in stack.history() if x["summary"] == f"{tag} routine"]
        clock.now = time.mktime((2026, 12, 3, 7, 0, 0, 0, 0, -1))
        n.tick()
        held = stack.wait_for("1 message during quiet hours")
        assert held["body"] == f"Latest: {tag} routine: nightly report"
    finally:
        show.close()
